"""Row-sparse coefficient kernels (ELL uint8/int16, bitmask) against a dense GEMM, per token count.

The op timed is dictsparse's second product ``y = z · Cᵀ`` for the gate/up projection of the
memory-bound Llama of bench/decode.py (out 5632, in 2048) at 30 % of its bf16 bytes removed
(``--budget bytes``: k atoms, s = k/2 nonzeros a row), bf16 values, for N = 1 … 512 tokens:

* ``ell-u8`` / ``ell-i16``: the ELL kernel with uint8 / int16 indices (k ≤ 256 only for uint8, so its
  row uses the same s with k clipped to 256 and is a kernel-speed comparison, not a real layer);
* ``ell-strips``: the ELL many-token road (strips of C expanded to float32 in cache, a GEMM each);
* ``bitmask``: the bitmask kernel's sparse loop;
* ``dense-gemm``: what the many-token road costs: strips of C decoded to float32 in cache, a GEMM each;
* ``ell-panels`` / ``bitmask-panels`` (AVX2 builds): the many-token loop over the stored values only, tokens
  packed in panels of 48 (``vector_rows.h``);
* ``dense-weight``: the dense layer ``x Wᵀ`` [5632, 2048] itself (the reference the scheme must beat).

Each ISA runs in its own process (``SLIMSERVE_CPU_ISA``). The crossover is the first N where
``dense-gemm`` beats the bitmask loop; ``plugin/kernels/bitmask.py::DENSE_FROM_TOKENS`` is set from it.
It also prints the stored bytes of dictsparse at a 30 % *parameter* budget (ρ = 2, what ROCKET and
CoSpaDi checkpoints were sized by) for SmolLM2-135M's decoder linears, in each encoding.

    OMP_NUM_THREADS=1 python bench/sparse_kernels.py            # prints a markdown table
    OMP_NUM_THREADS=2 python bench/sparse_kernels.py --dtype float32   # what AVX2-only hosts serve
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from machine import cpu_model  # bench/ is on sys.path when run as a script

OUT, IN, RATIO = 5632, 2048, 0.3
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
# SmolLM2-135M: hidden 576, FFN 1536, 9 query / 3 KV heads of 64, 30 layers
SMOLLM2_LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def _dtype_arg() -> str:
    """``--dtype bfloat16|float32`` (default bfloat16; float32 is what AVX2-only hosts serve)."""
    dtype = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else "bfloat16"
    if dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"--dtype must be bfloat16 or float32, not {dtype!r}")
    return dtype


def _time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_isa(dtype: torch.dtype) -> dict[str, dict[int, float]]:
    """Microseconds per call of each road at each token count, for the ISA in $SLIMSERVE_CPU_ISA."""
    from slimserve.loaders.compress.budget import Budget, dictsparse_sizes
    from slimserve.loaders.schemes import sparse_rows
    from slimserve.plugin.kernels import bitmask, ell

    torch.manual_seed(0)
    k, s = dictsparse_sizes(OUT, IN, RATIO, 2.0, Budget("bytes", 2))
    coef = torch.randn(OUT, k) * k ** -0.5
    values, indices = sparse_rows.dense_to_ell(coef, s)
    values = values.to(dtype)
    _, mask = sparse_rows.ell_to_bitmask(values, indices, k)
    u8_values, u8_indices = sparse_rows.dense_to_ell(coef[:, :256], min(s, 256))
    u8_values = u8_values.to(dtype)
    ext_ell, ext_bm = ell._cpu_kernel(), bitmask._cpu_kernel()
    weight = torch.randn(OUT, IN, dtype=dtype)
    panels = hasattr(ext_bm, "bitmask_matmul_kept")  # AVX2 builds
    roads = ["ell-u8", "ell-i16", "ell-strips", "bitmask", "dense-gemm"] + ["ell-panels", "bitmask-panels"] * panels
    result: dict[str, dict[int, float]] = {road: {} for road in roads + ["dense-weight"]}
    i16 = indices.to(torch.int16)
    for n in TOKENS:
        z = torch.randn(n, k, dtype=dtype)
        x = torch.randn(n, IN, dtype=dtype)
        z8 = z[:, :256].contiguous()
        result["ell-u8"][n] = _time(lambda: ext_ell.ell_matmul(z8, u8_values, u8_indices)) * 1e6
        result["ell-i16"][n] = _time(lambda: ext_ell.ell_matmul(z, values, i16)) * 1e6
        result["ell-strips"][n] = _time(lambda: ext_ell.ell_matmul_strips(z, values, i16).to(z.dtype)) * 1e6
        result["bitmask"][n] = _time(lambda: ext_bm.bitmask_matmul(z, values, mask)) * 1e6
        result["dense-gemm"][n] = _time(lambda: ext_bm.bitmask_matmul_strips(z, values, mask).to(z.dtype)) * 1e6
        if panels:
            result["ell-panels"][n] = _time(lambda: ext_ell.ell_matmul_kept(z, values, i16)) * 1e6
            result["bitmask-panels"][n] = _time(lambda: ext_bm.bitmask_matmul_kept(z, values, mask)) * 1e6
        result["dense-weight"][n] = _time(lambda: torch.nn.functional.linear(x, weight)) * 1e6
    return {"isa": ext_bm.isa(), "k": k, "s": s, "times": result}


def checkpoint_bytes() -> list[str]:
    """Stored decoder-linear bytes of SmolLM2-135M as dictsparse at a 30 % parameter budget (ρ = 2), bf16."""
    from slimserve.loaders.compress.budget import dictsparse_sizes
    from slimserve.loaders.schemes import sparse_rows

    dense = ell16 = ell_narrow = smallest = 0
    for out_features, in_features in SMOLLM2_LINEARS:
        k, s = dictsparse_sizes(out_features, in_features, RATIO, 2.0)
        values = out_features * s * 2 + k * in_features * 2
        dense += out_features * in_features * 2
        ell16 += values + out_features * s * 2
        ell_narrow += values + sparse_rows.position_bytes("ell", out_features, k, s)
        best = sparse_rows.smallest_encoding(out_features, k, s)
        smallest += values + sparse_rows.position_bytes(best, out_features, k, s)
    rows = [("ELL, int16 indices (format 1)", ell16), ("ELL, narrowest indices (uint8 where k ≤ 256)", ell_narrow),
            ("smallest encoding per module (what writers store)", smallest)]
    return [f"| {name} | {stored / dense:.1%} | {1 - stored / dense:.1%} |" for name, stored in rows]


def main() -> None:
    from slimserve.plugin.kernels.cpp import supported_isas

    dtype = _dtype_arg()
    runs = []
    for isa in [i for i in ("avx512", "avx2") if i in supported_isas()]:
        proc = subprocess.run([sys.executable, __file__, "--child", "--dtype", dtype],
                              env=dict(os.environ, SLIMSERVE_CPU_ISA=isa), capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}; k = {runs[0]['k']}, s = {runs[0]['s']}\n")
    for run in runs:
        times = run["times"]
        print(f"ISA {run['isa']}: µs per call ({dtype} values)\n")
        print("| N | " + " | ".join(times) + " | bitmask vs dense weight |")
        print("|" + "---|" * (len(times) + 2))
        for n in TOKENS:
            cells = [f"{times[road][str(n)]:.0f}" for road in times]
            speedup = times["dense-weight"][str(n)] / times["bitmask"][str(n)]
            print(f"| {n} | " + " | ".join(cells) + f" | {speedup:.2f}x |")
        crossover = next((n for n in TOKENS if times["dense-gemm"][str(n)] < times["bitmask"][str(n)]), None)
        print(f"\ncrossover (dense-gemm < bitmask) from N = {crossover}\n")
    print("| SmolLM2-135M decoder linears, dictsparse at 30 % params (ρ = 2), bf16 | bytes vs dense | bytes removed |")
    print("|---|---|---|")
    print("\n".join(checkpoint_bytes()))


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(run_isa(getattr(torch, _dtype_arg()))))
    else:
        main()
