"""Calibrated compressors (svd-llm, cospadi, rocket), knapsack allocation and their error handling."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import compression_summary, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.allocation import cap_options, solve_knapsack
from slimserve.loaders.compress.cospadi import CoSpaDi
from slimserve.loaders.compress.rocket import Rocket, refit_coefficients
from slimserve.loaders.compress.run import (
    PROFILE_LEVELS,
    REPORT_JSON,
    REPORT_PNG,
    compress,
    knapsack_levels,
    profile_layers,
)
from slimserve.loaders.compress.whitening import SvdLlm, Whitening, relative_errors
from slimserve.testing.models import local_text

CALIBRATED = ("svd-llm", "cospadi", "rocket")


@pytest.fixture
def tiny(narrow_llama: Path) -> Path:
    return narrow_llama


@pytest.fixture
def calib(text_file: Path) -> Path:
    return text_file


def _compress(tiny: Path, out: Path, calib: Path, method: str, **kw) -> Path:
    kw.setdefault("calib_samples", 8)
    kw.setdefault("calib_seq_len", 64)
    return compress(tiny, out, method=method, calib=None if method == "svd" else calib,
                    calib_cache=out.parent / "grams.safetensors", progress=False, **kw)


@pytest.mark.parametrize("method", ["svd", *CALIBRATED])
@pytest.mark.parametrize("allocation", ["uniform", "knapsack"])
def test_ratio_zero_reproduces_dense_weights(tiny, calib, tmp_path, method, allocation):
    out = _compress(tiny, tmp_path / "ckpt", calib, method, ratio=0.0, allocation=allocation)
    ckpt, dense = validate_checkpoint(out), open_checkpoint(tiny)
    assert ckpt.modules and all(spec["scheme"] == "dense" for spec in ckpt.modules.values())
    for module in ckpt.modules:
        assert torch.equal(ckpt.reconstruct(module), dense.tensor(f"{module}.weight").float())


@pytest.mark.parametrize("method", CALIBRATED)
@pytest.mark.parametrize("allocation", ["uniform", "knapsack"])
def test_compressed_checkpoint_meets_budget_and_reports(tiny, calib, tmp_path, method, allocation):
    out = _compress(tiny, tmp_path / "ckpt", calib, method, ratio=0.3, allocation=allocation)
    validate_checkpoint(out)
    summary = compression_summary(out)
    # The default budget counts bytes (indices included); the parameter ratio is then at least as high.
    assert summary["bytes_ratio"] >= 0.3 and summary["ratio"] >= summary["bytes_ratio"]
    report = json.loads((out / REPORT_JSON).read_text())
    assert (out / REPORT_PNG).stat().st_size > 1000
    assert len(report["layers"]) == len(open_checkpoint(out).modules)
    assert all(0.0 <= layer["whitened_error"] < 1.0 for layer in report["layers"])
    assert report["producer"]["calibration"]["text"] == "calib.txt"


def test_knapsack_uses_levels_and_beats_uniform_error(tiny, calib, tmp_path):
    uniform = _compress(tiny, tmp_path / "u", calib, "svd-llm", ratio=0.4, allocation="uniform")
    knapsack = _compress(tiny, tmp_path / "k", calib, "svd-llm", ratio=0.4, allocation="knapsack")
    errors = [sum(layer["weight_error"] for layer in json.loads((p / REPORT_JSON).read_text())["layers"])
              for p in (uniform, knapsack)]
    levels = {layer["level"] for layer in json.loads((knapsack / REPORT_JSON).read_text())["layers"]}
    assert len(levels) > 1
    assert errors[1] < errors[0]


def test_knapsack_objective_is_capped_relative_weight_error():
    """Pins the allocation objective: Σ ‖W − Ŵ‖/‖W‖ over ROCKET's capped options, exactly optimal."""
    _, weight, gram = _correlated()
    whitening = Whitening(gram, 48)
    modules = ["a", "b", "c"]
    scaled = {"a": weight, "b": 3.0 * weight[:16], "c": weight.flip(1)}
    profile = profile_layers(modules, lambda m: (scaled[m], whitening, SvdLlm(scaled[m], whitening)), "svd-llm",
                             progress=False)
    for module in modules:
        w = scaled[module]
        assert profile[module][0.0] == (w.numel(), 0.0, 0.0)  # keep dense: the original weight, no error
        for level in PROFILE_LEVELS:
            if level in profile[module]:
                fact, whitened_error = SvdLlm(w, whitening).at_ratio(level)
                expected = float((w.double() - fact.reconstruct()).norm() / w.double().norm())
                assert profile[module][level] == pytest.approx((fact.stored_params, whitened_error, expected))
    for ratio in (0.2, 0.3, 0.5):
        levels = knapsack_levels(profile, ratio)
        total = sum(profile[m][0.0][0] for m in modules)
        assert sum(profile[m][levels[m]][0] for m in modules) <= (1 - ratio) * total
        reference_level = min(lv for lv in PROFILE_LEVELS if lv >= ratio)
        reference = sum(profile[m][reference_level][2] for m in modules) / 3
        options = [sorted(profile[m]) for m in modules]
        costs = [[profile[m][lv][0] for lv in opts] for m, opts in zip(modules, options)]
        errors = [[profile[m][lv][2] for lv in opts] for m, opts in zip(modules, options)]
        allowed = cap_options(costs, errors, reference, int((1 - ratio) * total))
        best = _brute_force([[c[i] for i in a] for c, a in zip(costs, allowed)],
                            [[e[i] for i in a] for e, a in zip(errors, allowed)], int((1 - ratio) * total))
        assert sum(profile[m][levels[m]][2] for m in modules) == pytest.approx(best)


