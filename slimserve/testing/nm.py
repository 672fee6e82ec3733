"""Test checkpoints whose decoder linears are magnitude-pruned to N:M patterns and stored as ``nm``."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from slimserve.loaders.checkpoint import CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.models import decoder_linear_modules
from slimserve.loaders.schemes.nm import nm_mask, pack_nm


def write_nm_checkpoint(dense_dir: Path, out: Path, *, pattern_of: Mapping[str, tuple[int, int]] | None = None,
                        dense_modules: Collection[str] = ()) -> Path:
    """Prune each decoder linear of ``dense_dir`` by magnitude to its (kept, group) pattern and store it as ``nm``.

    ``pattern_of`` maps modules to another pattern than 2:4; ``dense_modules`` are written as scheme
    ``dense`` instead (a fused layer lists every shard, so a dense shard must still be named).
    """
    pattern_of = pattern_of or {}
    ckpt = open_checkpoint(dense_dir)
    modules = decoder_linear_modules(ckpt.tensors)
    writer = CheckpointWriter(out, ckpt.config, producer={"method": "test-magnitude-nm"})
    for name, tensor in iter_tensors(ckpt):
        module = name.removesuffix(".weight")
        if module not in modules:
            writer.add_tensor(name, tensor)
            continue
        if module in dense_modules:
            writer.add_module(module, "dense", {"weight": tensor}, in_features=tensor.shape[1],
                              out_features=tensor.shape[0])
            continue
        kept, group = pattern_of.get(module, (2, 4))
        tensors = pack_nm(tensor * nm_mask(tensor, kept, group), kept, group, module=name)
        writer.add_module(module, "nm", tensors, in_features=tensor.shape[1], out_features=tensor.shape[0],
                          kept=kept, group=group)
    copy_aux_files(dense_dir, out)
    return writer.finish()
