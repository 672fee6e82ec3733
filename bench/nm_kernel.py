"""One N:M layer on CPU: dense prepacked GEMM vs the nm kernel vs GEMMs on decompressed strips vs the kept-only loop.

The shape is the benchmark Llama's gate/up projection ([5632, 2048], bf16; ``--dtype float32`` for
what AVX2-only hosts serve). For each token count N the three ways to compute ``x · Wᵀ`` are timed
in the same process (median of ``--repeats``); the token count where the strips overtake the
kernel is the crossover ``plugin/kernels/nm.py`` uses (``MANY_TOKENS``). AVX2 builds also time the
many-token loop that multiplies only the kept weights (``nm_matmul_kept``), which takes those steps there.

    python bench/nm_kernel.py                       # 2:4, the native ISA
    SLIMSERVE_CPU_ISA=avx2 python bench/nm_kernel.py --pattern 2:4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

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
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="weights and activations (float32: what AVX2-only hosts serve)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    kept, group = (int(v) for v in args.pattern.split(":"))
    out_features, in_features = args.shape
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    weight = (weight * nm_mask(weight, kept, group)).to(dtype)
    tensors = pack_nm(weight, kept, group)
    kernel = nm_kernel._cpu_kernel()
    if kernel is None:
        raise SystemExit("the nm CPU kernel could not be built")
    dense = prepacked_linear(weight)
    print(f"{args.pattern} [{out_features}, {in_features}] {args.dtype}, kernel ISA {kernel.isa()}, CPU {cpu_isa()}, "
          f"{torch.get_num_threads()} threads")
    kept_path = getattr(kernel, "nm_matmul_kept", None)  # AVX2 builds: only the kept weights multiplied
    print("| tokens | dense ms | nm kernel ms | kernel vs dense | strips + GEMM ms | vs dense | kept only ms "
          "| vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        x = torch.randn(tokens, in_features).to(dtype)
        dense_ms = timed(lambda: dense(x), args.repeats)
        kernel_ms = timed(lambda: kernel.nm_matmul(x, tensors["values"], tensors["positions"], kept, group),
                          args.repeats)
        gemm_ms = timed(lambda: kernel.nm_matmul_strips(x, tensors["values"], tensors["positions"], kept, group),
                        args.repeats)
        kept_cells = "| - | - |"
        if kept_path is not None:
            kept_ms = timed(lambda: kept_path(x, tensors["values"], tensors["positions"], kept, group), args.repeats)
            kept_cells = f"| {kept_ms:.2f} | {dense_ms / kept_ms:.2f}x |"
        print(f"| {tokens} | {dense_ms:.2f} | {kernel_ms:.2f} | {dense_ms / kernel_ms:.2f}x | {gemm_ms:.2f} | "
              f"{dense_ms / gemm_ms:.2f}x {kept_cells}", flush=True)


if __name__ == "__main__":
    main()
