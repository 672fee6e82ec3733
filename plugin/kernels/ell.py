"""Sparse × dense product for row-sparse coefficients stored as ELLPACK (values + indices).

``y[n, o] = Σ_t z[n, indices[o, t]] · values[o, t]``: every output row reads only its s stored
coefficients and the s entries of ``z`` they point to, never the k − s zeros. On CPU this is a
compiled kernel (``ell_cpu.cpp``: AVX-512 gathers, bf16 or float32 values, uint8, int16 or int32
indices, the stored bytes streamed once per batch); elsewhere, or without a compiler, a
PyTorch gather does the same arithmetic more slowly.

The product is registered as the custom op ``slimserve::ell_matmul`` so that torch.compile
(vLLM's default on CPU) treats it as one opaque call instead of failing to trace the C++
extension.
"""

from __future__ import annotations

import torch

from slimserve.loaders.schemes.sparse_rows import ell_product
from slimserve.plugin.kernels.cpp import load_cpu_extension

#: From this many tokens a call expands strips of C to float32 in cache and runs a GEMM per strip, which is then
#: faster than the sparse loop (AMD EPYC, AVX2, fp32, int16 indices: 12.0 against 15.8 ms at 64 tokens, the loop
#: still ahead at 32; docs/methods/cpu_kernels.md); nothing dense is kept.
DENSE_FROM_TOKENS = 64


def _cpu_kernel():
    return load_cpu_extension("slimserve_ell_cpu", "ell_cpu.cpp")


@torch.library.custom_op("slimserve::ell_matmul", mutates_args=())
def ell_matmul(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``z [N, k] · Cᵀ`` for C given as ``values, indices [out, s]``; returns ``[N, out]`` in z's dtype."""
    ext = _cpu_kernel() if z.device.type == "cpu" else None
    if ext is None:
        return ell_product(z, values, indices)
    if z.shape[0] >= DENSE_FROM_TOKENS:
        return ext.ell_matmul_strips(z, values, indices).to(z.dtype)
    return ext.ell_matmul(z, values, indices).to(z.dtype)


@ell_matmul.register_fake
def _(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return z.new_empty(z.shape[0], values.shape[0])


class EllMatmul:
    """``y = z · Cᵀ`` for ``C [out, k]`` with exactly s nonzeros per row, prepared once at load."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, atoms: int) -> None:
        self.values = values.contiguous()
        self.indices = indices.contiguous()
        self.atoms = atoms
        # Build (or load) the kernel now, at model load, not inside the first traced forward.
        self.ext = _cpu_kernel() if values.device.type == "cpu" else None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.ell_matmul(z, self.values, self.indices)
