"""``slimserve compress``: stream a dense HF model folder into a slimserve checkpoint, layer by layer.

Methods: ``svd`` (plain truncated SVD, uncalibrated), ``svd-llm`` (whitened SVD), ``cospadi``
(whitened sparse dictionary learning), ``rocket`` (eigenbasis + sparsified coefficients +
ridge dictionary refit), ``oats`` (low-rank + row-sparse) and ``sparsegpt`` / ``wanda`` (row-sparse
pruning, stored as ``lowrank_sparse`` of rank 0; their N:M form is ``prune.py``). ``budget`` says
what ``ratio`` counts (``bytes`` stored, indices included, by default; ``params`` as the papers
count; see ``budget.py``). Allocations: ``uniform``
(every decoder linear loses ``ratio`` of its bytes or parameters) or ``knapsack`` (every layer
is profiled at ``PROFILE_LEVELS`` and the multiple-choice knapsack picks one level per layer, or
keeps it dense, for the least summed relative weight-space error within the global budget, after ROCKET's error cap).

Only one layer's weight and one layer's Gram are in memory at a time; the source model is
read lazily and the writer streams shards.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import Checkpoint, CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.compress.allocation import cap_options, knapsack_unit, solve_knapsack
from slimserve.loaders.compress.budget import BUDGETS, PARAMS, Budget, check_ratio
from slimserve.loaders.compress.calibration import (
    DEFAULT_SEQ_LEN,
    DEFAULT_WINDOWS,
    Grams,
    SequentialGrams,
    load_or_collect_grams,
)
from slimserve.loaders.compress.cospadi import CoSpaDi
from slimserve.loaders.compress.oats import RANK_SHARE, Oats
from slimserve.loaders.compress.pruners import PRUNE_METHODS, RowPruner
from slimserve.loaders.compress.rocket import REFINE_ITERATIONS, Rocket
from slimserve.loaders.compress.whitening import Factorization, SvdLlm, Whitening, dense_option, relative_errors
from slimserve.loaders.models import check_architecture, decoder_linear_modules, layer_index

METHODS = ("svd", "svd-llm", "cospadi", "rocket", "oats", *PRUNE_METHODS)
CALIBRATED = ("svd-llm", "cospadi", "rocket", "oats", *PRUNE_METHODS)
ALLOCATIONS = ("uniform", "knapsack")
# Levels (fraction of a layer's bytes or parameters removed, as the budget counts) the knapsack
# chooses from, besides "keep dense".
PROFILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
REPORT_JSON = "slimserve_report.json"
REPORT_PNG = "slimserve_report.png"


@dataclass
class LayerReport:
    """One decoder linear's outcome, for the JSON report and the plot."""

    module: str
    level: float
    scheme: str
    fields: dict[str, int]
    dense_params: int
    stored_params: int
    dense_bytes: int
    stored_bytes: int
    whitened_error: float
    weight_error: float


def check_rank_share(method: str, rank_share: float | None) -> float:
    """The low-rank share OATS will use; a named error for a share out of (0, 1) or given to another method."""
    if rank_share is None:
        return RANK_SHARE
    if method != "oats":
        raise CompressionError(f"--rank-share splits OATS's budget between U·V and S; --method {method} has no such "
                               "split", field="--rank-share")
    if not 0.0 < rank_share < 1.0:
        raise CompressionError(f"--rank-share {rank_share}: expected a share strictly between 0 and 1 (the rest "
                               "goes to the sparse part)", field="--rank-share")
    return rank_share


