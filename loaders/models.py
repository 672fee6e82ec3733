"""Which model architectures slimserve compresses, and which of their tensors are decoder linears."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from slimserve.errors import CompressionError
from slimserve.loaders.config import ModelSizes

# Architectures whose vLLM implementation loads per-projection tensors through the
# q/k/v -> qkv_proj and gate/up -> gate_up_proj stacking that the plugin understands.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# Projections that read the same input, by the fused layer vLLM stacks them into (in output
# order). The compressor keeps one calibration input per group (under its first member) and the
# vLLM plugin maps a fused layer back to its checkpoint modules, both from this one table.
FUSED_LAYERS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                            "gate_up_proj": ("gate_proj", "up_proj")}

DECODER_LINEAR = re.compile(r"^(?P<module>.*\.layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)\.weight$")


def shared_input_module(module: str) -> str:
    """The module whose input ``module`` reads: the first projection of its fused group, else itself."""
    head, _, proj = module.rpartition(".")
    first = next((group[0] for group in FUSED_LAYERS.values() if proj in group), proj)
    return f"{head}.{first}"


def check_architecture(config: Mapping[str, Any], source: str) -> str:
    """Return the model's architecture name, or raise naming the supported ones."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CompressionError(
            f"{source}/config.json: field 'architectures' is {archs!r}; slimserve compresses "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def decoder_linear_modules(tensor_names: Iterable[str]) -> list[str]:
    """Module names (without ``.weight``) of every decoder linear, in layer order."""
    modules = [m.group("module") for name in tensor_names if (m := DECODER_LINEAR.match(name))]
    return sorted(modules, key=_layer_order)


def _layer_order(module: str) -> tuple[int, str]:
    layer = int(re.search(r"\.layers\.(\d+)\.", module).group(1))
    return layer, module


def linear_shape(sizes: ModelSizes, module: str) -> tuple[int, int]:
    """The dense ``[out, in]`` shape of a decoder linear, from the model's config.json sizes."""
    q_width = sizes.num_attention_heads * sizes.head_dim
    kv_width = sizes.num_key_value_heads * sizes.head_dim
    hidden, inter = sizes.hidden_size, sizes.intermediate_size
    leaf = module.rsplit(".", 1)[-1]
    shapes = {
        "q_proj": (q_width, hidden), "k_proj": (kv_width, hidden), "v_proj": (kv_width, hidden),
        "o_proj": (hidden, q_width), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    return shapes[leaf]


# Every other tensor of the supported architectures whose shape config.json fixes (Qwen3's q/k norms act per head).
_VECTOR_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:^|\.)norm\.weight$"), "hidden_size"),
    (re.compile(r"\.layers\.\d+\.(?:input_layernorm|post_attention_layernorm)\.weight$"), "hidden_size"),
    (re.compile(r"\.layers\.\d+\.self_attn\.[qk]_norm\.weight$"), "head_dim"),
)
_EMBEDDING = re.compile(r"(?:^|\.)embed_tokens\.weight$|^lm_head\.weight$")
_LINEAR_BIAS = re.compile(r"^(?P<module>.*\.layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)\.bias$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def expected_tensor_shape(sizes: ModelSizes, name: str) -> tuple[int, ...] | None:
    """The shape config.json fixes for an ordinary (not compressed) tensor, or None for a name it does not cover."""
    if _EMBEDDING.search(name):
        return (sizes.vocab_size, sizes.hidden_size)
    if m := DECODER_LINEAR.match(name):
        return linear_shape(sizes, m.group("module"))
    if m := _LINEAR_BIAS.match(name):
        return (linear_shape(sizes, m.group("module"))[0],)
    for pattern, size in _VECTOR_SHAPES:
        if pattern.search(name):
            return (getattr(sizes, size),)
    return None


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor or module belongs to (``model.layers.N.…``), or None."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None
