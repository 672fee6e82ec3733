"""Damaged copies of a checkpoint, for the tests that check each malformed case is named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file


def edited_copy(src: Path, dst: Path, *, tensors: Callable[[dict], None] | None = None,
                config: Callable[[dict], None] | None = None) -> Path:
    """Copy the single-file checkpoint ``src`` to ``dst``, letting ``tensors`` / ``config`` edit it in place."""
    shutil.copytree(src, dst)
    if tensors is not None:
        state = load_file(str(dst / "model.safetensors"))
        tensors(state)
        save_file(state, str(dst / "model.safetensors"))
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst
