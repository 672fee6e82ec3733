"""The R-Sparse recipe search: per-module α at a fixed sparsity, by group-wise differential evolution.

The paper (Algorithm 1) searches the per-layer sparse share with an evolutionary algorithm,
fitness = perplexity on calibration text; its code is not released. This follows the public
third-party reimplementation (docs/methods/rsparse.md, "Recipe search"): the α vector is split into
groups of consecutive modules; one group is optimized at a time while the others stay at
their best-so-far values; each generation makes one DE/rand/1 child per member
(``x1 + F·(x2 − x3)``, binomial crossover, clipped to [0, 1]) and keeps the best of parents
and children. Thresholds and ranks are re-derived from the budget for every candidate, so
each candidate costs exactly (1−s) of the dense MACs. Fitness runs every token sparse (the
serving prefill is dense, so a dense-prefill fitness would not see the recipe at all).

The search starts from the best uniform α of ``UNIFORM_GRID`` on the fitness text (the paper
picked its uniform baseline, 0.95, the same way, by a grid search on its calibration samples),
so its result is never worse than any of those uniform recipes on that text; whether it
generalizes is measured on held-out text (bench/rsparse.py). On SmolLM2-135M α = 1 beats the
paper's 0.95 on held-out text, and a search seeded at 0.95 did not get back to it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimserve.loaders.compress.rsparse import UNIFORM_ALPHA, Calibrated
from slimserve.loaders.eval import windows_perplexity
from slimserve.loaders.reference import SchemeLinear, replace_linears
from slimserve.loaders.windows import perplexity_windows

# Uniform α values tried first; the best on the fitness text seeds the search.
UNIFORM_GRID = (0.9, UNIFORM_ALPHA, 1.0)


@dataclass(frozen=True)
class SearchSettings:
    """Scaled down from the third-party settings (population 32, 5 generations, group 28, F = CR = 0.5)."""

    population: int = 6
    generations: int = 2
    group_size: int = 42
    mutation: float = 0.5
    crossover: float = 0.5
    windows: int = 2
    seq_len: int = 256
    seed: int = 0


@dataclass
class SearchResult:
    alphas: dict[str, float]
    uniform_alpha: float
    uniform_ppl: float
    best_ppl: float
    evaluations: int
    seconds: float
    settings: SearchSettings
    history: list[dict] = field(default_factory=list)

    def report(self) -> dict:
        return {"uniform_alpha": self.uniform_alpha, "uniform_ppl": self.uniform_ppl, "best_ppl": self.best_ppl,
                "evaluations": self.evaluations, "seconds": round(self.seconds, 1),
                "settings": self.settings.__dict__, "history": self.history}


class RecipeFitness:
    """Perplexity of the model with a given α vector (every token sparse) on fixed text windows."""

    def __init__(self, model: torch.nn.Module, calibrated: Calibrated, sparsity: float, windows: list[list[int]]):
        self.model = model
        self.calibrated = calibrated
        self.sparsity = sparsity
        self.windows = windows
        self.evaluations = 0
        first = {m: self._module(m, UNIFORM_ALPHA) for m in calibrated.modules}
        replace_linears(model, first)
        named = dict(model.named_modules())
        self.layers: dict[str, SchemeLinear] = {m: named[m] for m in calibrated.modules}
        self.current: dict[str, float] = {m: UNIFORM_ALPHA for m in calibrated.modules}

    def _module(self, module: str, alpha: float) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors, fields = self.calibrated.module(module, self.sparsity, alpha)
        out_features, in_features = self.calibrated.factors[module].weight.shape
        return {"scheme": "rsparse", "in_features": in_features, "out_features": out_features, **fields}, tensors

    def __call__(self, alphas: list[float]) -> float:
        for module, alpha in zip(self.calibrated.modules, alphas):
            if self.current[module] != alpha:  # only the changed group is re-thresholded
                layer = self.layers[module]
                layer.spec, layer.tensors = self._module(module, alpha)
                self.current[module] = alpha
        self.evaluations += 1
        return windows_perplexity(self.model, self.windows)


def differential_evolution(fitness: Callable[[list[float]], float], start: list[float], start_fit: float,
                           settings: SearchSettings,
                           log: Callable[[str], None]) -> tuple[list[float], float, list[dict]]:
    """Group-wise DE from ``start`` (fitness ``start_fit``, values in [0, 1]); the best vector, its fitness, history."""
    rng = random.Random(settings.seed)
    best, best_fit = list(start), start_fit
    history = [{"group": None, "best_ppl": best_fit}]
    n = len(start)
    groups = [list(range(i, min(i + settings.group_size, n))) for i in range(0, n, settings.group_size)]
    for g, group in enumerate(groups):
        # Population: the best-so-far and random variations of it on this group's variables.
        members = [list(best)]
        for _ in range(settings.population - 1):
            member = list(best)
            for i in group:
                member[i] = min(1.0, max(0.0, best[i] + rng.uniform(-0.3, 0.3)))
            members.append(member)
        fits = [best_fit] + [fitness(m) for m in members[1:]]
        for gen in range(settings.generations):
            children = []
            for p in range(len(members)):
                x1, x2, x3 = rng.sample([m for q, m in enumerate(members) if q != p], 3)
                forced = rng.choice(group)
                child = list(members[p])
                for i in group:
                    if i == forced or rng.random() < settings.crossover:
                        child[i] = min(1.0, max(0.0, x1[i] + settings.mutation * (x2[i] - x3[i])))
                children.append(child)
            child_fits = [fitness(c) for c in children]
            ranked = sorted(zip(fits + child_fits, range(2 * len(members)), members + children))[:len(members)]
            fits, members = [f for f, _, _ in ranked], [m for _, _, m in ranked]
            log(f"rsparse search: group {g + 1}/{len(groups)} generation {gen + 1}/{settings.generations}: "
                f"best perplexity {fits[0]:.3f}, mean α in group {sum(members[0][i] for i in group) / len(group):.3f}")
        best, best_fit = members[0], fits[0]
        history.append({"group": g, "best_ppl": best_fit})
    return best, best_fit, history


def search_recipe(model: torch.nn.Module, calibrated: Calibrated, sparsity: float, *, text: str | Path,
                  settings: SearchSettings | None = None, tokenizer=None,
                  log: Callable[[str], None] = print) -> SearchResult:
    """Search per-module α for ``model`` (modified in place) at ``sparsity``; fitness on ``text``'s first windows."""
    from transformers import AutoTokenizer

    settings = settings or SearchSettings()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    windows = perplexity_windows(tokenizer, Path(text).read_text(), windows=settings.windows, seq_len=settings.seq_len,
                                 source=f"search text {text}")
    fitness = RecipeFitness(model, calibrated, sparsity, windows)
    began = time.perf_counter()
    uniform = {alpha: fitness([alpha] * len(calibrated.modules)) for alpha in UNIFORM_GRID}
    log("rsparse search: uniform " + ", ".join(f"α={a:.2f} perplexity {p:.3f}" for a, p in uniform.items()))
    start_alpha = min(uniform, key=uniform.get)
    best, best_fit, history = differential_evolution(fitness, [start_alpha] * len(calibrated.modules),
                                                     uniform[start_alpha], settings, log)
    result = SearchResult(alphas=dict(zip(calibrated.modules, best)), uniform_alpha=start_alpha,
                          uniform_ppl=uniform[start_alpha],
                          best_ppl=best_fit, evaluations=fitness.evaluations, seconds=time.perf_counter() - began,
                          settings=settings, history=history)
    log(f"rsparse search: {result.evaluations} evaluations in {result.seconds:.0f} s; perplexity "
        f"{result.uniform_ppl:.3f} (uniform α={start_alpha:.2f}) -> {result.best_ppl:.3f}; "
        f"mean α {sum(best) / len(best):.3f}, "
        f"{sum(a >= 1.0 for a in best)} of {len(best)} modules pure sparse")
    return result
