"""What every weight scheme provides: its tensors, their validation, and a reference forward.

A scheme describes how one linear layer ``y = x Wᵀ (+ b)`` of shape ``[out, in]`` is stored.
The reference forward here is plain PyTorch: the ground truth every fast path (vLLM linear
methods, kernels) is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from slimserve.errors import CheckpointError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32)


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a scheme: its name suffix, shape, and for an index tensor its dtype.

    ``out_dim`` / ``in_dim`` name the axis indexed by the layer's output / input features, if
    any: tensor parallelism splits a column-parallel layer along ``out_dim`` and a row-parallel
    layer along ``in_dim``; a tensor without that axis is replicated.

    ``index_dtype`` is set exactly for index tensors: the dtype writers store and engines load
    them in, chosen by the scheme (which alone knows what the indices address), so byte counts,
    converters and the vLLM plugin never re-derive it. Float tensors take the checkpoint's dtype.
    """

    suffix: str
    shape: tuple[int, ...]
    out_dim: int | None = None
    in_dim: int | None = None
    index_dtype: torch.dtype | None = None

    @property
    def kind(self) -> str:
        """``"index"`` or ``"float"``: what validation and error messages call the tensor."""
        return "float" if self.index_dtype is None else "index"


class Scheme:
    """Base class of a weight scheme. Subclasses are stateless; per-module data lives in ``spec``.

    ``spec`` is the module's entry of ``quantization_config["modules"]`` (see FORMAT.md):
    it always carries ``scheme``, ``in_features`` and ``out_features`` plus scheme fields.
    """

    name: ClassVar[str]
    #: scheme-specific fields required in a module entry, e.g. ("rank",); the base ``check_fields``
    #: requires positive integers (non-negative for those in ``zero_allowed``); a scheme with other field
    #: types (floats) overrides it
    fields: ClassVar[tuple[str, ...]] = ()
    #: those of ``fields`` that may be 0 (the rest must be positive)
    zero_allowed: ClassVar[tuple[str, ...]] = ()

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        raise NotImplementedError

    def storage_spec(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``spec`` with the fields a writer fills in when the producer leaves them out.

        A scheme with a choice of stored layout (dictsparse's coefficient encoding) makes it here,
        from the sizes alone, so a byte count taken before writing (budgets, reports) sees the
        layout ``CheckpointWriter.add_module`` will store. The default adds nothing.
        """
        return dict(spec)

    def to_storage(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The producer's tensors converted to the layout ``spec`` (from ``storage_spec``) names; default as given."""
        return dict(tensors)

    def check_fields(self, module: str, spec: Mapping[str, Any], file: str) -> None:
        """Check scheme fields for range; ``spec`` already has positive in/out features."""
        for field in self.fields:
            value = spec.get(field)
            least = 0 if field in self.zero_allowed else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise CheckpointError(
                    f"module '{module}' has {field}={value!r}",
                    file=file, field=f"quantization_config.modules.{module}.{field}",
                    expected="a non-negative integer" if least == 0 else "a positive integer",
                )

    def check_values(self, module: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     files: Mapping[str, str]) -> None:
        """Scheme-specific value checks beyond shape, dtype and finiteness (e.g. index ranges)."""

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the dense weight ``[out, in]`` this module stands for (in float32)."""
        raise NotImplementedError

    def forward(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Reference ``y = x Ŵᵀ`` (without bias); the default goes through the dense reconstruction."""
        return x @ self.reconstruct(spec, tensors).to(x.dtype).t()

    def stored_params(self, spec: Mapping[str, Any]) -> int:
        """Parameters counted the way the papers count them: float values only, indices excluded."""
        return sum(_numel(t.shape) for t in self.tensor_specs(spec) if t.kind == "float")

    def stored_bytes(self, spec: Mapping[str, Any], float_bytes: int) -> int:
        """Bytes actually stored, indices included."""
        total = 0
        for t in self.tensor_specs(spec):
            itemsize = float_bytes if t.index_dtype is None else t.index_dtype.itemsize
            total += _numel(t.shape) * itemsize
        return total


def smallest_index_dtype(count: int) -> torch.dtype:
    """The narrowest of ``INDEX_DTYPES`` that can address ``count`` positions.

    uint8 up to 256 positions (indices 0..255), int16 up to 32767, else int32: the index bytes
    of a sparse layer weigh as much as its values at int16, so the narrowest type is the default.
    """
    if count <= 256:
        return torch.uint8
    return torch.int16 if count <= torch.iinfo(torch.int16).max else torch.int32


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
