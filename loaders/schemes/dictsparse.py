"""``dictsparse``: W ≈ C·D, a dense dictionary D times coefficients C with s nonzeros per output.

The papers (CoSpaDi, ROCKET) write ``Y = X·W_p`` with ``W_p [in, out] = D_p [in, k] · C_p [k, out]``
and C_p column-sparse: every output neuron mixes exactly s of the k atoms. In the
``nn.Linear`` layout used by every slimserve tensor (``W = W_pᵀ [out, in]``) that is

    W = C·D,   D = D_pᵀ [k, in] dense,   C = C_pᵀ [out, k] with s nonzeros per row.

C is stored compactly, never as dense zeros, in one of the two row-sparse encodings of
``sparse_rows`` named by the module field ``encoding``:

* ``"ell"``: ``coef_values [out, s]`` + ``coef_indices [out, s]`` (the atom of each value, strictly
  increasing per row; uint8 when k <= 256, int16 when k <= 32767, else int32). A module entry
  without ``encoding`` (format_version 1 checkpoints) is ELL.
* ``"bitmask"``: ``coef_values [out, s]`` (atom order) + ``coef_mask [out, ceil(k/8)]`` uint8, bit j
  set iff atom j is used; ceil(k/8) bytes a row instead of s index bytes.

Writers hand in ELL tensors and no ``encoding``; ``storage_spec`` / ``to_storage`` (called by
``CheckpointWriter.add_module``) pick the encoding with fewer bytes, so every producer stores the
smallest one and byte budgets (``Budget.cost``) count what is written.

The forward is a dense product with D (``z = x Dᵀ``, k features) followed by a sparse product
that reads only the s stored coefficients of each output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes import sparse_rows
from slimserve.loaders.schemes.base import Scheme, TensorSpec, smallest_index_dtype
from slimserve.loaders.schemes.sparse_rows import dense_to_ell as dense_to_coef
from slimserve.loaders.schemes.sparse_rows import ell_product
from slimserve.loaders.schemes.sparse_rows import ell_to_dense as coef_to_dense

# The names producers and tests have always imported from here; the encodings live in sparse_rows.
__all__ = ["DictSparseScheme", "coef_to_dense", "dense_to_coef", "ell_product"]


class DictSparseScheme(Scheme):
    name = "dictsparse"
    fields = ("atoms", "nnz")

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        k, s, out = spec["atoms"], spec["nnz"], spec["out_features"]
        positions = (
            TensorSpec("coef_mask", (out, sparse_rows.mask_bytes_per_row(k)), out_dim=0, index_dtype=torch.uint8)
            if encoding_of(spec) == sparse_rows.BITMASK
            else TensorSpec("coef_indices", (out, s), out_dim=0, index_dtype=smallest_index_dtype(k))
        )
        return [
            TensorSpec("dictionary", (k, spec["in_features"]), in_dim=1),
            TensorSpec("coef_values", (out, s), out_dim=0),
            positions,
        ]

    def storage_spec(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """A spec without ``encoding`` gets the smaller one for its sizes (what the writer will store)."""
        if "encoding" in spec:
            return dict(spec)
        return {**spec, "encoding": sparse_rows.smallest_encoding(spec["out_features"], spec["atoms"], spec["nnz"])}

    def to_storage(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ELL tensors from a producer re-encoded as ``spec["encoding"]`` (indices narrowed to their dtype)."""
        tensors = dict(tensors)
        if "coef_indices" not in tensors:
            return tensors
        k = spec["atoms"]
        if encoding_of(spec) == sparse_rows.BITMASK:
            values, mask = sparse_rows.ell_to_bitmask(tensors["coef_values"], tensors.pop("coef_indices"), k)
            tensors.update(coef_values=values, coef_mask=mask)
        else:
            tensors["coef_indices"] = tensors["coef_indices"].to(smallest_index_dtype(k))
        return tensors

    def check_fields(self, module: str, spec: Mapping[str, Any], file: str) -> None:
        super().check_fields(module, spec, file)
        if spec["nnz"] > spec["atoms"]:
            raise CheckpointError(
                f"module '{module}' keeps nnz={spec['nnz']} coefficients per output but has only "
                f"{spec['atoms']} atoms",
                file=file, field=f"quantization_config.modules.{module}.nnz", expected="nnz <= atoms",
            )
        if spec.get("encoding", sparse_rows.ELL) not in sparse_rows.ENCODINGS:
            raise CheckpointError(
                f"module '{module}' has encoding={spec['encoding']!r}",
                file=file, field=f"quantization_config.modules.{module}.encoding",
                expected=f"one of {list(sparse_rows.ENCODINGS)} (absent means ell)",
            )

    def check_values(self, module: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     files: Mapping[str, str]) -> None:
        if encoding_of(spec) == sparse_rows.BITMASK:
            problem = sparse_rows.bitmask_problem(tensors["coef_mask"], spec["atoms"], spec["nnz"])
            suffix = "coef_mask"
        else:
            problem = sparse_rows.ell_problem(tensors["coef_indices"], spec["atoms"])
            suffix = "coef_indices"
        if problem is not None:
            _, what, expected = problem
            raise CheckpointError(what, file=files[suffix], tensor=f"{module}.{suffix}",
                                  expected=f"{expected} (atoms={spec['atoms']}, nnz={spec['nnz']})")

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dense_coefficients(spec, tensors).float() @ tensors["dictionary"].float()

    def forward(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        z = x @ tensors["dictionary"].to(x.dtype).t()  # [N, k]
        if encoding_of(spec) == sparse_rows.BITMASK:
            return sparse_rows.bitmask_product(z, tensors["coef_values"], tensors["coef_mask"])
        return ell_product(z, tensors["coef_values"], tensors["coef_indices"])


def encoding_of(spec: Mapping[str, Any]) -> str:
    """The module's coefficient encoding; entries written before it existed (format_version 1) are ELL."""
    return spec.get("encoding", sparse_rows.ELL)


def dense_coefficients(spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """C as a dense ``[out, atoms]`` matrix in the values' dtype, from either encoding."""
    if encoding_of(spec) == sparse_rows.BITMASK:
        return sparse_rows.bitmask_to_dense(tensors["coef_values"], tensors["coef_mask"], spec["atoms"])
    return coef_to_dense(tensors["coef_values"], tensors["coef_indices"], spec["atoms"])
