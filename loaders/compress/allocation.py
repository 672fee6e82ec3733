"""Global allocation of the parameter budget across layers (ROCKET's multiple-choice knapsack).

Every layer offers a few options (keep dense, or compress at one of the profiled levels),
each with a cost (stored float values, indices not counted, as the papers count) and an
error (relative whitened error). Pick one option per layer so that the total cost stays
within ``(1 − R)·Σ dense`` and the summed error is least.

Solved exactly by dynamic programming over discretized costs: each cost is rounded *up* to
whole units of ``unit`` parameters, so any discretized-feasible choice is truly feasible and
the budget is never exceeded. With ``unit = 1`` (integer costs) the DP is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from slimserve.loaders.errors import CompressionError

# Discretization of the whole-model dense parameter count (ROCKET's param_precision is 50,000).
PRECISION = 50_000


def solve_knapsack(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
                   unit: float = 1.0) -> list[int]:
    """Option index per layer minimizing Σ error with Σ cost <= ``budget``.

    ``costs[l][i]`` and ``errors[l][i]`` describe option i of layer l. Raises
    ``CompressionError`` when even the cheapest option of every layer exceeds the budget.
    """
    capacity = int(math.floor(budget / unit + 1e-9))
    if capacity < 0:
        raise CompressionError(f"parameter budget {budget} is negative")
    # best[c] = least total error of the layers so far using exactly c units (inf: unreachable).
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for layer, (layer_costs, layer_errors) in enumerate(zip(costs, errors)):
        new = np.full(capacity + 1, np.inf)
        for option, (cost, error) in enumerate(zip(layer_costs, layer_errors)):
            units = int(math.ceil(cost / unit - 1e-9))
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
        raise CompressionError(f"no allocation fits the budget of {budget} parameters; "
                               f"the cheapest option of every layer needs {cheapest}")
    used = int(np.argmin(best))
    picks = []
    for layer in range(len(costs) - 1, -1, -1):
        option = int(choices[layer, used])
        picks.append(option)
        used -= int(math.ceil(costs[layer][option] / unit - 1e-9))
    return picks[::-1]


def knapsack_unit(total_dense: int, precision: int = PRECISION) -> float:
    """Parameters per discretization unit: the whole model's dense count spread over ``precision`` units."""
    return max(1.0, total_dense / precision)
