"""Read, write and validate slimserve checkpoints (the format is specified in FORMAT.md).

A slimserve checkpoint is an ordinary Hugging Face model folder: ``config.json`` with a
``quantization_config`` of ``quant_method: "slimserve"`` that lists every decoder linear
module and its scheme, and safetensors files holding each module's tensors. Reading is
lazy (tensor headers first, values one module at a time) so a checkpoint larger than
memory can still be validated, densified or inspected.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimserve.errors import CheckpointError
from slimserve.loaders.config import ModelSizes, model_sizes, read_json_object
from slimserve.loaders.models import DECODER_LINEAR, expected_tensor_shape, layer_index, linear_shape
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.base import FLOAT_DTYPES, INDEX_DTYPES

QUANT_METHOD = "slimserve"
FORMAT_VERSION = 2
# 1: dictsparse entries have no "encoding" (always ELL, int16/int32 indices); 2: adds it (uint8 indices, bitmask)
SUPPORTED_FORMAT_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Files copied verbatim from a source model folder: tokenizer, generation defaults, chat template.
AUX_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*",
                     "vocab.*", "merges.txt", "*.model")

_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Elements checked for NaN/Inf at a time: bounds the temporary mask for a multi-GiB embedding.
_FINITE_CHUNK = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    """Header of one stored tensor: which file holds it, its shape and dtype."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A model folder opened for lazy reading. ``modules`` is empty for a plain dense model."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The model dtype declared in config.json (``dtype`` or the older ``torch_dtype``)."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        return _CONFIG_DTYPES.get(str(name)) if name else None

    def tensor(self, name: str) -> torch.Tensor:
        """Load one tensor by name."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError("tensor not found", file=self.path, tensor=name)
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """Load every stored tensor of one compressed module, keyed by suffix (``u``, ``v``, ...)."""
        spec = self.modules[module]
        return {t.suffix: self.tensor(f"{module}.{t.suffix}") for t in SCHEMES[spec["scheme"]].tensor_specs(spec)}

    def reconstruct(self, module: str) -> torch.Tensor:
        """Dense ``[out, in]`` float32 weight of a module, whatever its scheme."""
        spec = self.modules[module]
        return SCHEMES[spec["scheme"]].reconstruct(spec, self.module_tensors(module))

    def module_of(self, tensor_name: str) -> str | None:
        """The listed module whose scheme stores this tensor, or None (ordinary tensors, biases)."""
        module, _, suffix = tensor_name.rpartition(".")
        spec = self.modules.get(module)
        if spec is None:
            return None
        return module if suffix in {t.suffix for t in SCHEMES[spec["scheme"]].tensor_specs(spec)} else None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model folder: parse config.json and the safetensors headers (no values are read)."""
    root = Path(path)
    config_path = root / CONFIG_FILE
    if not root.is_dir():
        raise CheckpointError("not a directory", file=root, expected="a Hugging Face model folder")
    if not config_path.is_file():
        raise CheckpointError("missing", file=config_path, expected="config.json in the model folder")
    config = read_json_object(config_path, expected="the model's config.json: a JSON object of fields")
    ckpt = Checkpoint(path=root, config=config, tensors=_read_headers(root))
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        ckpt.modules = parse_modules(qc, config_path)
    return ckpt


def _read_headers(root: Path) -> dict[str, TensorInfo]:
    """Every tensor's header, from the files the index names (or every ``*.safetensors`` without one).

    Index entries are confined to the folder (no absolute path, no ``..``) before any file is
    opened; a tensor stored in two files, or missing from the file the index names, is refused,
    because which copy an engine loads would depend on its file order.
    """
    index_path = root / INDEX_FILE
    listed: dict[str, Path] | None = None
    if index_path.is_file():
        index = read_json_object(index_path, expected='a JSON object with "weight_map": {tensor name: file name}')
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"is {type(weight_map).__name__ if weight_map is not None else 'missing'}",
                                  file=index_path, field="weight_map",
                                  expected="an object mapping each tensor name to a safetensors file in the folder")
        listed = {name: _confined_file(root, entry, index_path, name) for name, entry in weight_map.items()}
        files = sorted(set(listed.values()))
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no safetensors files", file=root, expected="model.safetensors or an index")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError("listed in the index but missing", file=file)
        for name, info in _file_headers(file).items():
            if name in tensors:
                raise CheckpointError(f"stored twice, in {tensors[name].file.name} and {file.name}", file=file,
                                      tensor=name, expected="each tensor name in exactly one safetensors file")
            tensors[name] = info
    for name, file in (listed or {}).items():
        if tensors.get(name) is None or tensors[name].file != file:
            raise CheckpointError(f"the index places tensor '{name}' in {file.name}, which does not hold it",
                                  file=index_path, field=f"weight_map.{name}",
                                  expected="every listed tensor stored in its listed file")
    return tensors


