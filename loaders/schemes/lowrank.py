"""``lowrank``: W ≈ U·V with U [out, r] and V [r, in] (SVD, SVD-LLM, ROCKET with ks = 1).

The forward runs V first (``z = x Vᵀ``, r features), then U (``y = z Uᵀ``), so the work and
the bytes read scale with ``r·(out + in)`` instead of ``out·in``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes.base import Scheme, TensorSpec


class LowRankScheme(Scheme):
    name = "lowrank"
    fields = ("rank",)

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        r = spec["rank"]
        return [TensorSpec("u", (spec["out_features"], r), out_dim=0),
                TensorSpec("v", (r, spec["in_features"]), in_dim=1)]

    def check_fields(self, module: str, spec: Mapping[str, Any], file: str) -> None:
        super().check_fields(module, spec, file)
        limit = min(spec["out_features"], spec["in_features"])
        if spec["rank"] > limit:
            raise CheckpointError(
                f"module '{module}' has rank {spec['rank']} larger than the layer "
                f"[{spec['out_features']}, {spec['in_features']}]",
                file=file, field=f"quantization_config.modules.{module}.rank",
                expected=f"rank <= min(out, in) = {limit}",
            )

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["u"].float() @ tensors["v"].float()

    def forward(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (x @ tensors["v"].to(x.dtype).t()) @ tensors["u"].to(x.dtype).t()
