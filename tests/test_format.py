"""The checkpoint format: round trip, ratio accounting, and every malformed case's error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import (
    CheckpointWriter,
    compression_summary,
    densify,
    open_checkpoint,
    validate_checkpoint,
)
from slimserve.loaders.compress.run import compress
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.dictsparse import coef_to_dense, dense_to_coef
from slimserve.testing.edit import edited_copy

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def svd_ckpt(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compress(tiny_llama, tmp_path_factory.mktemp("svd") / "ckpt", ratio=0.3, progress=False)


@pytest.fixture(scope="module")
def dict_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-module dictsparse checkpoint written through the public writer."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("dict") / "ckpt"
    config = {"architectures": ["LlamaForCausalLM"], "dtype": "float32", "hidden_size": 16, "intermediate_size": 8,
              "vocab_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    writer = CheckpointWriter(out, config)
    values, indices = dense_to_coef(torch.randn(16, 12), 5)
    writer.add_module("model.layers.0.mlp.down_proj", "dictsparse",
                      {"dictionary": torch.randn(12, 8), "coef_values": values, "coef_indices": indices},
                      in_features=8, out_features=16, atoms=12, nnz=5, encoding="ell")  # ELL: these tests edit indices
    return writer.finish()


def test_round_trip_and_ratio(svd_ckpt: Path, tiny_llama: Path) -> None:
    ckpt = validate_checkpoint(svd_ckpt)
    assert ckpt.modules[Q] == {"scheme": "lowrank", "in_features": 256, "out_features": 256, "rank": 89}
    summary = compression_summary(svd_ckpt)
    # every layer keeps at most 70 %: r = floor(0.7·out·in/(out+in))
    assert 0.30 <= summary["ratio"] < 0.32
    assert summary["stored_params"] == sum(s["rank"] * (s["in_features"] + s["out_features"])
                                           for s in ckpt.modules.values())
    dense = open_checkpoint(tiny_llama)
    # untouched tensors are copied bit for bit
    assert torch.equal(ckpt.tensor("model.embed_tokens.weight"), dense.tensor("model.embed_tokens.weight"))
    assert compression_summary(tiny_llama)["ratio"] == 0.0


def test_densify_reconstructs_u_times_v(svd_ckpt: Path, tmp_path: Path) -> None:
    out = densify(svd_ckpt, tmp_path / "dense")
    dense = open_checkpoint(out)
    assert dense.quantization_config is None
    ckpt = open_checkpoint(svd_ckpt)
    expected = ckpt.tensor(f"{Q}.u") @ ckpt.tensor(f"{Q}.v")
    torch.testing.assert_close(dense.tensor(f"{Q}.weight"), expected)
    assert (out / "tokenizer.json").is_file()


def test_dictsparse_reference_forward_matches_reconstruction(dict_ckpt: Path) -> None:
    ckpt = validate_checkpoint(dict_ckpt)
    module = "model.layers.0.mlp.down_proj"
    spec, tensors = ckpt.modules[module], ckpt.module_tensors(module)
    x = torch.randn(3, 8)
    w = coef_to_dense(tensors["coef_values"], tensors["coef_indices"], 12) @ tensors["dictionary"]
    torch.testing.assert_close(SCHEMES["dictsparse"].forward(spec, tensors, x), x @ w.t())
    assert tensors["coef_indices"].dtype == torch.uint8


def test_dense_to_coef_keeps_largest_and_pads() -> None:
    coef = torch.tensor([[0.0, 3.0, -5.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    values, indices = dense_to_coef(coef, 2)
    assert indices.tolist() == [[1, 2], [0, 3]]  # row 2 has one nonzero: padded with atom 0
    assert values.tolist() == [[3.0, -5.0], [0.0, 2.0]]


# Each malformed case: how to break the checkpoint, and words the error must contain.
LOWRANK_CASES = {
    "missing tensor": (dict(tensors=lambda s: s.pop(f"{Q}.u")), [f"tensor '{Q}.u'", "missing", "shape [256, 89]"]),
    "wrong shape": (dict(tensors=lambda s: s.__setitem__(f"{Q}.v", torch.zeros(88, 256))),
                    [f"tensor '{Q}.v'", "[88, 256]", "expected shape [89, 256]", "model.safetensors"]),
    "wrong dtype": (dict(tensors=lambda s: s.__setitem__(f"{Q}.u", s[f"{Q}.u"].half())),
                    [f"tensor '{Q}.u'", "torch.float16", "expected dtype torch.float32"]),
    "nan": (dict(tensors=lambda s: s[f"{Q}.u"].__setitem__((0, 0), float("nan"))), [f"tensor '{Q}.u'", "NaN"]),
    "inf": (dict(tensors=lambda s: s[f"{Q}.v"].__setitem__((3, 4), float("inf"))), [f"tensor '{Q}.v'", "Inf"]),
    "rank larger than layer": (
        dict(config=lambda c: c["quantization_config"]["modules"][Q].__setitem__("rank", 300)),
        [f"field 'quantization_config.modules.{Q}.rank'", "rank 300", "min(out, in) = 256", "config.json"]),
    "unknown scheme": (
        dict(config=lambda c: c["quantization_config"]["modules"][Q].__setitem__("scheme", "wavelet")),
        [f"field 'quantization_config.modules.{Q}.scheme'", "'wavelet'", "dictsparse", "lowrank"]),
    "unknown format_version": (
        dict(config=lambda c: c["quantization_config"].__setitem__("format_version", 7)),
        ["field 'quantization_config.format_version'", "7", "config.json"]),
    "leftover dense weight": (dict(tensors=lambda s: s.__setitem__(f"{Q}.weight", torch.zeros(256, 256))),
                              [f"tensor '{Q}.weight'", "unexpected"]),
}

DICT_MODULE = "model.layers.0.mlp.down_proj"
DICT_CASES = {
    "index out of range": (dict(tensors=lambda s: s[f"{DICT_MODULE}.coef_indices"].__setitem__((2, 4), 12)),
                           [f"tensor '{DICT_MODULE}.coef_indices'", "12", "[0, 12)"]),
    "unsorted indices": (dict(tensors=lambda s: s[f"{DICT_MODULE}.coef_indices"][0].copy_(
        s[f"{DICT_MODULE}.coef_indices"][0].flip(0))), [f"tensor '{DICT_MODULE}.coef_indices'", "strictly increasing"]),
    "float indices": (dict(tensors=lambda s: s.__setitem__(f"{DICT_MODULE}.coef_indices",
                                                           s[f"{DICT_MODULE}.coef_indices"].float())),
                      [f"tensor '{DICT_MODULE}.coef_indices'", "torch.int16 or torch.int32"]),
    "nnz larger than atoms": (dict(config=lambda c: c["quantization_config"]["modules"][DICT_MODULE]
                                   .__setitem__("nnz", 13)),
                              ["nnz <= atoms"]),
}


MALFORMED = [("svd_ckpt", case, *LOWRANK_CASES[case]) for case in sorted(LOWRANK_CASES)] + \
    [("dict_ckpt", case, *DICT_CASES[case]) for case in sorted(DICT_CASES)]


@pytest.mark.parametrize(("base", "case", "edits", "words"), MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_checkpoint_names_the_problem(base: str, case: str, edits: dict, words: list[str],
                                                request: pytest.FixtureRequest, tmp_path: Path) -> None:
    broken = edited_copy(request.getfixturevalue(base), tmp_path / "broken", **edits)
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(broken)
    for word in words:
        assert word in str(info.value), f"{case}: {word!r} not in {info.value}"
    assert str(broken) in str(info.value)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        open_checkpoint(tmp_path)
