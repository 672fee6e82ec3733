"""Every compression method on degenerate weights and calibration text (issue 13, item 6).

A property-style grid: each kind of degenerate weight (steeply decaying spectrum, rank-deficient,
duplicate rows, zero rows and a zero layer, very small and very large scales, a constant
calibration text) x every method must give a checkpoint that validates, with finite errors in
[0, 1]; or, for weights that are not finite, a CompressionError naming the layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import compression_summary, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.cospadi import sparse_code
from slimserve.loaders.compress.rsparse import compress_rsparse
from slimserve.loaders.compress.run import REPORT_JSON, compress
from slimserve.loaders.models import DECODER_LINEAR

METHODS = ("svd", "svd-llm", "cospadi", "rocket", "rsparse")
ZERO_LAYER = "model.layers.1.self_attn.o_proj"


def degenerate(name: str, weight: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One decoder linear's weight made degenerate in the way ``kind`` names."""
    out_features, in_features = weight.shape
    if kind == "decaying spectrum":  # singular values over 12 decades: the cospadi crash
        u, _, vh = torch.linalg.svd(torch.randn(out_features, in_features, generator=generator), full_matrices=False)
        return (u * torch.logspace(0, -12, min(out_features, in_features))) @ vh * weight.norm()
    if kind in ("rank deficient", "constant calibration text"):
        return torch.randn(out_features, 2, generator=generator) @ torch.randn(2, in_features, generator=generator) / 50
    if kind == "duplicate rows":
        return weight[:3].repeat(out_features // 3 + 1, 1)[:out_features]
    if kind == "zero rows":
        if name.startswith(ZERO_LAYER):
            return torch.zeros_like(weight)
        return weight * (torch.arange(out_features) % 2)[:, None]
    if kind == "tiny and huge scales":  # layer 0 at 1e-12, layer 1 at 1e6 (its activations reach ~1e20)
        return weight * (1e-12 if ".layers.0." in name else 1e6)
    raise ValueError(kind)


KINDS = ("decaying spectrum", "rank deficient", "duplicate rows", "zero rows", "tiny and huge scales",
         "constant calibration text")


@pytest.fixture(scope="module")
def degenerate_models(narrow_qwen3: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per kind: (model folder, calibration text, Gram cache shared by its calibrated methods)."""
    root = tmp_path_factory.mktemp("degenerate")
    constant = root / "constant.txt"
    constant.write_text("the " * 20_000)
    models = {}
    for i, kind in enumerate(KINDS):
        folder = root / f"kind{i}"
        shutil.copytree(narrow_qwen3, folder)
        state = load_file(str(folder / "model.safetensors"))
        generator = torch.Generator().manual_seed(i)
        for name in sorted(state):
            if DECODER_LINEAR.match(name):
                state[name] = degenerate(name, state[name], kind, generator).contiguous()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        calib = constant if kind == "constant calibration text" else text_file
        models[kind] = (folder, calib, root / f"grams{i}.safetensors")
    return models


@pytest.mark.filterwarnings("ignore:.*singular:UserWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_completes_on_degenerate_weights(kind: str, method: str, degenerate_models: dict,
                                                      tmp_path: Path) -> None:
    src, calib, cache = degenerate_models[kind]
    out = tmp_path / "ckpt"
    if method == "rsparse":
        compress_rsparse(src, out, sparsity=0.5, calib=calib, samples=8, seq_len=64, progress=False,
                         log=lambda _: None)
    else:
        compress(src, out, method=method, ratio=0.3, calib=None if method == "svd" else calib, calib_cache=cache,
                 calib_samples=8, calib_seq_len=64, progress=False)
    ckpt = validate_checkpoint(out)  # every tensor finite, every shape and index valid
    dense = open_checkpoint(src)
    if method == "rsparse":
        return
    assert compression_summary(out)["ratio"] >= 0.3
    layers = json.loads((out / REPORT_JSON).read_text())["layers"]
    for layer in layers:
        assert 0.0 <= layer["whitened_error"] <= 1.0 + 1e-6 and 0.0 <= layer["weight_error"] <= 1.0 + 1e-3, layer
    if kind == "rank deficient" and method in ("svd", "svd-llm", "rocket"):
        # every kept rank exceeds 2: a rank-2 weight comes back exactly
        assert all(layer["weight_error"] < 1e-3 for layer in layers), layers
    if kind == "zero rows":
        for module in ckpt.modules:
            original = dense.tensor(f"{module}.weight")
            approx = ckpt.reconstruct(module)
            zero = original.abs().sum(dim=1) == 0
            assert approx[zero].abs().max() <= 1e-5 * max(float(original.abs().max()), 1e-30)


def test_omp_handles_dependent_and_zero_atoms() -> None:
    """Duplicate and zero atoms make the support's sub-Gram singular: the refit is the least-squares optimum."""
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    atoms = torch.cat([base, base[:2], torch.zeros(2, 16)])  # 8 atoms, rank 4
    signals = torch.randn(5, 4, generator=generator) @ base
    coef = sparse_code(signals, atoms, nnz=6)
    assert torch.isfinite(coef).all() and ((coef != 0).sum(dim=1) <= 6).all()
    torch.testing.assert_close(coef @ atoms, signals, atol=1e-4, rtol=0)


def test_non_finite_weight_names_the_layer(narrow_qwen3: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(narrow_qwen3, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressionError, match=r"layer model.layers.1.mlp.down_proj: the weight .* NaN or Inf"):
        compress(folder, tmp_path / "out", method="svd", ratio=0.3, progress=False)