def test_error_cap_drops_outliers_with_the_least_feasible_alpha():
    costs, errors = [[10, 6, 1]] * 2, [[0.0, 0.3, 0.5]] * 2
    # Uncapped, keeping one layer dense and destroying the other sums to less error (0.5 < 0.6) ...
    assert sorted(solve_knapsack(costs, errors, 12)) == [0, 2]
    # ... the cap (α = 1 is feasible at budget 12) removes the 0.5 options, so both get the moderate one.
    allowed = cap_options(costs, errors, reference=0.3, budget=12)
    assert allowed == [[0, 1], [0, 1]]
    assert solve_knapsack([[c[i] for i in a] for c, a in zip(costs, allowed)],
                          [[e[i] for i in a] for e, a in zip(errors, allowed)], 12) == [1, 1]
    # Budget 8 needs the 0.5 options: α grows to the first value with 0.5 <= α·0.3 (1.7).
    assert cap_options(costs, errors, reference=0.3, budget=8) == [[0, 1, 2]] * 2
    # α grows only as far as needed: here to 1.3, which admits 0.3 but not 0.5.
    assert cap_options(costs, errors, reference=0.3 * 1.7 / 2.1, budget=12) == [[0, 1]] * 2
    # No α <= 2 is feasible: the cap is lifted rather than failing.
    assert cap_options(costs, errors, reference=0.1, budget=8) == [[0, 1, 2]] * 2


def test_cospadi_is_deterministic_with_seed(tiny, calib, tmp_path):
    outs = [_compress(tiny, tmp_path / f"c{i}", calib, "cospadi", ratio=0.3, seed=seed)
            for i, seed in enumerate((1, 1, 2))]
    module = next(iter(open_checkpoint(outs[0]).modules))
    recon = [open_checkpoint(o).reconstruct(module) for o in outs]
    assert torch.equal(recon[0], recon[1])
    assert not torch.equal(recon[0], recon[2])


def _brute_force(costs, errors, budget):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[p] for c, p in zip(costs, picks)) <= budget:
            total = sum(e[p] for e, p in zip(errors, picks))
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_matches_brute_force_and_respects_budget(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 5)
    costs = [[rng.randint(1, 30) for _ in range(rng.randint(1, 4))] for _ in range(layers)]
    errors = [[rng.random() for _ in c] for c in costs]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    picks = solve_knapsack(costs, errors, budget)
    assert sum(c[p] for c, p in zip(costs, picks)) <= budget
    assert sum(e[p] for e, p in zip(errors, picks)) == pytest.approx(_brute_force(costs, errors, budget))


def test_knapsack_discretized_costs_never_exceed_budget():
    rng = random.Random(0)
    costs = [[rng.randint(1000, 9000) for _ in range(6)] for _ in range(40)]
    errors = [[rng.random() for _ in c] for c in costs]
    budget = 150_000
    picks = solve_knapsack(costs, errors, budget, unit=97.3)
    assert sum(c[p] for c, p in zip(costs, picks)) <= budget


def test_knapsack_infeasible_budget_raises():
    with pytest.raises(CompressionError, match="no allocation fits"):
        solve_knapsack([[10, 20], [10]], [[0.5, 0.0], [0.0]], 15)


def _correlated(in_features=48, out_features=32, tokens=2000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=gen) * torch.logspace(0, -2, in_features)[:, None]
    x = torch.randn(tokens, in_features, generator=gen) @ mixing
    weight = torch.randn(out_features, in_features, generator=gen)
    return x, weight, (x.t() @ x).double() / tokens


def test_whitening_lowers_activation_error_vs_plain_svd():
    x, weight, gram = _correlated()
    plain, whitened = SvdLlm(weight, Whitening(None, 48)), SvdLlm(weight, Whitening(gram, 48))
    for rank in (4, 8, 16):
        errs = [float((x @ (weight - s.at_rank(rank)[0].reconstruct().float()).t()).norm()) for s in (plain, whitened)]
        assert errs[1] < 0.9 * errs[0]
        # Truncation-aware: the error read off the singular values is the true output error.
        fact, predicted = whitened.at_rank(rank)
        assert relative_errors(weight, fact.reconstruct(), whitened.whitening)[1] == pytest.approx(predicted, rel=1e-6)


