"""``nm``: N:M semi-structured sparsity: ``kept`` of every ``group`` consecutive input features of a row.

2:4 keeps 2 of every 4 consecutive weights of each output row (the pattern NVIDIA's sparse
tensor cores, SR-STE, Wanda and SparseGPT produce). N is always the count *kept*, never the
count zeroed (Wanda's and SparseGPT's ``prune_n`` zero N; pass them ``group - kept``).

A module stores only the kept weights and where they sit, never the zeros:

- ``values [out, in·kept/group]``: the kept weights, group by group, each group's in
  increasing offset order (the checkpoint's float dtype);
- ``positions [out, ceil(in·kept/group · bits / 8)]`` uint8, ``bits = ceil(log2 group)``: the
  offset (``0 … group-1``) of each kept value within its group, packed as one little-endian bit
  stream per row: entry j of a row occupies bits ``[j·bits, (j+1)·bits)`` of the row, bit b
  being bit ``b % 8`` (least significant first) of byte ``b // 8``. At 2:4 one byte holds the
  four offsets of two groups (4 bits a group); a row's stream is padded with zero bits to a whole
  byte.

At bf16, 2:4 stores 1 + 0.125 bytes per weight position (56.25 % of dense), which is what
bounds the memory-bound decode speed-up (1.78x). Offsets within a group must be strictly
increasing: a group whose stored weights are zero (fewer than ``kept`` true nonzeros) uses the
lowest unused offsets, so every group has exactly ``kept`` entries and the layout stays fixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes.base import Scheme, TensorSpec

#: The largest group a uint8 position can address.
MAX_GROUP = 256


def position_bits(group: int) -> int:
    """Bits per stored offset: ``ceil(log2 group)`` (2 for groups of 4, 3 for 8), at least 1."""
    return max(1, (group - 1).bit_length())


def kept_per_row(in_features: int, kept: int, group: int) -> int:
    """Values stored per output row (``in·kept/group``)."""
    return in_features // group * kept


def position_bytes_per_row(in_features: int, kept: int, group: int) -> int:
    """Bytes of one row's packed offsets (its bit stream rounded up to a whole byte)."""
    return (kept_per_row(in_features, kept, group) * position_bits(group) + 7) // 8


