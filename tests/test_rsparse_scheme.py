"""R-Sparse scheme invariants (docs/methods/rsparse.md) on the reference forward and the compressor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slimserve.errors import CheckpointError, CompressionError
from slimserve.loaders.checkpoint import open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.rsparse import LayerFactors, calibrate, compress_rsparse, load_recipe
from slimserve.loaders.compress.rsparse_search import UNIFORM_GRID
from slimserve.loaders.reference import reference_model
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.rsparse import budget, exact_mask, scores

SCHEME = SCHEMES["rsparse"]
OUT, IN = 96, 160


@pytest.fixture(scope="module")
def layer() -> tuple[LayerFactors, torch.Tensor, torch.Tensor]:
    """A weight with uneven column norms, calibration inputs and held-out inputs with outlier channels."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, IN, generator=gen) * torch.rand(IN, generator=gen)
    channel_scale = torch.exp(torch.randn(IN, generator=gen))
    calib = torch.randn(512, IN, generator=gen) * channel_scale
    held_out = torch.randn(7, IN, generator=gen) * channel_scale
    return LayerFactors(weight, torch.float32), calib, held_out


def spec_of(fields: dict) -> dict:
    return {"scheme": "rsparse", "in_features": IN, "out_features": OUT, **fields}


def test_zero_sparsity_is_exactly_dense(layer) -> None:
    factors, calib, x = layer
    tensors, fields = factors.module(0.0, 0.3, calib)  # α is irrelevant at s = 0: the whole budget is exact
    assert fields["threshold"] == -math.inf and fields["rank"] == 0 and set(tensors) == {"weight_t", "col_norm"}
    assert torch.equal(SCHEME.forward(spec_of(fields), tensors, x), x @ factors.weight.t().contiguous())


def test_alpha_one_is_the_thresholded_input_product(layer) -> None:
    factors, calib, x = layer
    tensors, fields = factors.module(0.5, 1.0, calib)
    assert fields["rank"] == 0 and "u" not in tensors
    mask = x.abs() * factors.weight.norm(dim=0) > fields["threshold"]
    assert 0.2 < mask.float().mean() < 0.8
    torch.testing.assert_close(SCHEME.forward(spec_of(fields), tensors, x), (x * mask) @ factors.weight.t(),
                               rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_the_rank_r_product(layer) -> None:
    factors, calib, x = layer
    tensors, fields = factors.module(0.5, 0.0, calib)
    u, s, vh = torch.linalg.svd(factors.weight.double())
    r = fields["rank"]
    assert r == budget(IN, OUT, 0.5, 0.0)[1] and 0 < r < min(IN, OUT)
    expected = x.double() @ (u[:, :r] * s[:r] @ vh[:r]).t()
    torch.testing.assert_close(SCHEME.forward(spec_of(fields), tensors, x), expected.float(), rtol=1e-4, atol=1e-4)


def test_minus_infinity_threshold_makes_every_channel_exact(layer) -> None:
    factors, calib, x = layer
    tensors, fields = factors.module(0.5, 0.6, calib)
    assert fields["rank"] > 0 and math.isfinite(fields["threshold"])
    y = SCHEME.forward(spec_of(dict(fields, threshold=-math.inf)), tensors, x)
    torch.testing.assert_close(y, x @ factors.weight.t(), rtol=1e-5, atol=1e-5)
    # and with the calibrated threshold the output really changes
    assert not torch.allclose(SCHEME.forward(spec_of(fields), tensors, x), y, rtol=1e-3, atol=1e-3)


def test_interior_alpha_mixes_exact_channels_and_the_low_rank_remainder(layer) -> None:
    factors, calib, x = layer
    tensors, fields = factors.module(0.5, 0.7, calib)
    mask = exact_mask(x, tensors["col_norm"], fields["threshold"])
    r = fields["rank"]
    u, s, vh = torch.linalg.svd(factors.weight.double(), full_matrices=False)
    low = (u[:, :r] * s[:r]) @ vh[:r]
    expected = (x * mask).double() @ factors.weight.double().t() + (x * ~mask).double() @ low.t()
    torch.testing.assert_close(SCHEME.forward(spec_of(fields), tensors, x), expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.95, 1.0])
def test_calibrated_threshold_reproduces_the_target_sparsity(layer, alpha: float) -> None:
    factors, calib, _ = layer
    _, fields = factors.module(0.5, alpha, calib)
    quantile = budget(IN, OUT, 0.5, alpha)[2]
    skipped = (scores(calib, factors.col_norm) <= fields["threshold"]).float().mean().item()
    assert abs(skipped - quantile) <= 1.0 / calib.numel() + 1e-7


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 0.95])
def test_budget_matches_the_mac_count(shape: tuple[int, int], alpha: float) -> None:
    out, inp = shape  # includes a GQA k/v shape: the budget uses the true output width
    c, r, _ = budget(inp, out, 0.5, alpha)
    cost = c * out + r * (inp + out)
    assert cost <= 0.5 * inp * out + out and cost >= 0.5 * inp * out - (inp + out) - out


def test_budget_worked_examples_from_the_paper_code() -> None:
    assert budget(4096, 4096, 0.5, 0.8)[:2] == (1638, 205)
    assert budget(4096, 4096, 0.5, 0.5)[:2] == (1024, 512)