def test_rocket_with_ks_one_is_svd_llm_and_sparse_is_better():
    _, weight, gram = _correlated()
    whitening = Whitening(gram, 48)
    rocket, svd = Rocket(weight, whitening), SvdLlm(weight, whitening)
    _, err_full = rocket.sparse_dictionary(10, 10)
    assert err_full == pytest.approx(svd.at_rank(10)[1], rel=1e-4)
    fact, err = rocket.at_ratio(0.4)
    assert err <= svd.at_ratio(0.4)[1] + 1e-9
    assert relative_errors(weight, fact.reconstruct(), whitening)[1] == pytest.approx(err, rel=1e-3)


def test_rocket_refinement_lowers_the_error_keeps_the_support_and_reports_the_true_error():
    _, weight, gram = _correlated()
    whitening = Whitening(gram, 48)
    single = Rocket(weight, whitening, refine_iterations=0)
    refined = Rocket(weight, whitening, refine_iterations=3)
    (fact0, err0), (fact3, err3) = single.sparse_dictionary(16, 8), refined.sparse_dictionary(16, 8)
    assert err3 < 0.97 * err0
    # Same support (the refit moves values, never positions), exactly s per output row.
    support0, support3 = (f.tensors["coef_indices"].sort(dim=1).values for f in (fact0, fact3))
    assert torch.equal(support0, support3)
    assert relative_errors(weight, fact3.reconstruct(), whitening)[1] == pytest.approx(err3, rel=1e-3)


def test_refit_coefficients_reaches_the_least_squares_solution_on_the_support():
    torch.manual_seed(0)
    dictionary, target = torch.randn(12, 30, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64)
    support = torch.zeros(5, 12, dtype=torch.bool)
    for row in range(5):
        support[row, torch.randperm(12)[:4]] = True
    start = torch.randn(5, 12, dtype=torch.float64) * support  # a warm start away from the solution
    coef = refit_coefficients(start, support, dictionary, target, steps=4)  # CG is exact in s = 4 steps
    for row in range(5):
        atoms = dictionary[support[row]]
        expected = torch.linalg.lstsq(atoms.t(), target[row]).solution
        assert torch.allclose(coef[row, support[row]], expected, atol=1e-8)
        assert torch.equal(coef[row] != 0, support[row])


def test_cospadi_keeps_exactly_s_per_row():
    _, weight, gram = _correlated()
    fact, err = CoSpaDi(weight, Whitening(gram, 48)).at_ratio(0.3)
    assert fact.scheme == "dictsparse" and fact.fields["atoms"] // 2 == fact.fields["nnz"]
    indices = fact.tensors["coef_indices"].long()
    assert indices.shape[1] == fact.fields["nnz"] and (indices[:, 1:] > indices[:, :-1]).all()
    assert 0 < err < 1


def test_singular_gram_gets_ridge_and_clear_warning():
    x = torch.randn(100, 8) @ torch.randn(8, 24)  # rank 8 inputs for a 24-wide linear
    with pytest.warns(UserWarning, match="singular"):
        whitening = Whitening((x.t() @ x).double(), 24, "layers.0.q_proj")
    fact, err = SvdLlm(torch.randn(16, 24), whitening).at_rank(4)
    assert whitening.ridge > 0 and torch.isfinite(fact.reconstruct()).all() and err < 1


def test_bad_inputs_get_clear_errors(tiny, calib, tmp_path):
    with pytest.raises(CompressionError, match="calibration text file not found"):
        _compress(tiny, tmp_path / "a", tmp_path / "missing.txt", "rocket", ratio=0.3)
    with pytest.raises(CompressionError, match="give --calib"):
        compress(tiny, tmp_path / "b", method="svd-llm", ratio=0.3, progress=False)
    with pytest.raises(CompressionError, match="out of range"):
        _compress(tiny, tmp_path / "c", calib, "rocket", ratio=1.2)
    short = tmp_path / "short.txt"
    short.write_text(local_text()[:20_000])
    with pytest.raises(CompressionError, match="too little calibration data"):
        compress(tiny, tmp_path / "d", method="svd-llm", ratio=0.3, calib=short, calib_samples=2, calib_seq_len=32,
                 progress=False)
    with pytest.raises(CompressionError, match="calibration text has"):
        compress(tiny, tmp_path / "e", method="svd-llm", ratio=0.3, calib=short, calib_samples=500, progress=False)
    with pytest.raises(CompressionError, match="--method"):
        _compress(tiny, tmp_path / "f", calib, "armor", ratio=0.3)
    config = json.loads((tiny / "config.json").read_text())
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    (other / "model.safetensors").symlink_to(tiny / "model.safetensors")
    with pytest.raises(CompressionError, match="architectures"):
        _compress(other, tmp_path / "g", calib, "svd-llm", ratio=0.3)