def compress(src: str | Path, out: str | Path, *, method: str = "svd", ratio: float | None = None,
             rank: int | None = None, calib: str | Path | None = None, calib_cache: str | Path | None = None,
             allocation: str = "uniform", budget: str = "bytes", seed: int = 0, calib_samples: int = DEFAULT_WINDOWS,
             calib_seq_len: int = DEFAULT_SEQ_LEN, sequential: bool = False, rank_share: float | None = None,
             progress: bool = True) -> Path:
    """Compress every decoder linear of ``src`` into ``out`` and write a per-layer report beside it.

    ``ratio`` is the fraction of decoder-linear bytes removed (``budget="bytes"``: everything
    stored counted, values in the checkpoint's dtype and indices) or of parameters removed
    (``budget="params"``: the papers' count, stored values only); ``rank`` (``svd`` only) fixes
    one rank for every layer instead. A layer whose compressed form would not be smaller than its
    dense weight is kept dense, so ratio 0 reproduces the dense model exactly. Calibrated methods
    need ``calib`` (a text file); its Grams are cached in ``calib_cache`` when given and reused by later runs.

    ``sequential`` calibrates each decoder layer on the outputs of the already-compressed layers
    below it (``SequentialGrams``) instead of the dense model's. The knapsack still profiles every
    layer on the one-pass dense Grams (it must see all layers before choosing), so sequential +
    knapsack = choose the levels from the cached one-pass profile, then compress layer by layer at
    those levels on sequential Grams. Only the one-pass Grams are cached: sequential ones depend on
    what the layers below were compressed to.

    ``rank_share`` (``oats`` only) is the share of each layer's allowance its low-rank factors get
    (default ``RANK_SHARE``, the paper's rank ratio); the sparse part gets the rest.
    """
    if method not in METHODS:
        raise CompressionError(f"unknown --method {method!r}; expected one of {', '.join(METHODS)}")
    if allocation not in ALLOCATIONS:
        raise CompressionError(f"unknown --allocation {allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    if budget not in BUDGETS:
        raise CompressionError(f"unknown --budget {budget!r}; expected one of {', '.join(BUDGETS)}")
    if (ratio is None) == (rank is None):
        raise CompressionError("give exactly one of --ratio or --rank")
    if ratio is not None:
        check_ratio(ratio)
    if rank is not None and (rank <= 0 or method != "svd" or allocation != "uniform"):
        raise CompressionError(f"--rank {rank}: needs a positive rank, --method svd and --allocation uniform")
    share = check_rank_share(method, rank_share)
    method_settings = {"rank_share": share} if method == "oats" else {}  # in the profile key and producer record
    if method in CALIBRATED and calib is None:
        raise CompressionError(f"--method {method} is calibrated: give --calib FILE (plain text, e.g. a novel)")
    if sequential and method not in CALIBRATED:
        raise CompressionError(f"--sequential calibrates layer by layer: it needs a calibrated --method "
                               f"({', '.join(CALIBRATED)}), not {method}")
    ckpt, modules = open_dense_source(src, "compress")
    dtype = ckpt.float_dtype or ckpt.tensors[f"{modules[0]}.weight"].dtype
    # Factorizations are written in the checkpoint's dtype, so that is what a stored value costs.
    cost = Budget(budget, dtype.itemsize)

    with tempfile.TemporaryDirectory() as tmp:
        grams = sequential_grams = None
        knapsack = rank is None and allocation == "knapsack" and ratio != 0.0
        if method in CALIBRATED and (knapsack or not sequential):
            cache = Path(calib_cache) if calib_cache is not None else Path(tmp) / "grams.safetensors"
            grams = load_or_collect_grams(src, calib, cache, samples=calib_samples, seq_len=calib_seq_len,
                                          seed=seed, progress=progress)
        if sequential:
            sequential_grams = SequentialGrams(src, calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                                               progress=progress)
        layer = _layer_factory(ckpt, method, sequential_grams or grams, seed, cost, share)
        if rank is not None:
            levels = {m: None for m in modules}
        elif allocation == "uniform" or ratio == 0.0:
            levels = {m: ratio for m in modules}
        else:
            # The profile is cached beside the Grams, so later ratios of the same method reuse it.
            profile_cache = Path(calib_cache).with_suffix(f".{method}-profile.json") if calib_cache else None
            key = {"source": str(Path(src).resolve()), "grams": grams.spec.as_metadata() if grams else None,
                   "seed": seed if method == "cospadi" else None, "budget": budget,
                   "float_bytes": dtype.itemsize, **method_settings}
            profiler = _layer_factory(ckpt, method, grams, seed, cost, share, refine=False)
            profile = profile_layers(modules, profiler, method, progress, profile_cache, key, cost)
            levels = knapsack_levels(profile, ratio)
        producer = {"method": method, "ratio": ratio, "budget": budget, "rank": rank, "allocation": allocation,
                    "seed": seed, "source": Path(src).name, **method_settings}
        calibration = sequential_grams or grams
        if calibration is not None:
            producer["calibration"] = {"text": calibration.spec.text_name, "sha256": calibration.spec.text_sha256,
                                       "tokens": calibration.tokens, "sequential": sequential}
        writer = CheckpointWriter(out, ckpt.config, producer=producer)
        linear_weights = {f"{m}.weight" for m in modules}
        for name, tensor in iter_tensors(ckpt):
            if name not in linear_weights:
                writer.add_tensor(name, tensor)
        reports = []
        for module in tqdm(modules, desc=f"compress ({method}, {allocation})", disable=not progress):
            if sequential_grams is not None:
                sequential_grams.collect(layer_index(module))
            weight, whitening, compressor = layer(module)
            level = levels[module]
            if level is None:
                fact, _ = compressor.at_rank(rank)
            else:
                fact, _ = compressor.at_ratio(level) if level > 0 else (dense_option(weight), 0.0)
            reports.append(_report(module, level, fact, weight, whitening, dtype.itemsize))
            stored = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in fact.tensors.items()}
            writer.add_module(module, fact.scheme, stored, in_features=fact.in_features,
                              out_features=fact.out_features, **fact.fields)
            if sequential_grams is not None:
                sequential_grams.replace(module, fact.spec, stored)
        # Both counts in the producer record (config.json), whichever the ratio was given in.
        writer.producer.update(achieved_ratios(reports))
    copy_aux_files(src, out)
    path = writer.finish()
    write_report(path, producer, reports)
    return path


