"""``compress --sequential``: block-sequential calibration (each layer's Grams from the compressed layers below it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.calibration import (
    SequentialGrams,
    _gram_hooks,
    _model_and_windows,
    collect_grams,
    gram_key,
)
from slimserve.loaders.compress.run import compress
from slimserve.loaders.compress.whitening import SvdLlm, Whitening
from slimserve.loaders.models import layer_index
from slimserve.loaders.reference import replace_linears
from slimserve.testing.models import build_tiny_causal_lm

CALIB = dict(samples=8, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer narrow Llama: errors have some depth to compound through."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("deep_llama") / "model", "llama", hidden_size=128,
                                intermediate_size=256, num_heads=2, num_kv_heads=1, head_dim=64, num_layers=4)


def _layer_modules(grams: SequentialGrams, layer: int) -> list[str]:
    return [name for name in grams.grams if f".layers.{layer}." in name]


def test_sequential_grams_equal_one_pass_grams_when_nothing_is_compressed(narrow_llama, text_file):
    one_pass, tokens = collect_grams(narrow_llama, text_file, progress=False, **CALIB)
    sequential = SequentialGrams(narrow_llama, text_file, progress=False, **CALIB)
    assert sequential.tokens == tokens
    seen = set()
    for layer in range(2):
        sequential.collect(layer)
        for name in _layer_modules(sequential, layer):
            torch.testing.assert_close(sequential[name], one_pass[name], rtol=1e-6, atol=1e-9)
            seen.add(name)
    assert seen == set(one_pass)


def _lowrank(weight: torch.Tensor, gram: torch.Tensor, module: str, rank: int = 8) -> tuple[dict, dict]:
    fact, _ = SvdLlm(weight, Whitening(gram, weight.shape[1], module)).at_rank(rank)
    return fact.spec, fact.tensors


def test_compressing_a_layer_changes_only_the_grams_above_it_as_a_full_forward_would(narrow_llama, text_file):
    one_pass, _ = collect_grams(narrow_llama, text_file, progress=False, **CALIB)
    sequential = SequentialGrams(narrow_llama, text_file, progress=False, **CALIB)
    sequential.collect(0)
    weights = dict(sequential.model.named_modules())
    replaced = {}
    for name in [n for n, m in weights.items() if ".layers.0." in n and isinstance(m, torch.nn.Linear)]:
        torch.testing.assert_close(sequential[name], one_pass[gram_key(name)], rtol=1e-6, atol=1e-9)
        replaced[name] = _lowrank(weights[name].weight.detach(), sequential[name], name)
        sequential.replace(name, *replaced[name])
    sequential.collect(1)

    # The same Grams from a whole-model forward of the model whose layer 0 is compressed.
    model, windows = _model_and_windows(narrow_llama, text_file, **CALIB)
    replace_linears(model, replaced)
    expected, hooks = _gram_hooks(model)
    with torch.inference_mode():
        for window in windows:
            model(torch.tensor([window]))
    for hook in hooks:
        hook.remove()
    for name in _layer_modules(sequential, 1):
        torch.testing.assert_close(sequential[name], expected[name] / sequential.tokens, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(sequential[name], one_pass[name], rtol=1e-3)


def test_layers_run_in_order(narrow_llama, text_file):
    sequential = SequentialGrams(narrow_llama, text_file, progress=False, **CALIB)
    with pytest.raises(CompressionError, match="in order"):
        sequential.collect(1)
    sequential.collect(0)
    with pytest.raises(CompressionError, match="current layer is 0"):
        sequential["model.layers.1.mlp.down_proj"]


def test_ratio_zero_sequential_checkpoint_is_the_dense_model(narrow_llama, text_file, tmp_path):
    out = compress(narrow_llama, tmp_path / "seq", method="rocket", ratio=0.0, calib=text_file, sequential=True,
                   calib_samples=8, calib_seq_len=64, progress=False)
    dense = open_checkpoint(narrow_llama)
    ckpt = validate_checkpoint(out)
    for module in ckpt.modules:
        assert torch.equal(ckpt.reconstruct(module), dense.tensor(f"{module}.weight").float())
    assert json.loads((out / "config.json").read_text())["quantization_config"]["producer"]["calibration"][
        "sequential"] is True


def _whitened_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖X(W − Ŵ)ᵀ‖²/tokens = tr((W − Ŵ)·G·(W − Ŵ)ᵀ)``: the layer's output error on the inputs behind ``gram``."""
    diff = weight.double() - approx.double()
    return float(((diff @ gram) * diff).sum())


def test_sequential_factors_fit_the_inputs_the_compressed_model_feeds_each_layer(deep_llama, text_file, tmp_path):
    """SVD-LLM's truncated whitened SVD is the best rank-r fit for its Grams (Eckart-Young): with sequential Grams,
    every layer's factors beat the one-pass factors of the same rank on the inputs the compressed layers below
    really produce, and strictly so above layer 0, where the inputs differ from the dense model's.

    (End-to-end, on these random-weight tiny models the logit error of sequential vs one-pass is noise: 4 layers,
    16 x 64 calibration tokens, relative logit error svd-llm 30 % 0.668 vs 0.665, 50 % 0.777 vs 0.791, rocket 30 %
    0.638 vs 0.630, 50 % 0.759 vs 0.742 (sequential first). The SmolLM2 comparison is in bench/README.md.)
    """
    outs = {mode: compress(deep_llama, tmp_path / ("seq" if mode else "one"), method="svd-llm", ratio=0.5,
                           calib=text_file, sequential=mode, calib_samples=16, calib_seq_len=64, progress=False)
            for mode in (False, True)}
    ckpts = {mode: open_checkpoint(out) for mode, out in outs.items()}
    assert ckpts[False].modules == ckpts[True].modules  # same ranks: only the Grams differ
    dense = open_checkpoint(deep_llama)
    feeding = SequentialGrams(deep_llama, text_file, samples=16, seq_len=64, seed=0, progress=False)
    strictly_better = 0
    for module, spec in ckpts[True].modules.items():
        feeding.collect(layer_index(module))
        weight, gram = dense.tensor(f"{module}.weight"), feeding[module]
        sequential, one_pass = (_whitened_error(weight, ckpts[mode].reconstruct(module), gram)
                                for mode in (True, False))
        assert sequential <= one_pass * (1 + 1e-6), module
        strictly_better += ".layers.0." not in module and sequential < one_pass * (1 - 1e-4)
        feeding.replace(module, spec, ckpts[True].module_tensors(module))
    assert strictly_better >= len(ckpts[True].modules) // 2


def test_sequential_needs_a_calibrated_method(narrow_llama, text_file, tmp_path):
    with pytest.raises(CompressionError, match="--sequential"):
        compress(narrow_llama, tmp_path / "x", method="svd", ratio=0.3, sequential=True, progress=False)
