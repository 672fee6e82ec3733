"""One N:M layer on CPU: dense prepacked GEMM vs the nm decode kernel vs decompress + dense GEMM, by token count.

The shape is the benchmark Llama's gate/up projection ([5632, 2048], bf16). For each token
count N the three ways to compute ``x · Wᵀ`` are timed in the same process (median of
``--repeats``); the token count where decompress + GEMM overtakes the decode kernel is the
crossover ``plugin/kernels/nm.py`` uses (``MANY_TOKENS``).

    python bench/nm_kernel.py                       # 2:4, the native ISA
    SLIMSERVE_CPU_ISA=avx2 python bench/nm_kernel.py --pattern 2:4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimserve.loaders.schemes.nm import nm_mask, pack_nm
from slimserve.plugin.kernels import nm as nm_kernel
from slimserve.plugin.kernels.cpp import cpu_isa
from slimserve.plugin.kernels.gemm import prepacked_linear


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median milliseconds of ``fn`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shape", nargs=2, type=int, default=[5632, 2048])
    args = parser.parse_args()
    kept, group = (int(v) for v in args.pattern.split(":"))
    out_features, in_features = args.shape
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    weight = (weight * nm_mask(weight, kept, group)).to(torch.bfloat16)
    tensors = pack_nm(weight, kept, group)
    kernel = nm_kernel._cpu_kernel()
    if kernel is None:
        raise SystemExit("the nm CPU kernel could not be built")
    dense = prepacked_linear(weight)
    print(f"{args.pattern} [{out_features}, {in_features}] bf16, kernel ISA {kernel.isa()}, CPU {cpu_isa()}, "
          f"{torch.get_num_threads()} threads")
    print("| tokens | dense ms | nm kernel ms | kernel vs dense | decompress+GEMM ms | vs dense |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        x = torch.randn(tokens, in_features).to(torch.bfloat16)
        dense_ms = timed(lambda: dense(x), args.repeats)
        kernel_ms = timed(lambda: kernel.nm_matmul(x, tensors["values"], tensors["positions"], kept, group),
                          args.repeats)
        gemm_ms = timed(lambda: F.linear(x, kernel.nm_decompress(tensors["values"], tensors["positions"],
                                                                  in_features, kept, group)), args.repeats)
        print(f"| {tokens} | {dense_ms:.2f} | {kernel_ms:.2f} | {dense_ms / kernel_ms:.2f}x | {gemm_ms:.2f} | "
              f"{dense_ms / gemm_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
