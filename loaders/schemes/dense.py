"""``dense``: an ordinary ``weight [out, in]``; modules not listed in the config are dense too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from slimserve.loaders.schemes.base import Scheme, TensorSpec


class DenseScheme(Scheme):
    name = "dense"

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        return [TensorSpec("weight", (spec["out_features"], spec["in_features"]), out_dim=0, in_dim=1)]

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float()
