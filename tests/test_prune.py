"""Pruning (``compress --method sparsegpt|wanda``, N:M by ``--pattern`` or row-sparse by ``--ratio``): exact patterns,
OBS beats scoring, byte budgets, errors."""

from __future__ import annotations

import json

import pytest
import torch

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.calibration import load_or_collect_grams
from slimserve.loaders.compress.prune import parse_pattern, prune
from slimserve.loaders.compress.pruners import sparsegpt_prune, sparsegpt_rows, wanda_prune, wanda_rows
from slimserve.loaders.compress.run import REPORT_JSON
from slimserve.loaders.models import decoder_linear_modules
from slimserve.loaders.schemes.nm import nm_mask
from slimserve.server.cli import main

CALIB = dict(calib_samples=8, calib_seq_len=64)


def output_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖X(W − Ŵ)ᵀ‖²_F / tokens`` from the Gram ``XᵀX / tokens``."""
    diff = (weight - pruned).double()
    return float(torch.einsum("oi,ij,oj->", diff, gram.double(), diff))


def group_nonzeros(weight: torch.Tensor, group: int) -> torch.Tensor:
    return (weight != 0).view(weight.shape[0], -1, group).sum(dim=2)


def correlated_gram(features: int, seed: int = 0) -> torch.Tensor:
    """A Gram of correlated inputs with unequal scales, like a real layer's (a mean over 4096 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features**0.5 + torch.eye(features)
    x = (torch.randn(4096, features, generator=gen) @ mix) * torch.linspace(0.2, 3.0, features)
    return (x.T @ x).double() / x.shape[0]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_cli_writes_a_valid_checkpoint_following_the_pattern(narrow_llama, text_file, tmp_path, method):
    out = tmp_path / "ckpt"
    assert main(["compress", str(narrow_llama), str(out), "--method", method, "--pattern", "2:4",
                 "--calib", str(text_file), "--calib-samples", "8", "--calib-seq-len", "64", "--quiet"]) == 0
    ckpt, dense = validate_checkpoint(out), open_checkpoint(narrow_llama)
    modules = decoder_linear_modules(dense.tensors)
    assert set(ckpt.modules) == set(modules)
    for module in modules:
        assert ckpt.modules[module]["scheme"] == "nm"
        assert (ckpt.modules[module]["kept"], ckpt.modules[module]["group"]) == (2, 4)
        weight = ckpt.reconstruct(module)
        # Random dense weights have no exact zeros: every group keeps exactly 2.
        assert bool((group_nonzeros(weight, 4) == 2).all()), module
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ckpt.tensor(name), dense.tensor(name))
    producer = ckpt.quantization_config["producer"]
    assert (producer["method"], producer["pattern"], producer["kept"], producer["group"]) == (method, "2:4", 2, 4)
    assert producer["calibration"]["text"] == "calib.txt"
    report = json.loads((out / REPORT_JSON).read_text())
    assert len(report["layers"]) == len(modules) and all(r["scheme"] == "nm" for r in report["layers"])
    assert report["params_ratio_achieved"] == pytest.approx(0.5)
    if method == "wanda":  # Wanda only masks: every kept weight is the dense one
        for module in modules:
            kept = ckpt.reconstruct(module) != 0
            assert torch.equal(ckpt.reconstruct(module)[kept], dense.tensor(f"{module}.weight").float()[kept])


def test_sparsegpt_beats_wanda_and_magnitude_on_the_calibration_inputs(narrow_llama, text_file, tmp_path):
    grams = load_or_collect_grams(narrow_llama, text_file, tmp_path / "grams.safetensors", **{
        "samples": CALIB["calib_samples"], "seq_len": CALIB["calib_seq_len"]})
    dense = open_checkpoint(narrow_llama)
    for kept, group in ((2, 4), (4, 8)):
        for module in decoder_linear_modules(dense.tensors):
            weight, gram = dense.tensor(f"{module}.weight").float(), grams[module]
            sparsegpt = output_error(weight, sparsegpt_prune(weight, gram, kept, group), gram)
            wanda = output_error(weight, wanda_prune(weight, gram, kept, group), gram)
            magnitude = output_error(weight, weight * nm_mask(weight, kept, group), gram)
            assert sparsegpt < wanda and sparsegpt < magnitude, (module, kept, group, sparsegpt, wanda, magnitude)