def _confined_file(root: Path, entry: object, index_path: Path, tensor: str) -> Path:
    """The shard an index entry names, refused unless it is a plain relative path inside the folder.

    The check is on the name, not on the resolved path: a Hugging Face cache snapshot's files are
    symlinks into a blob store outside the folder, and those stay loadable.
    """
    if not isinstance(entry, str) or not entry.endswith(".safetensors"):
        raise CheckpointError(f"file name {entry!r}", file=index_path, field=f"weight_map.{tensor}",
                              expected="the name of a .safetensors file in the model folder")
    pure = PurePosixPath(entry)
    if pure.is_absolute() or PureWindowsPath(entry).drive or "\\" in entry or ".." in pure.parts:
        raise CheckpointError(f"file name {entry!r} points outside the model folder", file=index_path,
                              field=f"weight_map.{tensor}", expected="a path inside the model folder")
    return root / pure


def _file_headers(file: Path) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor in one safetensors file (its header only)."""
    tensors = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                tensors[name] = (tuple(sl.get_shape()), sl.get_dtype())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"unreadable safetensors file: {err}", file=file,
                              expected="a complete safetensors file") from None
    infos = {}
    for name, (shape, dtype_name) in tensors.items():
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"has dtype {dtype_name}", file=file, tensor=name,
                                  expected=f"one of {', '.join(_SAFETENSORS_DTYPES)}")
        infos[name] = TensorInfo(file, shape, dtype)
    return infos


def parse_modules(qc: Mapping[str, Any], config_path: Path) -> dict[str, dict[str, Any]]:
    """The module entries of a ``quantization_config`` dict, after checking its header and every entry.

    Checks the format version, that every entry names a known scheme, has positive
    ``in_features``/``out_features`` and the scheme's own fields; reads no tensor. Engines that
    receive the quantization config without the folder (vLLM's ``from_config``) call this with
    the config dict; ``config_path`` is only named in errors. Raises ``CheckpointError``.
    """
    version = qc.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"unknown format_version {version!r}", file=config_path,
            field="quantization_config.format_version",
            expected=f"one of {list(SUPPORTED_FORMAT_VERSIONS)} (upgrade slimserve for newer checkpoints)",
        )
    modules = qc.get("modules")
    if not isinstance(modules, dict):
        raise CheckpointError("missing or not an object", file=config_path, field="quantization_config.modules",
                              expected="a mapping from module name to its scheme entry")
    parsed: dict[str, dict[str, Any]] = {}
    for name, spec in modules.items():
        where = f"quantization_config.modules.{name}"
        if not isinstance(spec, dict):
            raise CheckpointError("not an object", file=config_path, field=where)
        scheme = SCHEMES.get(spec.get("scheme"))
        if scheme is None:
            raise CheckpointError(f"unknown scheme {spec.get('scheme')!r}", file=config_path,
                                  field=f"{where}.scheme", expected=f"one of {sorted(SCHEMES)}")
        for dim in ("in_features", "out_features"):
            value = spec.get(dim)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{dim}={value!r}", file=config_path, field=f"{where}.{dim}",
                                      expected="a positive integer")
        scheme.check_fields(name, spec, str(config_path))
        parsed[name] = dict(spec)
    return parsed


def validate_checkpoint(path: str | Path, check_values: bool = True) -> Checkpoint:
    """Check a slimserve checkpoint completely; raise ``CheckpointError`` at the first problem.

    Headers are checked first, for every tensor, before any value is read: each listed module
    against its scheme and against the layer shape config.json's sizes give, every other tensor
    (embeddings, norms, dense linears, biases) for a float dtype and the shape those sizes fix.
    Then, with ``check_values``, values are streamed one tensor (or one module) at a time and
    checked for NaN/Inf and the schemes' own rules (index ranges and order), so a checkpoint
    larger than memory validates too.
    """
    ckpt = open_checkpoint(path)
    config_path = ckpt.path / CONFIG_FILE
    if ckpt.quantization_config is None:
        raise CheckpointError("not a slimserve checkpoint", file=config_path, field="quantization_config",
                              expected=f'"quant_method": "{QUANT_METHOD}"')
    sizes = model_sizes(ckpt.config, config_path)
    float_dtype = ckpt.float_dtype
    for module, spec in ckpt.modules.items():
        _check_module_against_config(module, spec, sizes, config_path)
        _check_module_headers(ckpt, module, spec, float_dtype)
    ordinary = [name for name in ckpt.tensors if ckpt.module_of(name) is None]
    for name in ordinary:
        _check_ordinary_header(name, ckpt.tensors[name], sizes)
    if check_values:
        for module, spec in ckpt.modules.items():
            tensors = ckpt.module_tensors(module)
            files = {s: str(ckpt.tensors[f"{module}.{s}"].file) for s in tensors}
            for suffix, value in tensors.items():
                _check_finite(f"{module}.{suffix}", value, files[suffix])
            SCHEMES[spec["scheme"]].check_values(module, spec, tensors, files)
        for name, value in iter_tensors(ckpt, ordinary):
            _check_finite(name, value, ckpt.tensors[name].file)
    return ckpt


def _check_layer(name: str, sizes: ModelSizes, file: Path, field: str | None = None) -> None:
    layer = layer_index(name)
    if layer is not None and layer >= sizes.num_hidden_layers:
        raise CheckpointError(f"belongs to layer {layer}, but config.json has num_hidden_layers="
                              f"{sizes.num_hidden_layers}", file=file, tensor=None if field else name, field=field,
                              expected=f"layers 0..{sizes.num_hidden_layers - 1}")


def _check_module_against_config(module: str, spec: Mapping[str, Any], sizes: ModelSizes, config_path: Path) -> None:
    """A listed module must be a decoder linear of this model, with the shape config.json's sizes give it."""
    where = f"quantization_config.modules.{module}"
    if not DECODER_LINEAR.match(f"{module}.weight"):
        raise CheckpointError("is not a decoder linear", file=config_path, field=where,
                              expected="a name like 'model.layers.0.self_attn.q_proj'")
    _check_layer(module, sizes, config_path, field=where)
    out_features, in_features = linear_shape(sizes, module)
    if (spec["out_features"], spec["in_features"]) != (out_features, in_features):
        raise CheckpointError(
            f"declares [out_features, in_features] = [{spec['out_features']}, {spec['in_features']}]",
            file=config_path, field=where,
            expected=f"[{out_features}, {in_features}] from config.json's hidden_size={sizes.hidden_size}, "
                     f"intermediate_size={sizes.intermediate_size}, heads={sizes.num_attention_heads}/"
                     f"{sizes.num_key_value_heads}, head_dim={sizes.head_dim}")


def _check_module_headers(ckpt: Checkpoint, module: str, spec: Mapping[str, Any],
                          float_dtype: torch.dtype | None) -> None:
    """Presence, shape and dtype of a listed module's tensors, and no tensor its scheme does not store."""
    expected_names = set()
    for t in SCHEMES[spec["scheme"]].tensor_specs(spec):
        name = f"{module}.{t.suffix}"
        expected_names.add(name)
        info = ckpt.tensors.get(name)
        if info is None:
            raise CheckpointError("missing", file=ckpt.path, tensor=name,
                                  expected=f"a {t.kind} tensor of shape {list(t.shape)} ({spec['scheme']} scheme)")
        if info.shape != t.shape:
            raise CheckpointError(f"has shape {list(info.shape)}", file=info.file, tensor=name,
                                  expected=f"shape {list(t.shape)} for {spec['scheme']} {_describe(spec)}")
        if t.kind == "float":
            allowed = (float_dtype,) if float_dtype is not None else FLOAT_DTYPES
        else:
            allowed = INDEX_DTYPES
        if info.dtype not in allowed:
            raise CheckpointError(f"has dtype {info.dtype}", file=info.file, tensor=name,
                                  expected=f"dtype {' or '.join(str(d) for d in allowed)}")
    leftovers = [n for n in ckpt.tensors if n.rsplit(".", 1)[0] == module and n not in expected_names
                 and not n.endswith(".bias")]
    if leftovers:
        raise CheckpointError(f"unexpected tensor for a {spec['scheme']} module",
                              file=ckpt.tensors[leftovers[0]].file,
                              tensor=leftovers[0], expected=f"only {sorted(expected_names)} (and a bias)")


def _check_ordinary_header(name: str, info: TensorInfo, sizes: ModelSizes) -> None:
    """A tensor outside the listed modules: a float dtype, and the shape config.json fixes for its name."""
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"has dtype {info.dtype}", file=info.file, tensor=name,
                              expected=f"a float dtype ({', '.join(str(d) for d in FLOAT_DTYPES)})")
    _check_layer(name, sizes, info.file)
    shape = expected_tensor_shape(sizes, name)
    if shape is not None and info.shape != shape:
        raise CheckpointError(f"has shape {list(info.shape)}", file=info.file, tensor=name,
                              expected=f"shape {list(shape)} from config.json (hidden_size={sizes.hidden_size}, "
                                       f"intermediate_size={sizes.intermediate_size}, vocab_size={sizes.vocab_size}, "
                                       f"head_dim={sizes.head_dim})")


