"""Test checkpoints whose decoder linears are magnitude-pruned to N:M patterns: stored as ``nm``, or
as llm-compressor stores them in compressed-tensors' sparse formats (for the converter)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import numpy
import torch
from safetensors.torch import load_file

from slimserve.loaders.checkpoint import CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.models import decoder_linear_modules
from slimserve.loaders.schemes.nm import nm_mask, pack_nm
from slimserve.testing.edit import edited_copy


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


def write_compressed_tensors(pruned_dense: Path, out: Path, fmt: str, *, keep_weight_suffix: bool = False,
                             edit: Callable[[dict], None] | None = None, structure: str = "2:4",
                             untargeted: Collection[str] = ()) -> dict:
    """``pruned_dense`` (a one-file HF model whose zeros follow 2:4) saved as llm-compressor does in ``fmt``
    (``sparse-24-bitmask`` or ``sparse-bitmask``); returns the dense weights.

    ``untargeted`` decoder linears stay ordinary dense weights; ``edit`` may change the state dict
    before it is written (malformed-tensor tests).
    """
    dense = load_file(str(pruned_dense / "model.safetensors"))

    def compress(state: dict) -> None:
        for module in decoder_linear_modules(list(state)):
            if module in untargeted:
                continue
            weight = state.pop(f"{module}.weight")
            prefix = f"{module}.weight" if keep_weight_suffix else module
            if fmt == "sparse-24-bitmask":
                # compressed-tensors' get_24_bytemasks: the top-2 |w| of each group of 4, zeros included.
                mask = nm_mask(weight, 2, 4)
                state[f"{prefix}.shape"] = torch.tensor(list(weight.shape)).reshape(-1, 1)
                state[f"{prefix}.compressed"] = weight[mask].reshape(weight.shape[0], -1)
            else:
                mask = weight != 0
                counts = mask.sum(dim=-1)
                state[f"{prefix}.shape"] = torch.tensor(list(weight.shape))
                state[f"{prefix}.compressed"] = weight[mask]
                state[f"{prefix}.row_offsets"] = torch.cumsum(counts, 0) - counts
            state[f"{prefix}.bitmask"] = torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little"))
        if edit is not None:
            edit(state)

    def config(cfg: dict) -> None:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": fmt, "config_groups": {},
            "sparsity_config": {"format": fmt, "sparsity_structure": structure, "targets": ["Linear"],
                                "ignore": ["lm_head"], "global_sparsity": 0.5}}

    edited_copy(pruned_dense, out, tensors=compress, config=config)
    return dense