@pytest.mark.parametrize(("kept", "group"), [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_on_correlated_inputs(kept, group):
    """Across several 128-column blocks (the lazy update), wider than one block: exact pattern, lower error."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 320, generator=gen)
    gram = correlated_gram(320)
    pruned = sparsegpt_prune(weight, gram, kept, group)
    assert bool((group_nonzeros(pruned, group) <= kept).all())
    errors = [output_error(weight, p, gram) for p in (pruned, wanda_prune(weight, gram, kept, group),
                                                     weight * nm_mask(weight, kept, group))]
    assert errors[0] < min(errors[1:]), errors


def test_wanda_with_uniform_inputs_is_magnitude():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 64, generator=gen)
    # Equal input norms, correlated inputs: only the diagonal matters to Wanda.
    gram = torch.full((64, 64), 0.3, dtype=torch.float64).fill_diagonal_(2.5)
    for kept, group in ((2, 4), (4, 8), (1, 4)):
        assert torch.equal(wanda_prune(weight, gram, kept, group), weight * nm_mask(weight, kept, group))
    # Scaling every input alike changes nothing either.
    assert torch.equal(wanda_prune(weight, 7.0 * correlated_gram(64), 2, 4),
                       wanda_prune(weight, correlated_gram(64), 2, 4))


def test_sparsegpt_special_cases():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 64, generator=gen)
    identity = torch.eye(64, dtype=torch.float64)
    # H = I without dampening: no cross-column update, the mask is magnitude's.
    assert torch.equal(sparsegpt_prune(weight, identity, 2, 4, dampening=0.0), weight * nm_mask(weight, 2, 4))
    # Inputs never seen in calibration are zeroed; the rest still follows the pattern.
    gram = correlated_gram(64)
    gram[:, 5] = gram[5, :] = 0.0
    pruned = sparsegpt_prune(weight, gram, 2, 4)
    assert bool((pruned[:, 5] == 0).all()) and bool((group_nonzeros(pruned, 4) <= 2).all())


@pytest.mark.parametrize(("text", "expected"), [("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 4 ", (1, 4))])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["3:2", "4:4", "0:4", "2-4", "2:", "", "2:512"])
def test_bad_patterns_name_the_option(text):
    with pytest.raises(CompressionError, match="--pattern"):
        parse_pattern(text)


def test_bad_invocations_are_named_errors(narrow_llama, text_file, tmp_path, capsys):
    base = ["compress", str(narrow_llama), str(tmp_path / "o"), "--calib", str(text_file), "--quiet"]
    assert main([*base, "--method", "wanda", "--rank", "8"]) == 2
    assert "--rank 8" in capsys.readouterr().err
    assert main([*base, "--method", "svd-llm", "--pattern", "2:4"]) == 2
    assert "--pattern" in capsys.readouterr().err
    assert main([*base, "--method", "sparsegpt", "--pattern", "3:2"]) == 2
    assert "field '--pattern'" in capsys.readouterr().err
    # 128 and 256 inputs: groups of 3 do not tile them; the error names the first tensor.
    with pytest.raises(CompressionError, match=r"tensor 'model\.layers\.0\..*\.weight'.*not a multiple of 3"):
        prune(narrow_llama, tmp_path / "p", method="wanda", pattern="1:3", calib=text_file, progress=False, **CALIB)
    with pytest.raises(CompressionError, match="--calib"):
        prune(narrow_llama, tmp_path / "q", method="sparsegpt", pattern="2:4", calib=None, progress=False)
    with pytest.raises(CompressionError, match="already a slimserve checkpoint"):
        pruned = prune(narrow_llama, tmp_path / "r", method="wanda", pattern="2:4", calib=text_file, progress=False,
                       **CALIB)
        prune(pruned, tmp_path / "s", method="wanda", pattern="2:4", calib=text_file, progress=False, **CALIB)


def test_pruned_checkpoint_layers_match_the_pruning_functions(narrow_llama, text_file, tmp_path):
    """What is written is the pruned weight itself (packing loses nothing), for a 4:8 checkpoint too."""
    cache = tmp_path / "grams.safetensors"
    out = prune(narrow_llama, tmp_path / "ckpt", method="sparsegpt", pattern="4:8", calib=text_file,
                calib_cache=cache, progress=False, **CALIB)
    grams = load_or_collect_grams(narrow_llama, text_file, cache, samples=8, seq_len=64)
    ckpt, dense = validate_checkpoint(out), open_checkpoint(narrow_llama)
    for module in ckpt.modules:
        weight = dense.tensor(f"{module}.weight").float()
        torch.testing.assert_close(ckpt.reconstruct(module), sparsegpt_prune(weight, grams[module], 4, 8),
                                   rtol=0, atol=0)


def test_row_sparse_pruning_keeps_exactly_nnz_per_row_and_sparsegpt_beats_wanda():
    """Row-sparse (``--ratio``): each row keeps exactly nnz anywhere; OBS beats scoring on the Gram's inputs."""
    weight = torch.randn(48, 300, generator=torch.Generator().manual_seed(3))
    gram = correlated_gram(300)
    nnz = 171  # not a multiple of the 128-column block: the blocks' shares must still add up exactly
    sparsegpt, wanda = sparsegpt_rows(weight, gram, nnz), wanda_rows(weight, gram, nnz)
    for pruned in (sparsegpt, wanda):
        assert bool(((pruned != 0).sum(dim=1) == nnz).all())
    magnitude = weight * (weight.abs() >= weight.abs().topk(nnz, dim=1).values[:, -1:])
    errors = [output_error(weight, p, gram) for p in (sparsegpt, wanda, magnitude)]
    assert errors[0] < 0.8 * errors[1] < 0.8 * errors[2], errors
    # Equal input norms: Wanda is magnitude pruning per row.
    assert torch.equal(wanda_rows(weight, 5.0 * torch.eye(300, dtype=torch.float64), nnz), magnitude)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_cli_ratio_prunes_row_sparse_within_the_byte_budget(narrow_llama, text_file, tmp_path, method):
    """``--ratio`` instead of ``--pattern``: a rank-0 ``lowrank_sparse`` checkpoint, byte-true, exact per row."""
    out = tmp_path / "ckpt"
    assert main(["compress", str(narrow_llama), str(out), "--method", method, "--ratio", "0.3",
                 "--calib", str(text_file), "--calib-samples", "8", "--calib-seq-len", "64", "--quiet"]) == 0
    ckpt, dense = validate_checkpoint(out), open_checkpoint(narrow_llama)
    grams = load_or_collect_grams(narrow_llama, text_file, tmp_path / "grams.safetensors",
                                  samples=CALIB["calib_samples"], seq_len=CALIB["calib_seq_len"])
    prune_rows = sparsegpt_rows if method == "sparsegpt" else wanda_rows
    for module, spec in ckpt.modules.items():
        assert (spec["scheme"], spec["rank"], spec["encoding"]) == ("lowrank_sparse", 0, "bitmask"), module
        weight = dense.tensor(f"{module}.weight").float()
        expected = prune_rows(weight, grams[module], spec["nnz"])
        torch.testing.assert_close(ckpt.reconstruct(module), expected, rtol=0, atol=0)
    summary = json.loads((out / REPORT_JSON).read_text())
    assert 0.29 <= summary["bytes_ratio_achieved"] < 0.31
    # the bitmask costs 1 bit a weight: 1/32 of a float32 value, the difference between the two counts
    assert summary["params_ratio_achieved"] - summary["bytes_ratio_achieved"] == pytest.approx(1 / 32)
