"""``slimserve convert --from nm``: a dense HF checkpoint whose decoder-linear zeros already follow N:M.

Models trained or pruned to N:M elsewhere (SR-STE, CAST, progressive gradient flow, llm-compressor
saved dense) ship ordinary dense weights in which every group of M consecutive inputs of a row
holds at most N nonzeros. Stored dense they cost the full bytes; this converter re-encodes each
such linear as the ``nm`` scheme, bit-exactly (``-0.0`` counts as zero).

With ``--pattern N:M`` every decoder linear following it is converted. Without, each linear's
pattern is detected: for every group size of ``DETECTED_GROUPS`` dividing its input width, N =
the most nonzeros any group holds, and the pattern storing the fewest bytes wins (2:4 weights
are also 4:8 and 8:16; 2:4 stores least). Linears that do not follow the pattern (or no pattern
smaller than dense) stay dense and are listed in the producer record, which the CLI prints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CONFIG_FILE, CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.compress.prune import parse_pattern
from slimserve.loaders.config import model_sizes
from slimserve.loaders.converters.factors import check_dense_linear
from slimserve.loaders.models import DECODER_LINEAR, check_architecture
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.nm import pack_nm

#: Group sizes tried when no pattern is given (N:M hardware and training recipes use these).
DETECTED_GROUPS = (4, 8, 16)


def most_nonzeros_per_group(weight: torch.Tensor, group: int) -> int:
    """The largest count of nonzeros in any ``group`` consecutive inputs of any row."""
    return int((weight != 0).view(weight.shape[0], -1, group).sum(dim=2).max())


def detect_pattern(weight: torch.Tensor, float_bytes: int) -> tuple[int, int] | None:
    """The (kept, group) storing ``weight`` in the fewest bytes; None when every pattern costs dense bytes or more."""
    out_features, in_features = weight.shape
    best, best_bytes = None, out_features * in_features * float_bytes
    for group in DETECTED_GROUPS:
        if in_features % group:
            continue
        kept = max(1, most_nonzeros_per_group(weight, group))
        if kept >= group:
            continue
        spec = {"in_features": in_features, "out_features": out_features, "kept": kept, "group": group}
        stored = SCHEMES["nm"].stored_bytes(spec, float_bytes)
        if stored < best_bytes:
            best, best_bytes = (kept, group), stored
    return best


def convert_nm(src: str | Path, out: str | Path, pattern: str | None = None) -> Path:
    """Re-encode the N:M-sparse decoder linears of the dense model ``src`` as ``nm`` modules in ``out``."""
    fixed = parse_pattern(pattern) if pattern is not None else None
    ckpt = open_checkpoint(src)
    if ckpt.quantization_config is not None:
        raise CheckpointError("is already a slimserve checkpoint", file=ckpt.path / CONFIG_FILE,
                              expected="a dense Hugging Face model folder whose zeros follow N:M")
    check_architecture(ckpt.config, str(src))
    sizes = model_sizes(ckpt.config, ckpt.path / CONFIG_FILE)
    producer = {"converted_from": "nm", "source": Path(src).name, "pattern": pattern or "detected per module"}
    writer = CheckpointWriter(out, ckpt.config, producer=producer)
    dense_modules: list[str] = []
    patterns: dict[str, int] = {}
    for name, tensor in iter_tensors(ckpt):
        match = DECODER_LINEAR.match(name)
        if match is None:
            writer.add_tensor(name, tensor)
            continue
        check_dense_linear(name, tensor, sizes, file=str(ckpt.tensors[name].file))
        module = match.group("module")
        out_features, in_features = tensor.shape
        if fixed is None:
            found = detect_pattern(tensor, tensor.element_size())
        else:
            kept, group = fixed
            follows = in_features % group == 0 and most_nonzeros_per_group(tensor, group) <= kept
            found = fixed if follows else None
        if found is None:
            dense_modules.append(module)
            writer.add_module(module, "dense", {"weight": tensor}, in_features=in_features, out_features=out_features)
            continue
        kept, group = found
        writer.add_module(module, "nm", pack_nm(tensor, kept, group, module=name), in_features=in_features,
                          out_features=out_features, kept=kept, group=group)
        patterns[f"{kept}:{group}"] = patterns.get(f"{kept}:{group}", 0) + 1
    if not patterns:
        raise CheckpointError(
            f"no decoder linear follows {pattern if pattern else 'any N:M pattern'} "
            f"(groups tried: {pattern or ', '.join(map(str, DETECTED_GROUPS))})", file=ckpt.path,
            expected="decoder linear weights with at most N nonzeros in every M consecutive inputs of a row")
    writer.producer.update({"modules_per_pattern": patterns, "dense_modules": dense_modules})
    copy_aux_files(src, out)
    return writer.finish()