def _check_finite(name: str, value: torch.Tensor, file: str | Path) -> None:
    """Refuse NaN or Inf, looking at a bounded slice at a time (index tensors are integers and skipped)."""
    if not value.is_floating_point():
        return
    flat = value.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if not torch.isfinite(chunk).all():
            bad = "NaN" if torch.isnan(chunk).any() else "Inf"
            raise CheckpointError(f"contains {bad}", file=file, tensor=name, expected="finite values")


def _describe(spec: Mapping[str, Any]) -> str:
    extras = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("scheme", "in_features", "out_features"))
    return f"[{spec['out_features']}, {spec['in_features']}]" + (f" with {extras}" if extras else "")


@dataclass(frozen=True)
class ModuleSummary:
    """Per-module sizes for ``inspect`` and the compression ratio."""

    name: str
    scheme: str
    shape: tuple[int, int]
    fields: dict[str, int | float]
    dense_params: int
    stored_params: int
    dense_bytes: int
    stored_bytes: int


def summarize(ckpt: Checkpoint) -> list[ModuleSummary]:
    """Sizes of every listed module; bytes use the checkpoint's float dtype (bf16 when unknown)."""
    float_bytes = (ckpt.float_dtype or torch.bfloat16).itemsize
    rows = []
    for name, spec in ckpt.modules.items():
        scheme = SCHEMES[spec["scheme"]]
        fields = {k: v for k, v in spec.items() if k not in ("scheme", "in_features", "out_features")}
        rows.append(ModuleSummary(
            name=name, scheme=spec["scheme"], shape=(spec["out_features"], spec["in_features"]), fields=fields,
            dense_params=spec["out_features"] * spec["in_features"], stored_params=scheme.stored_params(spec),
            dense_bytes=spec["out_features"] * spec["in_features"] * float_bytes,
            stored_bytes=scheme.stored_bytes(spec, float_bytes),
        ))
    return rows


