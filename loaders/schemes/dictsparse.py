"""``dictsparse``: W ≈ C·D, a dense dictionary D times coefficients C with s nonzeros per output.

The papers (CoSpaDi, ROCKET) write ``Y = X·W_p`` with ``W_p [in, out] = D_p [in, k] · C_p [k, out]``
and C_p column-sparse: every output neuron mixes exactly s of the k atoms. In the
``nn.Linear`` layout used by every slimserve tensor (``W = W_pᵀ [out, in]``) that is

    W = C·D,   D = D_pᵀ [k, in] dense,   C = C_pᵀ [out, k] with s nonzeros per row.

C is stored compactly, never as dense zeros: ``coef_values [out, s]`` and
``coef_indices [out, s]`` (the atom of each value, strictly increasing per row; int16 when
k <= 32767, else int32). This is ELLPACK: a CSR matrix whose rows all have s entries.

The forward is a dense product with D (``z = x Dᵀ``, k features) followed by a sparse product
that reads only the s stored coefficients of each output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes.base import Scheme, TensorSpec, smallest_index_dtype


class DictSparseScheme(Scheme):
    name = "dictsparse"
    fields = ("atoms", "nnz")

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        k, s, out = spec["atoms"], spec["nnz"], spec["out_features"]
        return [
            TensorSpec("dictionary", (k, spec["in_features"]), in_dim=1),
            TensorSpec("coef_values", (out, s), out_dim=0),
            TensorSpec("coef_indices", (out, s), out_dim=0, index_dtype=smallest_index_dtype(k)),
        ]

    def check_fields(self, module: str, spec: Mapping[str, Any], file: str) -> None:
        super().check_fields(module, spec, file)
        if spec["nnz"] > spec["atoms"]:
            raise CheckpointError(
                f"module '{module}' keeps nnz={spec['nnz']} coefficients per output but has only "
                f"{spec['atoms']} atoms",
                file=file, field=f"quantization_config.modules.{module}.nnz", expected="nnz <= atoms",
            )

    def check_values(self, module: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     files: Mapping[str, str]) -> None:
        indices = tensors["coef_indices"].long()
        name = f"{module}.coef_indices"
        bad = (indices < 0) | (indices >= spec["atoms"])
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise CheckpointError(
                f"index {int(indices[row, col])} at [{row}, {col}] is out of range",
                file=files["coef_indices"], tensor=name, expected=f"atom indices in [0, {spec['atoms']})",
            )
        if indices.shape[1] > 1 and not (indices[:, 1:] > indices[:, :-1]).all():
            row = int(((indices[:, 1:] <= indices[:, :-1]).any(dim=1)).nonzero()[0])
            raise CheckpointError(
                f"row {row} has repeated or unsorted atom indices",
                file=files["coef_indices"], tensor=name, expected="strictly increasing indices per row",
            )

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        coef = coef_to_dense(tensors["coef_values"].float(), tensors["coef_indices"], spec["atoms"])
        return coef @ tensors["dictionary"].float()

    def forward(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        z = x @ tensors["dictionary"].to(x.dtype).t()  # [N, k]
        return ell_product(z, tensors["coef_values"], tensors["coef_indices"])


def ell_product(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``z [N, k] · Cᵀ`` for C as ELL ``values, indices [out, s]``, reading only the stored atoms, in z's dtype.

    The plain-PyTorch definition the compiled ELL kernel is tested against and falls back to.
    """
    gathered = z[:, indices.long()]  # [N, out, s]
    return (gathered * values.to(z.dtype)).sum(dim=-1)


def coef_to_dense(values: torch.Tensor, indices: torch.Tensor, atoms: int) -> torch.Tensor:
    """Expand ELL coefficients ``[out, s]`` to a dense ``[out, atoms]`` matrix (for references)."""
    dense = torch.zeros(values.shape[0], atoms, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, indices.long(), values)


def dense_to_coef(coef: torch.Tensor, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``nnz`` largest-magnitude entries of each row of a dense ``[out, k]`` coefficient matrix.

    Rows with fewer nonzeros are padded with explicit zeros on unused atoms, so every row has
    exactly ``nnz`` entries with strictly increasing indices. Returns ``(values, indices)``.
    """
    atoms = coef.shape[1]
    if nnz > atoms:
        raise ValueError(f"nnz={nnz} exceeds the number of atoms {atoms}")
    # Ties (including all-zero padding) are broken towards lower atom indices deterministically.
    order = torch.argsort(coef.abs(), dim=1, descending=True, stable=True)[:, :nnz]
    indices, _ = torch.sort(order, dim=1)
    values = torch.gather(coef, 1, indices)
    return values, indices.to(smallest_index_dtype(atoms))
