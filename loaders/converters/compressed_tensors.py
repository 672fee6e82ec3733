"""``slimserve convert --from compressed-tensors``: llm-compressor's sparse checkpoints to the ``nm`` scheme.

vLLM dropped its 2:4 path in 2026, so 2:4 checkpoints published in compressed-tensors' formats
have no engine; this converter gives them slimserve's. ``config.json`` carries
``quantization_config.sparsity_config.format`` (older exports: ``compression_config``), one of:

- ``sparse-24-bitmask`` (also written ``sparse-24``): per compressed linear ``M`` (the weight's
  name without ``.weight``): ``M.shape`` int64 ``[2, 1]`` (rows, cols), ``M.compressed``
  ``[rows, cols/2]`` the kept values row-major in the weight dtype, ``M.bitmask`` uint8
  ``[rows, ceil(cols/8)]``: bit b (least significant first) of byte j of a row flags column
  ``8j + b`` as kept (numpy ``packbits(bitorder="little")``). Every group of 4 has exactly two
  bits set, even where a kept value is zero.
- ``sparse-bitmask`` (any sparsity): ``M.shape`` int64 ``[2]``, ``M.compressed`` 1-D, the nonzeros
  row-major, the same ``M.bitmask``, and ``M.row_offsets`` int64 ``[rows]`` (where each row's
  values start). Some exports keep ``.weight`` in the prefix (``M.weight.compressed``): both are read.

Each decoder linear is decoded to its dense weight; its N:M pattern is the one of
``sparsity_structure`` when that names one ("2:4"), else detected (``converters/nm.py``). A linear
whose decoded zeros follow no N:M pattern is refused, naming the tensor (store it unstructured
elsewhere). Tensors outside ``targets`` stay ordinary dense ones. Quantized compressed-tensors
checkpoints (``config_groups``) are refused: slimserve stores float values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CONFIG_FILE, Checkpoint, CheckpointWriter, copy_aux_files, open_checkpoint
from slimserve.loaders.config import model_sizes
from slimserve.loaders.converters.factors import check_dense_linear
from slimserve.loaders.converters.nm import detect_pattern
from slimserve.loaders.models import DECODER_LINEAR, check_architecture, linear_shape
from slimserve.loaders.schemes.nm import pack_nm

SPARSE_24 = ("sparse-24-bitmask", "sparse-24")
SPARSE_BITMASK = "sparse-bitmask"
_PART = re.compile(r"^(?P<prefix>.+?)(?:\.weight)?\.(?P<part>compressed|bitmask|shape|row_offsets)$")


def unpack_bitmask(bitmask: torch.Tensor, columns: int) -> torch.Tensor:
    """uint8 ``[rows, ceil(columns/8)]``, least significant bit first, to bool ``[rows, columns]``."""
    bits = (bitmask.long().unsqueeze(-1) >> torch.arange(8)) & 1
    return bits.flatten(1)[:, :columns].bool()


def read_sparsity_config(config: Mapping[str, Any], config_path: Path) -> dict[str, Any]:
    """The ``sparsity_config`` of a compressed-tensors config.json; refuses quantized or unknown formats."""
    for key in ("quantization_config", "compression_config"):
        qc = config.get(key)
        if isinstance(qc, dict) and isinstance(qc.get("sparsity_config"), dict):
            break
    else:
        raise CheckpointError("has no sparsity_config", file=config_path, field="quantization_config.sparsity_config",
                              expected="a compressed-tensors sparse checkpoint (llm-compressor, format "
                                       f"{' / '.join((*SPARSE_24, SPARSE_BITMASK))})")
    if qc.get("config_groups"):
        raise CheckpointError("is a quantized compressed-tensors checkpoint", file=config_path,
                              field=f"{key}.config_groups", expected="sparsity only (float weights)")
    sparsity = qc["sparsity_config"]
    if sparsity.get("format") not in (*SPARSE_24, SPARSE_BITMASK):
        raise CheckpointError(f"has format {sparsity.get('format')!r}", file=config_path,
                              field=f"{key}.sparsity_config.format",
                              expected=" or ".join((*SPARSE_24, SPARSE_BITMASK)))
    return sparsity


def _decode_24(parts: Mapping[str, str], ckpt: Checkpoint, shape: tuple[int, int]) -> torch.Tensor:
    rows, columns = shape
    if columns % 4:
        raise CheckpointError(f"has {columns} columns, not a multiple of 4", file=ckpt.path, tensor=parts["shape"],
                              expected="sparse-24-bitmask: whole groups of 4 inputs")
    values, bitmask = ckpt.tensor(parts["compressed"]), ckpt.tensor(parts["bitmask"])
    if tuple(values.shape) != (rows, columns // 2) or not values.is_floating_point():
        raise CheckpointError(f"has shape {list(values.shape)} and dtype {values.dtype}", file=ckpt.path,
                              tensor=parts["compressed"], expected=f"float [{rows}, {columns // 2}] (2 of every 4)")
    mask = _check_bitmask(bitmask, parts["bitmask"], ckpt, rows, columns)
    per_group = mask.view(rows, -1, 4).sum(dim=2)
    if bool((per_group != 2).any()):
        row, group = (int(i) for i in (per_group != 2).nonzero()[0])
        raise CheckpointError(f"row {row}, group {group} (inputs {4 * group}..{4 * group + 3}) flags "
                              f"{int(per_group[row, group])} columns", file=ckpt.path, tensor=parts["bitmask"],
                              expected="sparse-24-bitmask: exactly 2 bits set in every group of 4")
    dense = torch.zeros(rows, columns, dtype=values.dtype)
    dense[mask] = values.reshape(-1)
    return dense


def _decode_bitmask(parts: Mapping[str, str], ckpt: Checkpoint, shape: tuple[int, int]) -> torch.Tensor:
    rows, columns = shape
    values, bitmask = ckpt.tensor(parts["compressed"]), ckpt.tensor(parts["bitmask"])
    offsets = ckpt.tensor(parts["row_offsets"])
    mask = _check_bitmask(bitmask, parts["bitmask"], ckpt, rows, columns)
    counts = mask.sum(dim=1)
    if values.dim() != 1 or values.numel() != int(counts.sum()) or not values.is_floating_point():
        raise CheckpointError(f"has shape {list(values.shape)} and dtype {values.dtype}", file=ckpt.path,
                              tensor=parts["compressed"], expected=f"1-D float, one value per set bit "
                                                                   f"({int(counts.sum())})")
    if tuple(offsets.shape) != (rows,) or not torch.equal(offsets.long(), torch.cumsum(counts, 0) - counts):
        raise CheckpointError(f"has shape {list(offsets.shape)} or offsets not matching the bitmask's row counts",
                              file=ckpt.path, tensor=parts["row_offsets"],
                              expected=f"[{rows}] exclusive cumulative sum of each row's set bits")
    dense = torch.zeros(rows, columns, dtype=values.dtype)
    dense[mask] = values
    return dense


def _check_bitmask(bitmask: torch.Tensor, name: str, ckpt: Checkpoint, rows: int, columns: int) -> torch.Tensor:
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-columns // 8)):
        raise CheckpointError(f"has shape {list(bitmask.shape)} and dtype {bitmask.dtype}", file=ckpt.path,
                              tensor=name, expected=f"uint8 [{rows}, {-(-columns // 8)}]")
    return unpack_bitmask(bitmask, columns)


_DECODERS: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]] = {
    **{fmt: (("shape", "compressed", "bitmask"), _decode_24) for fmt in SPARSE_24},
    SPARSE_BITMASK: (("shape", "compressed", "bitmask", "row_offsets"), _decode_bitmask),
}


def convert_compressed_tensors(src: str | Path, out: str | Path) -> Path:
    """Decode every sparse decoder linear of a compressed-tensors checkpoint and store it as ``nm``."""
    ckpt = open_checkpoint(src)
    config_path = ckpt.path / CONFIG_FILE
    sparsity = read_sparsity_config(ckpt.config, config_path)
    check_architecture(ckpt.config, str(src))
    sizes = model_sizes(ckpt.config, config_path)
    required, decode = _DECODERS[sparsity["format"]]
    structure = str(sparsity.get("sparsity_structure") or "")
    fixed = tuple(int(n) for n in structure.split(":")) if re.fullmatch(r"\d+:\d+", structure) else None
    if fixed is not None and not 0 < fixed[0] < fixed[1]:
        fixed = None  # "0:0" means unstructured
    compressed: dict[str, dict[str, str]] = {}
    plain: list[str] = []
    for name in ckpt.tensors:
        match = _PART.match(name)
        if match and DECODER_LINEAR.match(f"{match.group('prefix')}.weight"):
            compressed.setdefault(match.group("prefix"), {})[match.group("part")] = name
        else:
            plain.append(name)
    if not compressed:
        raise CheckpointError(f"no {sparsity['format']} tensors found", file=ckpt.path,
                              expected="tensors named like 'model.layers.0.mlp.up_proj.compressed' / '.bitmask' / "
                                       "'.shape'")
    writer_config = {k: v for k, v in ckpt.config.items() if k != "compression_config"}
    producer = {"converted_from": "compressed-tensors", "format": sparsity["format"], "source": Path(src).name,
                "sparsity_structure": structure or None}
    writer = CheckpointWriter(out, writer_config, producer=producer)
    for name in sorted(plain):
        tensor = ckpt.tensor(name)
        if match := DECODER_LINEAR.match(name):
            check_dense_linear(name, tensor, sizes, file=str(ckpt.tensors[name].file))
            writer.add_module(match.group("module"), "dense", {"weight": tensor}, in_features=tensor.shape[1],
                              out_features=tensor.shape[0])
        else:
            writer.add_tensor(name, tensor)
    for module, parts in sorted(compressed.items()):
        for part in required:
            if part not in parts:
                raise CheckpointError("missing", file=ckpt.path, tensor=f"{module}.{part}",
                                      expected=f"{sparsity['format']}: {', '.join(f'{module}.{p}' for p in required)}")
        expected = linear_shape(sizes, module)
        shape = ckpt.tensor(parts["shape"]).flatten().tolist()
        if tuple(shape) != expected:
            raise CheckpointError(f"holds {shape}", file=ckpt.path, tensor=parts["shape"],
                                  expected=f"the layer's [out, in] = {list(expected)} (from config.json)")
        weight = decode(parts, ckpt, expected)
        # A declared structure must hold (pack_nm names the first row and group breaking it); else detect one.
        found = fixed or detect_pattern(weight, weight.element_size())
        if found is None:
            raise CheckpointError(
                f"decodes to a weight whose zeros follow no N:M pattern (structure {structure or 'not given'})",
                file=ckpt.path, tensor=parts["compressed"],
                expected="at most N nonzeros in every group of M consecutive inputs (e.g. 2:4)")
        kept, group = found
        writer.add_module(module, "nm", pack_nm(weight, kept, group, module=parts["compressed"]),
                          in_features=expected[1], out_features=expected[0], kept=kept, group=group)
    copy_aux_files(src, out)
    return writer.finish()