def compression_summary(path: str | Path) -> dict[str, float]:
    """Overall compression of a model folder, counted over its listed decoder linears.

    ``ratio`` is the fraction of decoder-linear parameters removed (the papers' count: values
    only); ``bytes_ratio`` is the fraction of bytes removed with indices included. A dense
    model (no slimserve quantization_config) reports 0 for both.
    """
    ckpt = open_checkpoint(path)
    rows = summarize(ckpt)
    if not rows:
        return {"ratio": 0.0, "bytes_ratio": 0.0, "dense_params": 0, "stored_params": 0, "stored_bytes": 0}
    float_bytes = (ckpt.float_dtype or torch.bfloat16).itemsize
    dense = sum(r.dense_params for r in rows)
    stored = sum(r.stored_params for r in rows)
    stored_bytes = sum(r.stored_bytes for r in rows)
    return {
        "ratio": 1.0 - stored / dense,
        "bytes_ratio": 1.0 - stored_bytes / (dense * float_bytes),
        "dense_params": dense,
        "stored_params": stored,
        "stored_bytes": stored_bytes,
    }


class CheckpointWriter:
    """Stream tensors into safetensors shards and finish with config.json and an index.

    Tensors are buffered until ``shard_bytes`` and then written, so compressing a model layer
    by layer never holds more than one shard in memory.
    """

    def __init__(self, out_dir: str | Path, base_config: Mapping[str, Any], *,
                 producer: Mapping[str, Any] | None = None, shard_bytes: int = 2 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = {k: v for k, v in base_config.items() if k != "quantization_config"}
        self.producer = dict(producer or {})
        self.modules: dict[str, dict[str, Any]] = {}
        self.shard_bytes = shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self._weight_map: dict[str, str] = {}

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Add an ordinary tensor (embeddings, norms, biases, dense weights)."""
        if name in self._weight_map or name in self._buffer:
            raise ValueError(f"tensor {name!r} written twice")
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += tensor.numel() * tensor.element_size()
        if self._buffer_bytes >= self.shard_bytes:
            self._flush()

    def add_module(self, module: str, scheme: str, tensors: Mapping[str, torch.Tensor], *,
                   in_features: int, out_features: int, **fields: int | float | str) -> None:
        """Add one decoder linear in ``scheme`` with its tensors keyed by suffix (float and str fields kept as is)."""
        spec = {"scheme": scheme, "in_features": int(in_features), "out_features": int(out_features),
                **{k: v if isinstance(v, (float, str)) else int(v) for k, v in fields.items()}}
        # The scheme picks its stored layout (e.g. dictsparse's smallest coefficient encoding) here, for every writer.
        spec = SCHEMES[scheme].storage_spec(spec)
        tensors = SCHEMES[scheme].to_storage(spec, tensors)
        expected = {t.suffix for t in SCHEMES[scheme].tensor_specs(spec)}
        if set(tensors) != expected:
            raise ValueError(f"module {module!r} ({scheme}) got tensors {sorted(tensors)}, expected {sorted(expected)}")
        self.modules[module] = spec
        for suffix, value in tensors.items():
            self.add_tensor(f"{module}.{suffix}", value)

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self._shards)
        tmp_name = f"model-{index:05d}.safetensors.tmp"
        save_file(self._buffer, str(self.out_dir / tmp_name), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> Path:
        """Write the last shard, name the shards, write config.json (+ index when sharded)."""
        self._flush()
        total = len(self._shards)
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            (self.out_dir / f"model-{i:05d}.safetensors.tmp").rename(self.out_dir / final)
            for name in names:
                self._weight_map[name] = final
        if total > 1:
            index = {"metadata": {}, "weight_map": self._weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
        config = dict(self.config)
        if self.modules:
            config["quantization_config"] = {
                "quant_method": QUANT_METHOD,
                "format_version": FORMAT_VERSION,
                "producer": self.producer,
                "modules": self.modules,
            }
        (self.out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return self.out_dir


def copy_aux_files(src: str | Path, dst: str | Path) -> None:
    """Copy tokenizer and generation files from a source model folder."""
    src, dst = Path(src), Path(dst)
    for pattern in AUX_FILE_PATTERNS:
        for file in src.glob(pattern):
            if file.is_file():
                shutil.copy2(file, dst / file.name)


def iter_tensors(ckpt: Checkpoint, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every stored tensor (or those in ``names``), one file open and one tensor in memory at a time."""
    by_file: dict[Path, list[str]] = {}
    for name in ckpt.tensors if names is None else names:
        by_file.setdefault(ckpt.tensors[name].file, []).append(name)
    for file, file_names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                yield name, f.get_tensor(name)


def densify(src: str | Path, out: str | Path) -> Path:
    """Write an ordinary dense HF checkpoint of the reconstructed weights (for engines without the plugin)."""
    ckpt = validate_checkpoint(src)
    dtype = ckpt.float_dtype or torch.bfloat16
    writer = CheckpointWriter(out, ckpt.config)
    for name, tensor in iter_tensors(ckpt):
        if ckpt.module_of(name) is None:
            writer.add_tensor(name, tensor)
    for module in ckpt.modules:
        writer.add_tensor(f"{module}.weight", ckpt.reconstruct(module).to(dtype))
    copy_aux_files(ckpt.path, out)
    return writer.finish()


def human_bytes(n: float) -> str:
    """Format a byte count as KiB/MiB/GiB for reports."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}"
