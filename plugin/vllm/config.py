"""The ``slimserve`` quantization config: vLLM picks it from config.json's ``quant_method``.

It maps each vLLM linear layer (whose prefix may name a fused layer such as ``qkv_proj``)
back to the checkpoint modules it fuses and hands them to ``SlimserveLinearMethod``. Layers
whose modules are all dense keep vLLM's own unquantized method, so nothing is slower than
the dense original where nothing was compressed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CONFIG_FILE, QUANT_METHOD, parse_modules, validate_checkpoint
from slimserve.loaders.models import FUSED_LAYERS
from slimserve.plugin.vllm.linear import SlimserveLinearMethod


@register_quantization_config(QUANT_METHOD)
class SlimserveConfig(QuantizationConfig):
    """Per-module weight schemes of a slimserve checkpoint (see loaders/FORMAT.md)."""

    def __init__(self, modules: dict[str, dict[str, Any]], format_version: int) -> None:
        super().__init__()
        self.modules = modules
        self.format_version = format_version

    def __repr__(self) -> str:
        schemes: dict[str, int] = {}
        for spec in self.modules.values():
            schemes[spec["scheme"]] = schemes.get(spec["scheme"], 0) + 1
        return f"SlimserveConfig(format_version={self.format_version}, schemes={schemes})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # plain GEMMs and gathers: any device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SlimserveConfig:
        modules = parse_modules(config, Path(CONFIG_FILE))
        return cls(modules, int(config["format_version"]))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Check tensor names, shapes and dtypes before vLLM builds the model (values are not read)."""
        if Path(model_name).is_dir():
            validate_checkpoint(model_name, check_values=False)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        shard_modules = self._shard_modules(prefix)
        specs = [self.modules.get(m) for m in shard_modules]
        if all(s is None or s["scheme"] == "dense" for s in specs):
            return UnquantizedLinearMethod()
        missing = [m for m, s in zip(shard_modules, specs) if s is None]
        if missing:
            raise CheckpointError(f"fused layer {prefix} has compressed shards but no entry for {missing}",
                                  field="quantization_config.modules",
                                  expected="an entry (scheme dense at least) for every module of a fused layer")
        return SlimserveLinearMethod(shard_modules, specs)

    def _shard_modules(self, prefix: str) -> list[str]:
        parent, _, leaf = prefix.rpartition(".")
        # vLLM's mapping for the model when it set one, else the fused layers of the supported architectures.
        shards = (self.packed_modules_mapping or {}).get(leaf) or FUSED_LAYERS.get(leaf)
        if not shards:
            return [prefix]
        return [f"{parent}.{name}" if parent else name for name in shards]
