"""Sparse × dense product for row-sparse coefficients stored as ELLPACK (values + indices).

``y[n, o] = Σ_t z[n, indices[o, t]] · values[o, t]``: every output row reads only its s stored
coefficients and the s entries of ``z`` they point to, never the k − s zeros. On CPU this is a
compiled kernel (``ell_cpu.cpp``: AVX-512 gathers, bf16 or float32 values, int16 or int32
indices, the stored bytes streamed once per batch); elsewhere, or without a compiler, a
PyTorch gather does the same arithmetic more slowly.
"""

from __future__ import annotations

import torch

from slimserve.plugin.kernels.cpp import load_cpu_extension


class EllMatmul:
    """``y = z · Cᵀ`` for ``C [out, k]`` with exactly s nonzeros per row, prepared once at load."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, atoms: int) -> None:
        self.values = values.contiguous()
        self.indices = indices.contiguous()
        self.atoms = atoms
        self.ext = load_cpu_extension("slimserve_ell_cpu", "ell_cpu.cpp") if values.device.type == "cpu" else None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.ext is not None and z.device.type == "cpu":
            return self.ext.ell_matmul(z, self.values, self.indices).to(z.dtype)
        gathered = z[:, self.indices.long()]  # [N, out, s]
        return (gathered * self.values.to(z.dtype)).sum(dim=-1)
