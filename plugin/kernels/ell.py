"""Sparse × dense product for row-sparse coefficients stored as ELLPACK (values + indices).

``y[n, o] = Σ_t z[n, indices[o, t]] · values[o, t]``: every output row reads only its s stored
coefficients and the s entries of ``z`` they point to, never the k − s zeros. On CPU the
product runs as a CSR sparse-dense matmul (MKL sparse BLAS in float32); other dtypes gather.
"""

from __future__ import annotations

import torch


class EllMatmul:
    """``y = z · Cᵀ`` for ``C [out, k]`` with exactly s nonzeros per row, prepared once at load."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, atoms: int) -> None:
        out_features, nnz = values.shape
        self.out_features = out_features
        self.values = values.contiguous()
        self.indices = indices.long().contiguous()
        crow = torch.arange(0, out_features * nnz + 1, nnz, dtype=torch.int64, device=values.device)
        # CSR of C [out, k]; used with z transposed so the sparse operand comes first.
        self.csr = torch.sparse_csr_tensor(crow, self.indices.flatten(), self.values.flatten(),
                                           size=(out_features, atoms))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if z.dtype == torch.float32 and z.device.type == "cpu":
            return (self.csr @ z.t()).t().contiguous()
        gathered = z[:, self.indices]  # [N, out, s]
        return (gathered * self.values.to(z.dtype)).sum(dim=-1)