class NMScheme(Scheme):
    name = "nm"
    fields = ("kept", "group")

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        out, in_features, kept, group = spec["out_features"], spec["in_features"], spec["kept"], spec["group"]
        return [
            TensorSpec("values", (out, kept_per_row(in_features, kept, group)), out_dim=0, in_dim=1),
            TensorSpec("positions", (out, position_bytes_per_row(in_features, kept, group)), out_dim=0, in_dim=1,
                       index_dtype=torch.uint8),
        ]

    def check_fields(self, module: str, spec: Mapping[str, Any], file: str) -> None:
        super().check_fields(module, spec, file)
        kept, group = spec["kept"], spec["group"]
        where = f"quantization_config.modules.{module}"
        if not 2 <= group <= MAX_GROUP:
            raise CheckpointError(f"module '{module}' has group={group}", file=file, field=f"{where}.group",
                                  expected=f"a group of 2 to {MAX_GROUP} consecutive inputs")
        if kept > group:
            raise CheckpointError(f"module '{module}' keeps kept={kept} of every group={group}", file=file,
                                  field=f"{where}.kept", expected="kept <= group (kept counts the weights KEPT)")
        if spec["in_features"] % group:
            raise CheckpointError(
                f"module '{module}' has in_features={spec['in_features']}, not a multiple of group={group}",
                file=file, field=f"{where}.group", expected="a group size that divides in_features")

    def check_values(self, module: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     files: Mapping[str, str]) -> None:
        kept, group = spec["kept"], spec["group"]
        offsets = unpack_positions(tensors["positions"], spec["in_features"], kept, group)
        grouped = offsets.view(offsets.shape[0], -1, kept)
        bad = (grouped >= group).any(dim=2)
        if kept > 1:
            bad |= (grouped[:, :, 1:] <= grouped[:, :, :-1]).any(dim=2)
        if bad.any():
            row, grp = (int(i) for i in bad.nonzero()[0])
            raise CheckpointError(
                f"row {row}, group {grp} (inputs {grp * group}..{grp * group + group - 1}) has offsets "
                f"{grouped[row, grp].tolist()}",
                file=files["positions"], tensor=f"{module}.positions",
                expected=f"{kept} strictly increasing offsets in [0, {group}) per group")

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return nm_to_dense(tensors["values"].float(), tensors["positions"], spec["in_features"], spec["kept"],
                           spec["group"])

    def forward(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        weight = nm_to_dense(tensors["values"].to(x.dtype), tensors["positions"], spec["in_features"], spec["kept"],
                             spec["group"])
        return x @ weight.t()


def nm_columns(positions: torch.Tensor, in_features: int, kept: int, group: int) -> torch.Tensor:
    """The input column of every stored value, ``[out, in·kept/group]`` int64 (group start + offset)."""
    offsets = unpack_positions(positions, in_features, kept, group)
    starts = torch.arange(offsets.shape[1], device=offsets.device) // kept * group
    return offsets + starts


def nm_to_dense(values: torch.Tensor, positions: torch.Tensor, in_features: int, kept: int,
                group: int) -> torch.Tensor:
    """The dense ``[out, in]`` weight (zeros at pruned positions) in ``values``' dtype."""
    dense = torch.zeros(values.shape[0], in_features, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, nm_columns(positions, in_features, kept, group), values)


def unpack_positions(positions: torch.Tensor, in_features: int, kept: int, group: int) -> torch.Tensor:
    """Decode the packed uint8 bit streams to one offset per stored value, ``[out, in·kept/group]`` int64."""
    bits, count = position_bits(group), kept_per_row(in_features, kept, group)
    stream = (positions.long().unsqueeze(-1) >> torch.arange(8, device=positions.device)) & 1  # [out, bytes, 8]
    stream = stream.flatten(1)[:, :count * bits].view(positions.shape[0], count, bits)
    weights = 1 << torch.arange(bits, device=positions.device)
    return (stream * weights).sum(dim=-1)


def pack_positions(offsets: torch.Tensor, group: int) -> torch.Tensor:
    """Pack per-value offsets ``[out, count]`` (each < group) into uint8 bit streams, one per row."""
    bits = position_bits(group)
    rows, count = offsets.shape
    stream = ((offsets.long().unsqueeze(-1) >> torch.arange(bits, device=offsets.device)) & 1).flatten(1)
    padded = torch.zeros(rows, (count * bits + 7) // 8 * 8, dtype=torch.long, device=offsets.device)
    padded[:, :count * bits] = stream
    byte_weights = 1 << torch.arange(8, device=offsets.device)
    return (padded.view(rows, -1, 8) * byte_weights).sum(dim=-1).to(torch.uint8)


def nm_mask(weight: torch.Tensor, kept: int, group: int) -> torch.Tensor:
    """Bool mask ``[out, in]`` keeping the ``kept`` largest |entries| of every ``group`` consecutive inputs of a row.

    Ties go to the lower offset, so the mask is deterministic (and an all-zero group keeps its
    first ``kept`` positions). Pruners apply it to their own scores (|W|·‖x‖ for Wanda).
    """
    out, in_features = weight.shape
    if in_features % group or not 0 < kept <= group:
        raise ValueError(f"cannot keep {kept} of every {group} inputs of a [{out}, {in_features}] weight")
    grouped = weight.abs().reshape(out, in_features // group, group)
    order = torch.argsort(grouped, dim=2, descending=True, stable=True)[:, :, :kept]
    mask = torch.zeros(grouped.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(2, order, True)
    return mask.view(out, in_features)


def pack_nm(weight: torch.Tensor, kept: int, group: int, *, module: str = "weight") -> dict[str, torch.Tensor]:
    """The ``nm`` tensors (``values``, ``positions``) of a dense ``[out, in]`` weight whose zeros follow kept:group.

    A group with fewer than ``kept`` nonzeros is padded with explicit zeros at its lowest unused
    offsets. Raises :class:`CheckpointError` naming ``module`` and the first row and group holding
    more than ``kept`` nonzeros (the weight was not pruned to this pattern).
    """
    out, in_features = weight.shape
    if in_features % group or not 0 < kept <= group or group > MAX_GROUP:
        raise CheckpointError(f"[{out}, {in_features}] weight cannot be stored as {kept}:{group}", tensor=module,
                              expected=f"0 < kept <= group <= {MAX_GROUP} and in_features a multiple of group")
    nonzero = (weight != 0).reshape(out, in_features // group, group)
    excess = nonzero.sum(dim=2) > kept
    if excess.any():
        row, grp = (int(i) for i in excess.nonzero()[0])
        raise CheckpointError(
            f"row {row}, group {grp} (inputs {grp * group}..{grp * group + group - 1}) has "
            f"{int(nonzero[row, grp].sum())} nonzeros", tensor=module,
            expected=f"at most {kept} nonzeros in every group of {group} consecutive inputs ({kept}:{group})")
    # Nonzeros first, then zeros, each in offset order (stable): the lowest unused offsets pad.
    chosen = torch.argsort(nonzero.to(torch.int8), dim=2, descending=True, stable=True)[:, :, :kept]
    offsets, _ = torch.sort(chosen, dim=2)
    values = torch.gather(weight.reshape(out, -1, group), 2, offsets).reshape(out, -1)
    return {"values": values.contiguous(), "positions": pack_positions(offsets.reshape(out, -1), group)}
