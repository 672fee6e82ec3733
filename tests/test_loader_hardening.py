"""Malformed model folders and converter inputs, as a careless user or an attacker writes them (issue 13).

Every case must end in a ``CheckpointError`` naming the file and the tensor or field, and the
``slimserve validate`` / ``convert`` / ``serve`` commands must print it and exit 2, never a traceback.
"""

from __future__ import annotations

import ast
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimserve.loaders.checkpoint as checkpoint_module
from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CheckpointWriter, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.run import compress
from slimserve.loaders.converters import convert_svdllm
from slimserve.server.cli import main
from slimserve.testing.edit import edited_copy

REPO = Path(__file__).resolve().parents[1]
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def svd_ckpt(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compress(tiny_llama, tmp_path_factory.mktemp("svd") / "ckpt", ratio=0.3, progress=False)


def set_value(name: str, index: tuple[int, ...], value: float) -> Callable[[dict], None]:
    return lambda state: state[name].__setitem__(index, value)


# Tensors outside the listed modules: each edit and the words its error must contain.
ORDINARY_CASES = {
    "nan in embed_tokens": (dict(tensors=set_value(EMBED, (3, 5), float("nan"))), [f"tensor '{EMBED}'", "NaN"]),
    "inf in final norm": (dict(tensors=set_value("model.norm.weight", (0,), float("-inf"))),
                          ["tensor 'model.norm.weight'", "Inf"]),
    "nan in lm_head": (dict(tensors=set_value("lm_head.weight", (0, 0), float("nan"))), ["lm_head.weight", "NaN"]),
    "wrong-shape norm": (
        dict(tensors=lambda s: s.__setitem__("model.layers.1.input_layernorm.weight", torch.ones(255))),
        ["model.layers.1.input_layernorm.weight", "[255]", "expected shape [256]", "hidden_size=256"]),
    "embedding of another vocabulary": (dict(tensors=lambda s: s.__setitem__(EMBED, s[EMBED][:-7].clone())),
                                        [f"tensor '{EMBED}'", "vocab_size"]),
    "integer norm": (dict(tensors=lambda s: s.__setitem__("model.norm.weight", torch.ones(256, dtype=torch.int32))),
                     ["model.norm.weight", "torch.int32", "float dtype"]),
    "tensor of a layer the config lacks": (
        dict(tensors=lambda s: s.__setitem__("model.layers.7.input_layernorm.weight", torch.ones(256))),
        ["model.layers.7.input_layernorm.weight", "layer 7", "num_hidden_layers=2"]),
    "config hidden_size 4096": (dict(config=lambda c: c.__setitem__("hidden_size", 4096)),
                                ["quantization_config.modules.model.layers.0", "hidden_size=4096", "config.json"]),
    "config without hidden_size": (dict(config=lambda c: c.pop("hidden_size")),
                                   ["field 'hidden_size'", "missing", "positive integer", "config.json"]),
    "listed module that is not a decoder linear": (
        dict(config=lambda c: c["quantization_config"]["modules"].__setitem__(
            "lm_head", {"scheme": "dense", "in_features": 256, "out_features": 1024})),
        ["quantization_config.modules.lm_head", "not a decoder linear"]),
}


@pytest.mark.parametrize("case", sorted(ORDINARY_CASES))
def test_every_tensor_is_validated_against_config(case: str, svd_ckpt: Path, tmp_path: Path) -> None:
    edits, words = ORDINARY_CASES[case]
    broken = edited_copy(svd_ckpt, tmp_path / "broken", **edits)
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(broken)
    for word in words:
        assert word in str(info.value), f"{case}: {word!r} not in {info.value}"
    assert str(broken) in str(info.value)


def test_eight_by_eight_modules_in_a_4096_model_are_refused(tmp_path: Path) -> None:
    """The probe as written: consistent 8 x 8 lowrank tensors, but config.json says hidden_size 4096."""
    config = {"architectures": ["LlamaForCausalLM"], "dtype": "float32", "hidden_size": 4096,
              "intermediate_size": 11008, "vocab_size": 32000, "num_hidden_layers": 1, "num_attention_heads": 32}
    writer = CheckpointWriter(tmp_path / "ckpt", config)
    writer.add_module("model.layers.0.self_attn.q_proj", "lowrank", {"u": torch.ones(8, 2), "v": torch.ones(2, 8)},
                      in_features=8, out_features=8, rank=2)
    out = writer.finish()
    with pytest.raises(CheckpointError, match=r"declares \[out_features, in_features\] = \[8, 8\].*\[4096, 4096\]"):
        validate_checkpoint(out)
    assert main(["validate", str(out)]) == 2


def _shard(svd_ckpt: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """Copy a checkpoint as two shards with an index; returns the folder and its weight_map."""
    dst.mkdir()
    shutil.copy(svd_ckpt / "config.json", dst / "config.json")
    state = load_file(str(svd_ckpt / "model.safetensors"))
    names = sorted(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(dst / file))
        weight_map.update(dict.fromkeys(part, file))
    return dst, weight_map


def _write_index(folder: Path, weight_map: object) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_copy_validates(svd_ckpt: Path, tmp_path: Path) -> None:
    folder, weight_map = _shard(svd_ckpt, tmp_path / "sharded")
    _write_index(folder, weight_map)
    assert validate_checkpoint(folder).tensors.keys() == open_checkpoint(svd_ckpt).tensors.keys()


@pytest.mark.parametrize("entry", ["../outside/evil.safetensors", "/etc/hostname.safetensors",
                                   "sub/../../x.safetensors", "/etc/hostname"])
def test_weight_map_cannot_leave_the_folder(entry: str, svd_ckpt: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder, weight_map = _shard(svd_ckpt, tmp_path / "model")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(folder / "a.safetensors", outside / "evil.safetensors")  # would load fine if it were opened
    victim = next(name for name, file in weight_map.items() if file == "a.safetensors")
    _write_index(folder, {**weight_map, victim: entry})
    opened: list[Path] = []
    real_safe_open = checkpoint_module.safe_open

    def recording_safe_open(path: str, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "safe_open", recording_safe_open)
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(folder)
    assert f"field 'weight_map.{victim}'" in str(info.value) and "model.safetensors.index.json" in str(info.value)
    assert all(path.is_relative_to(folder.resolve()) for path in opened), opened


def test_duplicate_tensor_across_shards_is_refused(svd_ckpt: Path, tmp_path: Path) -> None:
    folder, weight_map = _shard(svd_ckpt, tmp_path / "model")
    extra = load_file(str(folder / "b.safetensors"))
    first = load_file(str(folder / "a.safetensors"))
    duplicated = next(iter(first))
    extra[duplicated] = first[duplicated]
    save_file(extra, str(folder / "b.safetensors"))
    _write_index(folder, weight_map)
    with pytest.raises(CheckpointError, match=rf"tensor '{duplicated}': stored twice, in a.safetensors and "
                                              r"b.safetensors"):
        open_checkpoint(folder)


def test_index_must_place_each_tensor_in_its_file(svd_ckpt: Path, tmp_path: Path) -> None:
    folder, weight_map = _shard(svd_ckpt, tmp_path / "model")
    victim = next(name for name, file in weight_map.items() if file == "a.safetensors")
    _write_index(folder, {**weight_map, victim: "b.safetensors"})
    with pytest.raises(CheckpointError, match=rf"field 'weight_map.{victim}'.*b.safetensors, which does not hold it"):
        open_checkpoint(folder)


MALFORMED_JSON = {
    "config.json is a list": ("config.json", b'[{"hidden_size": 4}]', "holds a JSON list, not an object"),
    "config.json is not UTF-8": ("config.json", '{"name": "caf\u00e9"}'.encode("latin-1"), "not UTF-8"),
    "config.json is empty": ("config.json", b"", "invalid JSON"),
    "index is a list": ("model.safetensors.index.json", b'["model.safetensors"]', "holds a JSON list"),
    "weight_map is a list": ("model.safetensors.index.json", b'{"weight_map": ["model.safetensors"]}',
                             "field 'weight_map': is list"),
    "weight_map is missing": ("model.safetensors.index.json", b'{"metadata": {}}', "field 'weight_map': is missing"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_JSON))
def test_malformed_json_files_are_named(case: str, svd_ckpt: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    file, content, words = MALFORMED_JSON[case]
    folder = tmp_path / "model"
    shutil.copytree(svd_ckpt, folder)
    (folder / file).write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(folder)
    assert str(folder / file) in str(info.value) and words in str(info.value), info.value
    assert main(["validate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimserve validate: error: ") and str(folder / file) in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe{", b'{"architectures": ', b'{"architectures": [1]}',
                                     b'{"architectures": "LlamaForCausalLM"}'])
def test_serve_on_a_malformed_config_exits_2(content: bytes, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_bytes(content)
    assert main(["serve", str(tmp_path), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimserve serve: error: ") and "config.json" in err


def test_validate_cli_names_nan_in_embeddings(svd_ckpt: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    broken = edited_copy(svd_ckpt, tmp_path / "broken", tensors=set_value(EMBED, (0, 0), float("inf")))
    assert main(["validate", str(svd_ckpt)]) == 0
    capsys.readouterr()
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"tensor '{EMBED}': contains Inf (expected finite values)" in err and str(broken) in err


def test_truncated_safetensors_header_is_named(svd_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(svd_ckpt, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:200])
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors file"):
        open_checkpoint(folder)


@pytest.mark.parametrize("kind", ["empty .pt", "truncated .pt", "empty .safetensors", "truncated .safetensors",
                                  "empty state dict"])
def test_damaged_svdllm_file_is_named(kind: str, tiny_llama: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    suffix = ".safetensors" if "safetensors" in kind else ".pt"
    path = tmp_path / f"svdllm_state{suffix}"
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pt":
        torch.save({"model.layers.0.self_attn.q_u_proj.weight": torch.ones(256, 8)} if "state" not in kind else {},
                   whole)
    else:
        save_file({"model.layers.0.self_attn.q_u_proj.weight": torch.ones(256, 8)}, str(whole))
    data = whole.read_bytes()
    path.write_bytes(b"" if kind.startswith("empty .") else data[: len(data) // 2] if "truncated" in kind else data)
    with pytest.raises(CheckpointError) as info:
        convert_svdllm(path, tmp_path / "out", base=tiny_llama)
    assert str(path) in str(info.value)
    assert main(["convert", "--from", "svd-llm", str(path), str(tmp_path / "out2"), "--base", str(tiny_llama)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_svdllm_base_config_without_hidden_size(tiny_llama: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "config.json").read_text())
    del config["hidden_size"]
    (base / "config.json").write_text(json.dumps(config))
    state = {"model.layers.0.self_attn.q_u_proj.weight": torch.ones(256, 8),
             "model.layers.0.self_attn.q_v_proj.weight": torch.ones(8, 256)}
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"base/config.json, field 'hidden_size': missing"):
        convert_svdllm(tmp_path / "state.pt", tmp_path / "out", base=base)


def test_svdllm_dense_linear_of_the_wrong_shape(tiny_llama: Path, tmp_path: Path) -> None:
    state = {"model.layers.0.self_attn.q_u_proj.weight": torch.ones(256, 8),
             "model.layers.0.self_attn.q_v_proj.weight": torch.ones(8, 256),
             "model.layers.0.mlp.down_proj.weight": torch.ones(7)}
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.down_proj.weight': has shape \[7\]"):
        convert_svdllm(tmp_path / "state.pt", tmp_path / "out", base=tiny_llama)


def test_no_pickle_loading_anywhere() -> None:
    """Every torch.load in shipped code passes weights_only=True, and nothing calls pickle.load(s)."""
    for path in REPO.glob("*/**/*.py"):
        if path.parts[len(REPO.parts)] in {"tests", ".venv", "bench", "artifacts"} or ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if (owner, node.func.attr) in {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler")}:
                pytest.fail(f"{path}:{node.lineno} unpickles")
            if (owner, node.func.attr) == ("torch", "load"):
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
                    f"{path}:{node.lineno} torch.load without weights_only=True"
