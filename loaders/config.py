"""Reading a model folder's JSON files and the sizes its ``config.json`` declares, refusing malformed ones by name.

Kept free of torch so that ``slimserve serve`` can read a folder's config.json (to pick an
engine) without paying for the tensor stack first; every reader of a config.json or an index
goes through :func:`read_json_object`, so a list, a non-UTF-8 file or broken JSON is a
``CheckpointError`` naming the file, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.errors import CheckpointError


def read_json_object(path: str | Path, *, expected: str = "a JSON object") -> dict[str, Any]:
    """The JSON object stored at ``path``; ``expected`` says what the file should hold in the error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"unreadable ({err.strerror or err})", file=path, expected=expected) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"not UTF-8 text (byte {err.start})", file=path, expected=expected) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"invalid JSON: {err}", file=path, expected=expected) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"holds a JSON {type(value).__name__.replace('dict', 'object')}, not an object",
                              file=path, expected=expected)
    return value


@dataclass(frozen=True)
class ModelSizes:
    """The decoder sizes of a causal LM's config.json, every one a positive integer."""

    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


def _positive_int(config: Mapping[str, Any], name: str, file: str | Path, *, default: int | None = None) -> int:
    value = config.get(name)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        what = "missing" if value is None else f"is {value!r}"
        raise CheckpointError(what, file=file, field=name, expected="a positive integer")
    return value


def model_sizes(config: Mapping[str, Any], file: str | Path) -> ModelSizes:
    """The sizes every decoder tensor's shape follows from; ``file`` (the config.json) is named in errors.

    ``num_key_value_heads`` defaults to the attention heads and ``head_dim`` to
    ``hidden_size / num_attention_heads`` as transformers does; a hidden size the heads do not
    divide then needs an explicit ``head_dim``.
    """
    hidden = _positive_int(config, "hidden_size", file)
    heads = _positive_int(config, "num_attention_heads", file)
    kv_heads = _positive_int(config, "num_key_value_heads", file, default=heads)
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
                              file=file, field="num_key_value_heads", expected="a divisor of num_attention_heads")
    if config.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}", file=file,
                              field="head_dim", expected="an explicit head_dim")
    return ModelSizes(
        hidden_size=hidden,
        intermediate_size=_positive_int(config, "intermediate_size", file),
        vocab_size=_positive_int(config, "vocab_size", file),
        num_hidden_layers=_positive_int(config, "num_hidden_layers", file),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_positive_int(config, "head_dim", file, default=hidden // heads),
    )
