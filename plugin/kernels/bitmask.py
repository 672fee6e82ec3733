"""Sparse × dense product for row-sparse coefficients stored as BITMASK (packed values + bit mask).

``y[n, o] = Σ_{j set in mask[o]} z[n, j] · values[o, rank of j]``: each output row streams its s
packed values and ceil(k/8) mask bytes (the layout in ``loaders/schemes/sparse_rows.py``). On CPU
this is the compiled kernel ``bitmask_cpu.cpp`` (AVX-512 expand loads, AVX2 placement tables, or
scalar; float32 or bf16 values); elsewhere, or without a compiler, the PyTorch reference.

On CPUs with AMX, bf16 batches (2 tokens and more, prefill included) run on the tile unit: the kernel
expands 16 rows at a time into a dense strip in cache and multiplies it there (``amx_strips.h``); one
token expands 4 rows at a time in registers and dots them with ``vdpbf16ps``, faster there than the tile
unit. On CPUs with AVX512_BF16 and no tile unit (AMD Zen 4) bf16 batches below ``DENSE_FROM_TOKENS``
expand rows in registers and dot them with 8 tokens at a time by ``vdpbf16ps`` (``vector_rows.h``). AVX2
hosts from ``PANELS_FROM_TOKENS`` tokens multiply only the stored values against tokens packed in panels
of 32 (``vector_rows.h``) while C is sparse enough for them (at most ``PANELS_MAX_DENSITY`` full, or
``PANELS_MAX_DENSITY_SMALL_BATCH`` and the batch below ``TILES_FROM_TOKENS``); other steps decode rows
of C in cache and multiply them by slimserve's register-tiled GEMM (``tile_gemm``). Elsewhere many-token
steps take the other road past ``DENSE_FROM_TOKENS`` tokens: strips of 256 rows of C are decoded into
one float32 buffer that stays in cache and each is multiplied by ATen's GEMM, which past the measured
crossover (docs/methods/cpu_kernels.md) is faster than the batch loop; nothing dense is kept.

Registered as the operator ``slimserve::bitmask_matmul`` (``ops.py``) so torch.compile (vLLM's default on CPU)
treats it as one opaque call, with the token count known inside it.
"""

from __future__ import annotations

import torch

from slimserve.loaders.schemes.sparse_rows import bitmask_product
from slimserve.plugin.kernels.cpp import load_cpu_extension
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.kernels.precision import stored_values

#: From this many tokens a call of a build without AVX2 panels decodes C in strips and runs dense GEMMs on them.
#: Measured with the AVX2 build on an AMD EPYC (fp32, 2 threads, [5632, 1547] at s = 773,
#: docs/methods/cpu_kernels.md): the batch loop wins through 96 tokens (16.2 against 17.7 ms), the strips from 128
#: (21.0 against 29.3). Where bf16 batches take the AMX tile unit it does not apply.
DENSE_FROM_TOKENS = 128
#: From this many tokens AVX2 builds run the loop over C's stored values on panels of 32 tokens instead of the batch
#: loop, same host and shape: 6.3 against 7.0 ms at 32 tokens (4.5 against 6.7 at 16), 11.7 against 14.4 at 64.
PANELS_FROM_TOKENS = 32
#: AVX2 builds keep that panel loop, whose time follows C's density, at every token count while C is at most
#: ``PANELS_MAX_DENSITY`` full, and below ``TILES_FROM_TOKENS`` tokens while it is at most
#: ``PANELS_MAX_DENSITY_SMALL_BATCH`` full; denser C takes
#: the strips, whose register-tiled GEMM (``tile_gemm`` in vector_rows.h) multiplies the zeros too but runs near the
#: FMA units' peak, where the panel loop needs a load per multiply-add. Measured on an AMD EPYC (Zen 2), 2 threads,
#: bf16 values, ms panels / strips (docs/methods/cpu_kernels.md), at 512 tokens: density 0.25 [5632, 2048] 49.7 /
#: 64.1, [1536, 576] 5.14 / 5.22; 0.35 [5632, 2048] 59.3 / 64.4, [2048, 5632] 64.6 / 73.8, [1536, 576] 5.77 / 5.20;
#: 0.43 (lowrank_sparse's S at 30 % bytes) [5632, 2048] 67.0 / 64.9, [2048, 5632] 70.6 / 74.5, [1536, 576] 6.30 /
#: 5.20, [576, 1536] 5.95 / 5.36; at 128 tokens and 0.43, 17.5 / 18.0, 17.5 / 18.4, 1.58 / 1.50, 1.49 / 1.50; at 64
#: and 0.5, 9.8 / 10.3, 9.9 / 10.5, 0.88 / 0.89, 0.83 / 0.84. Density 0.64 (SparseGPT at 30 % bytes) takes the strips
#: from 48 tokens (12.3 / 8.6 on [2048, 5632]).
PANELS_MAX_DENSITY = 0.4
PANELS_MAX_DENSITY_SMALL_BATCH = 0.5
TILES_FROM_TOKENS = 128


def _cpu_kernel():
    return load_cpu_extension("slimserve_bitmask_cpu", "bitmask_cpu.cpp")


def _bitmask_matmul_shape(z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return z.new_empty(z.shape[0], values.shape[0])


@register_op("bitmask_matmul", fake=_bitmask_matmul_shape)
def bitmask_matmul(z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``z [N, k] · Cᵀ`` for C given as ``values [out, s]`` + ``mask [out, ceil(k/8)]``; ``[N, out]`` in z's dtype."""
    ext = _cpu_kernel() if z.device.type == "cpu" else None
    if ext is None:
        return bitmask_product(z, values, mask)
    on_tile_unit = z.dtype == values.dtype == torch.bfloat16 and ext.amx_usable()
    if ext.isa() == "avx2" and z.shape[0] >= PANELS_FROM_TOKENS:
        density = values.shape[1] / z.shape[1]
        small_batch = z.shape[0] < TILES_FROM_TOKENS
        if density <= PANELS_MAX_DENSITY or (small_batch and density <= PANELS_MAX_DENSITY_SMALL_BATCH):
            return ext.bitmask_matmul_kept(z, values, mask).to(z.dtype)
        return ext.bitmask_matmul_strips(z, values, mask).to(z.dtype)
    if z.shape[0] >= DENSE_FROM_TOKENS and not on_tile_unit:
        return ext.bitmask_matmul_strips(z, values, mask).to(z.dtype)
    return ext.bitmask_matmul(z, values, mask).to(z.dtype)


class BitmaskMatmul:
    """``y = z · Cᵀ`` for ``C [out, k]`` stored as packed values + bit mask, prepared once at load."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, atoms: int) -> None:
        # Build (or load) the kernel now, at model load, not inside the first traced forward.
        self.ext = _cpu_kernel() if values.device.type == "cpu" else None
        self.values = stored_values(values.contiguous(), self.ext.isa() if self.ext is not None else None)
        self.mask = mask.contiguous()
        self.atoms = atoms

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.bitmask_matmul(z, self.values, self.mask)

