"""``lowrank_sparse``: W ≈ U·V + S, a low-rank part plus a row-sparse part (OATS, SLTrain, LOST).

Tensors (``nn.Linear`` layout, ``y = x Wᵀ``):

- ``u [out, r]`` and ``v [r, in]``: the low-rank factors, applied V first as in ``lowrank``;
  r may be 0 (both tensors empty): then W = S, a plain row-sparse weight, which is how the
  pruners (``compress --method sparsegpt|wanda --ratio R``) store unstructured sparsity;
- S, an ``[out, in]`` matrix with exactly ``nnz`` stored entries in every row, never written as
  dense zeros: ``s_values [out, nnz]`` plus where each value sits along the input axis, in the
  ``encoding`` field's form (see ``sparse_rows``):

  * ``"ell"``: ``s_indices [out, nnz]``, the input column of each value, strictly increasing per
    row (uint8 when in ≤ 256, int16 up to 32767, else int32);
  * ``"bitmask"``: ``s_mask [out, ceil(in/8)]`` uint8, bit j of row o set iff column j is stored,
    and the values of a row in increasing column order.

Writers pick the encoding with fewer bytes (the bitmask wins above ~1/8 density at bf16 with
uint8 indices). Rows with fewer true nonzeros than ``nnz`` store explicit zeros.

The forward is ``y = (x Vᵀ) Uᵀ + x Sᵀ``: the bytes read per token are the factors' plus S's
stored values and positions, so at equal bytes the scheme trades rank for sparse outliers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes import sparse_rows
from slimserve.loaders.schemes.base import Scheme, TensorSpec, smallest_index_dtype

ENCODINGS = sparse_rows.ENCODINGS


def sparse_encoding(out_features: int, in_features: int, nnz: int) -> str:
    """The encoding of S storing ``nnz`` entries per row in the fewest bytes (the values weigh the same in both)."""
    return sparse_rows.smallest_encoding(out_features, in_features, nnz)


def sparse_specs(out_features: int, in_features: int, nnz: int, encoding: str) -> list[TensorSpec]:
    """S's stored tensors; rows follow the layer's outputs (split with them), the input axis is never split."""
    positions = (
        TensorSpec("s_mask", (out_features, sparse_rows.mask_bytes_per_row(in_features)), out_dim=0,
                   index_dtype=torch.uint8)
        if encoding == sparse_rows.BITMASK
        else TensorSpec("s_indices", (out_features, nnz), out_dim=0, index_dtype=smallest_index_dtype(in_features))
    )
    return [TensorSpec("s_values", (out_features, nnz), out_dim=0), positions]


def encode_sparse(sparse: torch.Tensor, nnz: int) -> dict[str, torch.Tensor]:
    """S's tensors for a dense ``[out, in]`` matrix keeping its ``nnz`` largest magnitudes per row, in the
    smaller encoding (``sparse_encoding``).

    Rows with fewer nonzeros are padded with explicit zeros on their lowest unused columns.
    """
    values, indices = sparse_rows.dense_to_ell(sparse, nnz)
    if sparse_encoding(*sparse.shape, nnz) == sparse_rows.BITMASK:
        values, mask = sparse_rows.ell_to_bitmask(values, indices, sparse.shape[1])
        return {"s_values": values, "s_mask": mask}
    return {"s_values": values, "s_indices": indices}


def decode_sparse(tensors: Mapping[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """S as a dense float32 ``[out, in]`` matrix (references, densify, re-slicing), from either encoding."""
    if "s_mask" in tensors:
        return sparse_rows.bitmask_to_dense(tensors["s_values"].float(), tensors["s_mask"], in_features)
    return sparse_rows.ell_to_dense(tensors["s_values"].float(), tensors["s_indices"], in_features)


def sparse_product(x: torch.Tensor, tensors: Mapping[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """``x Sᵀ`` reading only S's stored entries (the plain-PyTorch reference of the kernels)."""
    if "s_mask" in tensors:
        return sparse_rows.bitmask_product(x, tensors["s_values"], tensors["s_mask"])
    return sparse_rows.ell_product(x, tensors["s_values"], tensors["s_indices"])


class LowRankSparseScheme(Scheme):
    name = "lowrank_sparse"
    fields = ("rank", "nnz")
    zero_allowed = ("rank",)  # rank 0, no low-rank part: W = S alone

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        out, r = spec["out_features"], spec["rank"]
        # Under row-parallel tensor parallelism the plugin passes the rank-local in_features and the
        # layer's full width as full_in_features: S is loaded whole on every rank and re-sliced there.
        addressed = spec.get("full_in_features", spec["in_features"])
        return [TensorSpec("u", (out, r), out_dim=0), TensorSpec("v", (r, spec["in_features"]), in_dim=1),
                *sparse_specs(out, addressed, spec["nnz"], spec.get("encoding", sparse_rows.ELL))]

    def check_fields(self, module: str, spec: Mapping[str, Any], file: str) -> None:
        super().check_fields(module, spec, file)
        field = f"quantization_config.modules.{module}"
        limit = min(spec["out_features"], spec["in_features"])
        if spec["rank"] > limit:
            raise CheckpointError(f"module '{module}' has rank {spec['rank']} larger than the layer "
                                  f"[{spec['out_features']}, {spec['in_features']}]",
                                  file=file, field=f"{field}.rank", expected=f"rank <= min(out, in) = {limit}")
        if spec["nnz"] > spec["in_features"]:
            raise CheckpointError(f"module '{module}' keeps nnz={spec['nnz']} sparse entries per row of a layer "
                                  f"with {spec['in_features']} inputs", file=file, field=f"{field}.nnz",
                                  expected="nnz <= in_features")
        if spec.get("encoding") not in ENCODINGS:
            raise CheckpointError(f"module '{module}' has encoding={spec.get('encoding')!r}", file=file,
                                  field=f"{field}.encoding", expected=f"one of {', '.join(ENCODINGS)}")

    def check_values(self, module: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     files: Mapping[str, str]) -> None:
        if spec["encoding"] == sparse_rows.BITMASK:
            in_features = spec.get("full_in_features", spec["in_features"])
            problem = sparse_rows.bitmask_problem(tensors["s_mask"], in_features, spec["nnz"])
            if problem is not None:
                _, what, expected = problem
                raise CheckpointError(what, file=files["s_mask"], tensor=f"{module}.s_mask",
                                      expected=f"{expected} (in_features={in_features}, nnz={spec['nnz']})")
            return
        indices = tensors["s_indices"].long()
        name = f"{module}.s_indices"
        bad = (indices < 0) | (indices >= spec["in_features"])
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise CheckpointError(f"row {row} stores column {int(indices[row, col])} (entry {col}), out of range",
                                  file=files["s_indices"], tensor=name,
                                  expected=f"input columns in [0, {spec['in_features']})")
        if indices.shape[1] > 1 and not (indices[:, 1:] > indices[:, :-1]).all():
            row = int(((indices[:, 1:] <= indices[:, :-1]).any(dim=1)).nonzero()[0])
            raise CheckpointError(f"row {row} has repeated or unsorted columns", file=files["s_indices"],
                                  tensor=name, expected="strictly increasing column indices per row")

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["u"].float() @ tensors["v"].float() + decode_sparse(tensors, spec["in_features"])

    def forward(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        low_rank = (x @ tensors["v"].to(x.dtype).t()) @ tensors["u"].to(x.dtype).t()
        return low_rank + sparse_product(x, tensors, spec["in_features"])
