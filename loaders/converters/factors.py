"""Choosing how to store a factor pair another project wrote as two dense matrices."""

from __future__ import annotations

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CheckpointWriter
from slimserve.loaders.config import ModelSizes
from slimserve.loaders.models import linear_shape
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.dictsparse import dense_to_coef


def check_dense_linear(name: str, tensor: torch.Tensor, sizes: ModelSizes, *, file: str) -> None:
    """Refuse an uncompressed decoder linear that is not a float ``[out, in]`` matrix of the base model's layer."""
    expected = linear_shape(sizes, name.removesuffix(".weight"))
    if tuple(tensor.shape) != expected or not tensor.is_floating_point():
        raise CheckpointError(f"has shape {list(tensor.shape)} and dtype {tensor.dtype}", file=file, tensor=name,
                              expected=f"a float matrix of shape {list(expected)} (from the base config.json)")


def check_pair_shapes(module: str, first: torch.Tensor, second: torch.Tensor, expected: tuple[int, int],
                      *, file: str, first_name: str, second_name: str, layout: str) -> None:
    """Refuse a pair whose product is not the layer's ``[out, in]`` (e.g. the other project's orientation)."""
    out_features, in_features = expected
    for name, factor in ((first_name, first), (second_name, second)):
        if not factor.is_floating_point() or not torch.isfinite(factor).all():
            raise CheckpointError(f"has dtype {factor.dtype} or non-finite values", file=file, tensor=name,
                                  expected="a finite float factor")
    if first.dim() != 2 or second.dim() != 2 or first.shape[1] != in_features or second.shape[0] != out_features \
            or first.shape[0] != second.shape[1]:
        raise CheckpointError(
            f"has shape {list(second.shape)} and {first_name} has shape {list(first.shape)}; "
            f"their product must be the layer's [{out_features}, {in_features}]",
            file=file, tensor=second_name, expected=layout)


def add_factor_pair(writer: CheckpointWriter, module: str, first: torch.Tensor, second: torch.Tensor,
                    dtype: torch.dtype) -> str:
    """Store ``W = second · first`` (first [r, in] dense, second [out, r]) in the cheapest scheme.

    A second factor with zeros (ROCKET's sparse coefficients, written dense) is re-encoded as
    ``dictsparse`` with s = the largest nonzero count of any row, when that is smaller in bytes
    (indices included, as each scheme counts them) than keeping it dense; otherwise the pair is
    ``lowrank``. Returns the scheme chosen.
    """
    out_features, rank = second.shape
    in_features = first.shape[1]
    nnz = int((second != 0).sum(dim=1).max())
    shape = {"in_features": in_features, "out_features": out_features}
    sparse_spec = SCHEMES["dictsparse"].storage_spec({**shape, "atoms": rank, "nnz": nnz})
    sparse_bytes = SCHEMES["dictsparse"].stored_bytes(sparse_spec, dtype.itemsize)
    if sparse_bytes < SCHEMES["lowrank"].stored_bytes({**shape, "rank": rank}, dtype.itemsize):
        values, indices = dense_to_coef(second, nnz)
        writer.add_module(module, "dictsparse",
                          {"dictionary": first.to(dtype), "coef_values": values.to(dtype), "coef_indices": indices},
                          in_features=in_features, out_features=out_features, atoms=rank, nnz=nnz)
        return "dictsparse"
    writer.add_module(module, "lowrank", {"u": second.to(dtype), "v": first.to(dtype)},
                      in_features=in_features, out_features=out_features, rank=rank)
    return "lowrank"
