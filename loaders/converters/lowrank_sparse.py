"""Low-rank + sparse state dicts (SLTrain, LOST, OATS exports) to ``lowrank_sparse`` checkpoints.

Such projects store every decoder linear as ``W = B·A + S`` with ``B [out, r]``, ``A [r, in]``
and S written **dense with zeros** ``[out, in]`` (or, SLTrain, as flat indices + values).
Stored like that a layer is larger than dense; the converter re-encodes S with ``nnz`` = the
largest nonzero count of any row, padding the other rows with explicit zeros on their lowest
unused columns (so ragged rows cost ``max − own`` extra entries each; the producer record
gives the overhead as ``s_padding``), in the encoding with fewer bytes.

Accepted names per module ``M`` (any prefix before ``layers.N`` is matched to the base model):

| part | names |
|---|---|
| B ``[out, r]`` | ``M.B``, ``M.U`` (OATS), ``M.lora_B`` / ``M.lora_B.weight`` (SLTrain, PEFT) |
| A ``[r, in]`` | ``M.A``, ``M.V`` (OATS), ``M.lora_A`` / ``M.lora_A.weight`` |
| S | ``M.S`` dense ``[out, in]``, or ``M.sparse_index`` (int, flat row-major into out·in) + ``M.sparse_value`` |

SLTrain scales the product by ``lora_alpha / r``: when ``lora_*`` tensors are present the
scale is read from ``splora_config.json`` next to the state dict and folded into A. ``--base``
is the dense model: its config, tokenizer and every tensor the state dict does not replace.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CONFIG_FILE, CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.config import model_sizes
from slimserve.loaders.converters.factors import check_dense_linear, check_pair_shapes
from slimserve.loaders.converters.svdllm import load_state_dict
from slimserve.loaders.models import DECODER_LINEAR, check_architecture, linear_shape
from slimserve.loaders.schemes.lowrank_sparse import encode_sparse, sparse_encoding

_PART = re.compile(r"^(?P<module>(?:.*\.)?layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)\."
                   r"(?P<part>.+)$")
PART_NAMES = {"B": "second", "U": "second", "lora_B": "second", "lora_B.weight": "second",
              "A": "first", "V": "first", "lora_A": "first", "lora_A.weight": "first",
              "S": "sparse", "sparse_index": "sparse_index", "sparse_value": "sparse_value"}
STATE_SUFFIXES = (".safetensors", ".pt", ".bin")
SLTRAIN_CONFIG = "splora_config.json"


def read_state(src: Path) -> dict[str, torch.Tensor]:
    """One state dict from a file, or merged from every ``*.safetensors``/``*.pt``/``*.bin`` file of a folder."""
    if not src.is_dir():
        return load_state_dict(src)
    files = sorted(p for p in src.iterdir() if p.suffix in STATE_SUFFIXES)
    if not files:
        raise CheckpointError("holds no state dict file", file=src,
                              expected=f"a file ending in {', '.join(STATE_SUFFIXES)}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_state_dict(file).items():
            if name in state:
                raise CheckpointError("stored twice", file=file, tensor=name, expected="each tensor in one file")
            state[name] = tensor
    return state


def _sltrain_scale(src: Path) -> float:
    config = (src if src.is_dir() else src.parent) / SLTRAIN_CONFIG
    if not config.is_file():
        raise CheckpointError("missing: the state dict has lora_A/lora_B factors (SLTrain), whose product is scaled "
                              "by lora_alpha / r", file=config, expected="SLTrain's splora_config.json with 'r' and "
                                                                         "'lora_alpha' beside the state dict")
    try:
        fields = json.loads(config.read_text())
        return float(fields["lora_alpha"]) / float(fields["r"])
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as err:
        raise CheckpointError(f"unreadable ({type(err).__name__}: {err})", file=config,
                              expected="a JSON object with numeric 'r' and 'lora_alpha'") from None


def _base_name(name: str, base_names: set[str]) -> str | None:
    """``name`` with leading components dropped until it names a base tensor (``wrapped.model.x`` -> ``model.x``)."""
    parts = name.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in base_names:
            return candidate
    return None


def dense_sparse_part(parts: dict[str, torch.Tensor], module: str, shape: tuple[int, int], file: str) -> torch.Tensor:
    """S as a dense ``[out, in]`` float matrix, from ``S`` or from SLTrain's flat ``sparse_index``/``sparse_value``."""
    out_features, in_features = shape
    if "sparse" in parts:
        sparse = parts["sparse"]
        if tuple(sparse.shape) != shape or not sparse.is_floating_point():
            raise CheckpointError(f"has shape {list(sparse.shape)} and dtype {sparse.dtype}", file=file,
                                  tensor=f"{module}.S", expected=f"a float matrix of shape {list(shape)}, dense with "
                                                                 "zeros")
        return sparse.float()
    if "sparse_index" not in parts or "sparse_value" not in parts:
        raise CheckpointError("missing", file=file, tensor=f"{module}.S",
                              expected="the sparse part: M.S dense [out, in], or M.sparse_index + M.sparse_value")
    index, value = parts["sparse_index"], parts["sparse_value"]
    if index.dim() != 1 or value.shape != index.shape or index.is_floating_point() or not value.is_floating_point():
        raise CheckpointError(f"sparse_index {list(index.shape)} {index.dtype}, sparse_value {list(value.shape)} "
                              f"{value.dtype}", file=file, tensor=f"{module}.sparse_index",
                              expected="1-D integer indices and float values of the same length")
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= out_features * in_features):
        raise CheckpointError(f"holds an index outside [0, {out_features * in_features})", file=file,
                              tensor=f"{module}.sparse_index", expected="flat row-major indices into the [out, in] "
                                                                        "weight")
    dense = torch.zeros(out_features * in_features)
    dense.index_put_((index,), value.float(), accumulate=True)
    return dense.view(out_features, in_features)


