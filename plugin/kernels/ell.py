"""Sparse × dense product for row-sparse coefficients stored as ELLPACK (values + indices).

``y[n, o] = Σ_t z[n, indices[o, t]] · values[o, t]``: every output row reads only its s stored
coefficients and the s entries of ``z`` they point to, never the k − s zeros. On CPU this is a
compiled kernel (``ell_cpu.cpp``: AVX-512 gathers, bf16 or float32 values, uint8, int16 or int32
indices, the stored bytes streamed once per batch; many tokens on AVX2 hosts multiply only the
stored values against tokens packed in panels of 48, elsewhere dense GEMMs on strips of C decoded in
cache); elsewhere, or without a compiler, a PyTorch gather does the same arithmetic more slowly.

The product is registered as the operator ``slimserve::ell_matmul`` (``ops.py``) so that torch.compile
(vLLM's default on CPU) treats it as one opaque call instead of failing to trace the C++
extension.
"""

from __future__ import annotations

import torch

from slimserve.loaders.schemes.sparse_rows import ell_product
from slimserve.plugin.kernels.cpp import load_cpu_extension
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.kernels.precision import stored_values

#: From this many tokens a call leaves the batch loop (AMD EPYC, AVX2, fp32, int16 indices, [5632, 1547] at s = 773,
#: docs/methods/cpu_kernels.md): AVX2 builds run the loop over C's stored values on panels of tokens (10.7 ms at
#: 64 tokens against 13.9 for the batch loop and 13.2 for the strips; 5.9 against 5.1 for the batch loop at 32, with
#: the panels of 32 of then),
#: other builds expand strips of C to float32 in cache and run a GEMM per strip. Nothing dense is kept.
DENSE_FROM_TOKENS = 64


def _cpu_kernel():
    return load_cpu_extension("slimserve_ell_cpu", "ell_cpu.cpp")


def _ell_matmul_shape(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return z.new_empty(z.shape[0], values.shape[0])


@register_op("ell_matmul", fake=_ell_matmul_shape)
def ell_matmul(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``z [N, k] · Cᵀ`` for C given as ``values, indices [out, s]``; returns ``[N, out]`` in z's dtype."""
    ext = _cpu_kernel() if z.device.type == "cpu" else None
    if ext is None:
        return ell_product(z, values, indices)
    if z.shape[0] >= DENSE_FROM_TOKENS:
        many_tokens = ext.ell_matmul_kept if ext.isa() == "avx2" else ext.ell_matmul_strips
        return many_tokens(z, values, indices).to(z.dtype)
    return ext.ell_matmul(z, values, indices).to(z.dtype)


class EllMatmul:
    """``y = z · Cᵀ`` for ``C [out, k]`` with exactly s nonzeros per row, prepared once at load."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, atoms: int) -> None:
        # Build (or load) the kernel now, at model load, not inside the first traced forward.
        self.ext = _cpu_kernel() if values.device.type == "cpu" else None
        self.values = stored_values(values.contiguous(), self.ext.isa() if self.ext is not None else None)
        self.indices = indices.contiguous()
        self.atoms = atoms

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.ell_matmul(z, self.values, self.indices)