def test_col_norm_is_the_weight_column_norm(layer) -> None:
    factors, calib, _ = layer
    tensors, fields = factors.module(0.5, 0.5, calib)
    torch.testing.assert_close(tensors["col_norm"], torch.linalg.vector_norm(factors.weight, dim=0))
    files = {k: "model.safetensors" for k in tensors}
    SCHEME.check_values("m", spec_of(fields), tensors, files)
    with pytest.raises(CheckpointError, match=r"tensor 'm.col_norm'.*L2 norm"):
        SCHEME.check_values("m", spec_of(fields), dict(tensors, col_norm=tensors["col_norm"].flip(0)), files)


@pytest.mark.parametrize("fields, field", [
    ({"rank": 0, "sparsity": 0.5, "alpha": 0.5, "threshold": 0.1}, "rank"),
    ({"rank": 3, "sparsity": 0.5, "alpha": 1.0, "threshold": 0.1}, "rank"),
    ({"rank": 3, "sparsity": 1.0, "alpha": 0.5, "threshold": 0.1}, "sparsity"),
    ({"rank": 3, "sparsity": 0.5, "alpha": 1.5, "threshold": 0.1}, "alpha"),
    ({"rank": 3, "sparsity": 0.5, "alpha": 0.5, "threshold": "x"}, "threshold"),
    ({"rank": 1000, "sparsity": 0.5, "alpha": 0.5, "threshold": 0.1}, "rank"),
])
def test_bad_fields_name_the_field(fields: dict, field: str) -> None:
    with pytest.raises(CheckpointError, match=rf"field 'quantization_config.modules.m.{field}'"):
        SCHEME.check_fields("m", spec_of(fields), "config.json")


@pytest.fixture
def calib_text(text_file: Path) -> Path:
    return text_file


def test_compressed_checkpoint_validates_and_reproduces_the_target_sparsity(tiny_llama: Path, calib_text: Path,
                                                                             tmp_path: Path) -> None:
    ckpt_dir = compress_rsparse(tiny_llama, tmp_path / "rs", sparsity=0.5, calib=calib_text, alpha=0.9,
                                progress=False)
    ckpt = validate_checkpoint(ckpt_dir)
    assert len(ckpt.modules) == 14 and all(s["scheme"] == "rsparse" for s in ckpt.modules.values())
    assert json.loads((ckpt_dir / "config.json").read_text())["quantization_config"]["producer"]["method"] == "rsparse"
    calibrated, _ = calibrate(tiny_llama, calib_text)
    for module, spec in ckpt.modules.items():
        tensors = ckpt.module_tensors(module)
        score = scores(calibrated.inputs[calibrated_key(module)], tensors["col_norm"])
        # Exactly the ⌊numel·q⌋-th smallest score: repeated tokens give equal scores, so ties sit at t.
        k = math.floor(score.numel() * budget(spec["in_features"], spec["out_features"], 0.5, 0.9)[2])
        assert int((score < spec["threshold"]).sum()) < k <= int((score <= spec["threshold"]).sum())
        assert abs((score <= spec["threshold"]).float().mean().item() - 0.55) < 1e-3


def calibrated_key(module: str) -> str:
    from slimserve.loaders.compress.calibration import gram_key

    return gram_key(module)


def test_reference_model_is_dense_in_prefill_and_sparse_in_decode(tiny_llama: Path, calib_text: Path,
                                                                  tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt_dir = compress_rsparse(tiny_llama, tmp_path / "rs", sparsity=0.5, calib=calib_text, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    serving, everywhere = reference_model(ckpt_dir, dense_prefill=True), reference_model(ckpt_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(serving(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(everywhere(ids).logits, dense(ids).logits, rtol=1e-3, atol=1e-3)
        one = ids[:, :1]
        torch.testing.assert_close(serving(one).logits, everywhere(one).logits)


def test_recipe_must_cover_every_module(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"alpha": {"a": 0.5}}))
    with pytest.raises(CompressionError, match="no α for"):
        load_recipe(tmp_path / "r.json", ["a", "b"])
    with pytest.raises(CompressionError, match="outside"):
        load_recipe({"a": 1.5}, ["a"])


def test_cli_compress_and_search_write_a_recipe(tiny_llama: Path, calib_text: Path, tmp_path: Path) -> None:
    from slimserve.server.cli import main

    assert main(["compress", str(tiny_llama), str(tmp_path / "c"), "--method", "rsparse", "--sparsity", "0.5",
                 "--calib", str(calib_text), "--quiet"]) == 0
    assert {s["alpha"] for s in open_checkpoint(tmp_path / "c").modules.values()} == {0.95}
    assert main(["compress", str(tiny_llama), str(tmp_path / "x"), "--method", "rsparse", "--ratio", "0.5",
                 "--calib", str(calib_text)]) == 2  # R-Sparse is budgeted by --sparsity
    assert main(["compress", str(tiny_llama), str(tmp_path / "s"), "--method", "rsparse", "--sparsity", "0.5",
                 "--calib", str(calib_text), "--search", "--population", "4", "--generations", "1", "--group-size", "7",
                 "--quiet"]) == 0
    recipe = json.loads((tmp_path / "s" / "rsparse_recipe.json").read_text())
    assert recipe["search"]["best_ppl"] <= recipe["search"]["uniform_ppl"]
    # the uniform grid, then per group of 7 (14 modules): 3 random members and 4 children
    assert recipe["search"]["evaluations"] == len(UNIFORM_GRID) + 2 * (3 + 4)
    assert recipe["search"]["uniform_alpha"] in UNIFORM_GRID
    modules = open_checkpoint(tmp_path / "s").modules
    assert {m: s["alpha"] for m, s in modules.items()} == pytest.approx(recipe["alpha"])