def convert_lowrank_sparse(src: str | Path, out: str | Path, base: str | Path) -> Path:
    """Write ``out``: every decoder linear with B/A/S in ``src`` as ``lowrank_sparse``, the rest from ``base``."""
    src = Path(src)
    state = read_state(src)
    base_ckpt = open_checkpoint(base)
    check_architecture(base_ckpt.config, str(base))
    sizes = model_sizes(base_ckpt.config, base_ckpt.path / CONFIG_FILE)
    dtype = base_ckpt.float_dtype or torch.float32
    base_names = set(base_ckpt.tensors)
    base_modules = {m.group("module") for n in base_names if (m := DECODER_LINEAR.match(n))}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _PART.match(name)
        module = _base_name(m.group("module") + ".weight", base_names) if m else None
        if m and module is not None and m.group("part") in PART_NAMES:
            grouped.setdefault(module.removesuffix(".weight"), {})[PART_NAMES[m.group("part")]] = tensor
        elif (target := _base_name(name, base_names)) is not None:
            if DECODER_LINEAR.match(target):
                check_dense_linear(target, tensor, sizes, file=str(src))
            elif tuple(tensor.shape) != base_ckpt.tensors[target].shape:
                raise CheckpointError(f"has shape {list(tensor.shape)}", file=src, tensor=name,
                                      expected=f"the base model's shape {list(base_ckpt.tensors[target].shape)}")
            replaced[target] = tensor
        else:
            raise CheckpointError("matches neither a tensor of the base model nor a low-rank + sparse factor",
                                  file=src, tensor=name,
                                  expected=f"per decoder linear M: M.{{{', '.join(PART_NAMES)}}}, or a base tensor")
    if not grouped:
        raise CheckpointError("no low-rank + sparse factors found", file=src,
                              expected="tensors named like 'model.layers.0.self_attn.q_proj.B' / '.A' / '.S'")
    scale = _sltrain_scale(src) if any(k.startswith("lora_") for k in state_parts(state)) else 1.0
    writer = CheckpointWriter(out, base_ckpt.config, producer={"converted_from": "lowrank-sparse", "source": src.name})
    stored = true_nonzeros = 0
    for module, parts in sorted(grouped.items()):
        shape = linear_shape(sizes, module)
        for part, names in (("second", "B, U or lora_B"), ("first", "A, V or lora_A")):
            if part not in parts:
                raise CheckpointError("missing", file=src, tensor=f"{module}.{names.split(',')[0]}",
                                      expected=f"both low-rank factors ({names})")
        first, second = parts["first"], parts["second"]
        check_pair_shapes(module, first, second, shape, file=str(src), first_name=f"{module}.A",
                          second_name=f"{module}.B", layout="B [out, r] and A [r, in] with W = B·A + S")
        sparse = dense_sparse_part(parts, module, shape, str(src))
        if not torch.isfinite(sparse).all():
            raise CheckpointError("has NaN or Inf values", file=src, tensor=f"{module}.S", expected="finite values")
        row_counts = (sparse != 0).sum(dim=1)
        nnz = max(1, int(row_counts.max()))
        stored += nnz * shape[0]
        true_nonzeros += int(row_counts.sum())
        tensors = {"u": second.to(dtype), "v": (first.float() * scale).to(dtype),
                   **{k: v.to(dtype) if v.is_floating_point() else v
                      for k, v in encode_sparse(sparse, nnz).items()}}
        writer.add_module(module, "lowrank_sparse", tensors, in_features=shape[1], out_features=shape[0],
                          rank=second.shape[1], nnz=nnz,
                          encoding=sparse_encoding(shape[0], shape[1], nnz))
    missing = sorted(m for m in base_modules if m not in grouped and f"{m}.weight" not in replaced)
    writer.producer["s_padding"] = round(stored / max(true_nonzeros, 1), 4)
    for name, tensor in replaced.items():
        if (m := DECODER_LINEAR.match(name)) and m.group("module") not in grouped:
            writer.add_module(m.group("module"), "dense", {"weight": tensor.to(dtype)},
                              in_features=tensor.shape[1], out_features=tensor.shape[0])
        elif not m:
            writer.add_tensor(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    for name, tensor in iter_tensors(base_ckpt):
        module = m.group("module") if (m := DECODER_LINEAR.match(name)) else None
        if name in replaced or module in grouped:
            continue
        if module in missing:
            writer.add_module(module, "dense", {"weight": tensor}, in_features=tensor.shape[1],
                              out_features=tensor.shape[0])
        else:
            writer.add_tensor(name, tensor)
    copy_aux_files(base, out)
    return writer.finish()


def state_parts(state: dict[str, torch.Tensor]) -> list[str]:
    """The factor part names (after the module) present in ``state``."""
    return [m.group("part") for name in state if (m := _PART.match(name))]
