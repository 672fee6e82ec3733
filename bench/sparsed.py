"""SparseD attention vs unmasked fp32 SDPA for one bidirectional layer, in the same run.

One layer at SmolLM2-135M's attention width (9 query heads, 3 key/value heads, head_dim 64),
prompt = length - 128 generated tokens, block 128. For each length: unmasked SDPA time, then per
rho the kept density, the one-time costs (tile selection, BlockMask build, first call = compile)
and the steady-state sparse call, as a ratio to SDPA. The issue's sweep is 2k-16k tokens; the
default here is shorter so it finishes on 2 shared CPU cores (each new length compiles anew).

    OMP_NUM_THREADS=2 .venv/bin/python bench/sparsed.py --lengths 2048 4096
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimserve.attention.sparsed import (
    SparsedParams,
    select_tiles,
    sparse_attention,
    tile_block_mask,
    tile_density,
)

HEADS, KV_HEADS, HEAD_DIM, GENERATED = 9, 3, 64, 128


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Mean wall time of ``fn`` after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"ISA {torch.backends.cpu.get_cpu_capability()}")
    print("| tokens | rho | kept density | SDPA ms | sparse ms | speed-up | select ms | mask build ms | first call s |")
    print("|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        q = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
        k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator)
        v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator)
        dense = seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.repeats)
        for rho in args.rhos:
            params = SparsedParams(rho=rho, block=args.block)
            start = time.perf_counter()
            keep = select_tiles(q, k, length - GENERATED, params)
            select = time.perf_counter() - start
            start = time.perf_counter()
            mask = tile_block_mask(keep, args.block, length, eager=False)
            build = time.perf_counter() - start
            start = time.perf_counter()
            sparse_attention(q, k, v, mask)
            first = time.perf_counter() - start
            sparse = seconds(lambda: sparse_attention(q, k, v, mask), args.repeats)
            print(f"| {length} | {rho} | {tile_density(keep):.3f} | {dense * 1e3:.1f} | {sparse * 1e3:.1f} | "
                  f"{dense / sparse:.2f}x | {select * 1e3:.0f} | {build * 1e3:.1f} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
