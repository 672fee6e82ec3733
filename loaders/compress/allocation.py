"""Global allocation of the byte (or parameter) budget across layers (ROCKET's multiple-choice knapsack).

Every layer offers a few options (keep dense, or compress at one of the profiled levels),
each with a cost (stored bytes with indices counted, or with ``--budget params`` stored float
values only, as the papers count) and an
error (ROCKET's relative weight-space error ``‖W − Ŵ‖/‖W‖``; see ``run.knapsack_levels``).
Pick one option per layer so that the total cost stays within ``(1 − R)·Σ dense`` and the
summed error is least, after ROCKET's cap has removed options far worse than the average.

Solved exactly by dynamic programming over discretized costs: each cost is rounded *up* to
whole units of ``unit`` (bytes or parameters), so any discretized-feasible choice is truly feasible and
the budget is never exceeded. With ``unit = 1`` (integer costs) the DP is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from slimserve.errors import CompressionError

# Discretization of the whole-model dense cost (ROCKET's param_precision is 50,000).
PRECISION = 50_000
# ROCKET's error cap multipliers α (its postprocess.py scans 1.0, 1.1, ..., 2.0).
CAP_ALPHAS = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))


def solve_knapsack(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
                   unit: float = 1.0) -> list[int]:
    """Option index per layer minimizing Σ error with Σ cost <= ``budget``.

    ``costs[l][i]`` and ``errors[l][i]`` describe option i of layer l. Raises
    ``CompressionError`` when even the cheapest option of every layer exceeds the budget.
    """
    capacity = _capacity(budget, unit)
    if capacity < 0:
        raise CompressionError(f"budget {budget} is negative")
    # best[c] = least total error of the layers so far using exactly c units (inf: unreachable).
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for layer, (layer_costs, layer_errors) in enumerate(zip(costs, errors)):
        new = np.full(capacity + 1, np.inf)
        for option, (cost, error) in enumerate(zip(layer_costs, layer_errors)):
            units = _units(cost, unit)
            if units > capacity:
                continue
            candidate = best[: capacity + 1 - units] + error
            target = new[units:]
            better = candidate < target
            target[better] = candidate[better]
            choices[layer, units:][better] = option
        best = new
    if not np.isfinite(best).any():
        cheapest = sum(min(c) for c in costs)
        raise CompressionError(f"no allocation fits the budget of {budget} (bytes or parameters); "
                               f"the cheapest option of every layer needs {cheapest}")
    used = int(np.argmin(best))
    picks = []
    for layer in range(len(costs) - 1, -1, -1):
        option = int(choices[layer, used])
        picks.append(option)
        used -= _units(costs[layer][option], unit)
    return picks[::-1]


def cap_options(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], reference: float, budget: int,
                unit: float = 1.0) -> list[list[int]]:
    """Per layer, the option indices ROCKET's cap keeps: error <= α·``reference``, α the least feasible.

    ``reference`` is the mean layer error at uniform compression. A summed error is indifferent
    between many moderate errors and one huge one, but a model is not (one destroyed layer
    ruins it), so ROCKET drops options worse than α times that mean, for the smallest α in
    ``CAP_ALPHAS`` at which the cheapest remaining options still fit the budget (all options
    when none does).
    """
    capacity = _capacity(budget, unit)
    for alpha in CAP_ALPHAS:
        allowed = [[i for i, error in enumerate(errs) if error <= alpha * reference] for errs in errors]
        if all(allowed) and sum(min(_units(c[i], unit) for i in a) for c, a in zip(costs, allowed)) <= capacity:
            return allowed
    return [list(range(len(errs))) for errs in errors]


def _capacity(budget: int, unit: float) -> int:
    return int(math.floor(budget / unit + 1e-9))


def _units(cost: int, unit: float) -> int:
    """A cost in whole units, rounded up so that the discretized budget is never exceeded."""
    return int(math.ceil(cost / unit - 1e-9))


def knapsack_unit(total_dense: int, precision: int = PRECISION) -> float:
    """Cost (bytes or parameters) per discretization unit: the whole model's dense cost over ``precision`` units."""
    return max(1.0, total_dense / precision)