LayerFactory = Callable[[str], tuple[torch.Tensor, Whitening, SvdLlm | Rocket | CoSpaDi | Oats | RowPruner]]


def open_dense_source(src: str | Path, verb: str) -> tuple[Checkpoint, list[str]]:
    """The dense checkpoint a producer starts from and its decoder linear modules; named errors otherwise."""
    ckpt = open_checkpoint(src)
    if ckpt.quantization_config is not None:
        raise CompressionError(f"{src} is already a slimserve checkpoint; {verb} its dense original "
                               "or `slimserve densify` it first")
    check_architecture(ckpt.config, str(src))
    modules = decoder_linear_modules(ckpt.tensors)
    if not modules:
        raise CompressionError(
            f"{src}: found no decoder linear weights named like 'model.layers.N.self_attn.q_proj.weight'")
    return ckpt, modules


def _layer_factory(ckpt: Checkpoint, method: str, grams: Grams | SequentialGrams | None, seed: int,
                   budget: Budget, rank_share: float = RANK_SHARE,
                   refine: bool = True) -> LayerFactory:
    """A function loading one module's weight and Gram and preparing its method's compressor.

    ``refine=False`` (the knapsack profile) skips ROCKET's refinement rounds, which cost more
    than the rest of its factorization; the chosen factorizations are refined when written.
    """
    def layer(module: str):
        weight = ckpt.tensor(f"{module}.weight").float()
        whitening = Whitening(grams[module] if grams is not None else None, weight.shape[1], module)
        if method in ("svd", "svd-llm"):
            return weight, whitening, SvdLlm(weight, whitening, budget)
        if method == "oats":
            return weight, whitening, Oats(weight, whitening, grams[module], budget, rank_share=rank_share)
        if method in PRUNE_METHODS:
            return weight, whitening, RowPruner(method, weight, whitening, grams[module], budget)
        if method == "rocket":
            return weight, whitening, Rocket(weight, whitening, refine_iterations=REFINE_ITERATIONS if refine else 0,
                                             budget=budget)
        return weight, whitening, CoSpaDi(weight, whitening, seed=seed, budget=budget)
    return layer


def profile_layers(modules: list[str], layer: LayerFactory, method: str, progress: bool,
                   cache: Path | None = None,
                   key: dict | None = None,
                   budget: Budget = PARAMS) -> dict[str, dict[float, tuple[int, float, float]]]:
    """Per module: {level: (cost, relative whitened error, relative weight error)}, 0.0 = keep dense.

    The cost is in ``budget``'s unit (stored bytes, or parameters as the papers count).

    The profile depends on the model, the Grams and the method, not on the ratio, so with a
    ``cache`` file (matched on ``key``) every later ratio reuses it.
    """
    key = {"method": method, "levels": list(PROFILE_LEVELS), "fields": f"{budget.unit},whitened,weight",
           **(key or {})}
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return {m: {float(lv): tuple(v) for lv, v in opts.items()} for m, opts in stored["profile"].items()}
    profile = {}
    for module in tqdm(modules, desc=f"profile ({method})", disable=not progress):
        weight, _, compressor = layer(module)
        options = {0.0: (budget.dense_cost(*weight.shape), 0.0, 0.0)}
        for level in PROFILE_LEVELS:
            fact, error = compressor.at_ratio(level)
            if fact.scheme != "dense":
                weight_error = float((weight - fact.reconstruct()).norm() / weight.norm().clamp_min(1e-30))
                options[level] = (fact.cost(budget), error, weight_error)
        profile[module] = options
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "profile": profile}))
    return profile


def knapsack_levels(profile: dict[str, dict[float, tuple[int, float, float]]], ratio: float) -> dict[str, float]:
    """ROCKET's allocation for the global ``ratio``: one profiled level (or dense) per module.

    The budget ``(1 − R)·Σ dense cost`` and every option's cost are in the profile's unit: stored
    bytes (indices included) by default, parameters with ``--budget params``.

    Objective: the summed relative weight-space error ``‖W − Ŵ‖/‖W‖`` (ROCKET's own metric,
    docs/methods/compression.md), over the options left by ROCKET's error cap (``cap_options``) with the
    reference = mean error at the profiled level nearest above ``ratio``. On SmolLM2-135M at
    30 % the equal-weight summed relative *whitened* error without the cap made SVD-LLM 4.4x
    worse than uniform; this objective beats uniform (bench/README.md, issue 3).
    """
    modules = list(profile)
    options = [sorted(profile[m]) for m in modules]
    costs = [[profile[m][lv][0] for lv in opts] for m, opts in zip(modules, options)]
    errors = [[profile[m][lv][2] for lv in opts] for m, opts in zip(modules, options)]
    total = sum(profile[m][0.0][0] for m in modules)
    budget, unit = int((1.0 - ratio) * total), knapsack_unit(total)
    reference_level = min((lv for lv in PROFILE_LEVELS if lv >= ratio - 1e-9), default=PROFILE_LEVELS[-1])
    reference = sum(profile[m].get(reference_level, profile[m][0.0])[2] for m in modules) / len(modules)
    allowed = cap_options(costs, errors, reference, budget, unit)
    options, costs, errors = ([[row[i] for i in keep] for row, keep in zip(table, allowed)]
                              for table in (options, costs, errors))
    picks = solve_knapsack(costs, errors, budget, unit=unit)
    return {m: opts[p] for m, opts, p in zip(modules, options, picks)}


def _report(module: str, level: float | None, fact: Factorization, weight: torch.Tensor,
            whitening: Whitening, float_bytes: int) -> LayerReport:
    weight_error, whitened_error = relative_errors(weight, fact.reconstruct(), whitening)
    return LayerReport(module=module, level=level if level is not None else -1.0, scheme=fact.scheme,
                       fields=dict(fact.fields), dense_params=weight.numel(), stored_params=fact.stored_params,
                       dense_bytes=weight.numel() * float_bytes, stored_bytes=fact.stored_bytes(float_bytes),
                       whitened_error=whitened_error, weight_error=weight_error)


def achieved_ratios(reports: list[LayerReport]) -> dict[str, float]:
    """Fractions of decoder-linear parameters and bytes (indices included) removed."""
    dense, dense_bytes = sum(r.dense_params for r in reports), sum(r.dense_bytes for r in reports)
    return {"params_ratio_achieved": 1.0 - sum(r.stored_params for r in reports) / dense if dense else 0.0,
            "bytes_ratio_achieved": 1.0 - sum(r.stored_bytes for r in reports) / dense_bytes if dense_bytes else 0.0}


def write_report(out: Path, producer: dict, reports: list[LayerReport]) -> None:
    """``slimserve_report.json`` (per layer: level, scheme, rank/atoms/nnz, both sizes, errors) and a PNG plot.

    ``ratio_achieved`` is counted in the producer's budget unit; both counts are given beside it.
    """
    achieved = achieved_ratios(reports)
    unit = producer.get("budget", "params")
    summary = {"producer": producer, "ratio_achieved": achieved[f"{unit}_ratio_achieved"], **achieved,
               "error_metric": "relative Frobenius error; whitened = ‖(W−Ŵ)S‖/‖WS‖ with XᵀX = SSᵀ (activation "
                               "space), weight = ‖W−Ŵ‖/‖W‖",
               "layers": [asdict(r) for r in reports]}
    (out / REPORT_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    plot_report(summary, out / REPORT_PNG)


def plot_report(summary: dict, png: Path) -> None:
    """Per layer: the fraction of bytes and of parameters removed (bars) and the relative errors (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = summary["layers"]
    x = range(len(layers))
    removed = [1.0 - r["stored_params"] / r["dense_params"] for r in layers]
    removed_bytes = [1.0 - r["stored_bytes"] / r["dense_bytes"] for r in layers]
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.06), 4.5))
    ax.bar(x, removed, color="#9ecae1", label="parameters removed")
    ax.bar(x, removed_bytes, color="#3182bd", width=0.4, label="bytes removed (indices counted)")
    ax.plot(x, [r["whitened_error"] for r in layers], color="#d62728", lw=1, label="relative whitened error")
    ax.plot(x, [r["weight_error"] for r in layers], color="#555555", lw=0.8, ls=":", label="relative weight error")
    producer = summary["producer"]
    ax.set_title(f"{producer['method']} ratio={producer['ratio']} ({producer.get('budget', 'params')}) "
                 f"allocation={producer['allocation']}: {summary['bytes_ratio_achieved']:.1%} of decoder-linear "
                 f"bytes, {summary['params_ratio_achieved']:.1%} of parameters removed")
    ax.set_xlabel("decoder linear (by block, then name: down, gate, k, o, q, up, v)")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
