"""What ``--ratio R`` counts, and how large a compressed layer may be within it.

Two conventions (``--budget``):

* ``bytes`` (the default): R is the fraction of a layer's (and of the model's decoder-linear)
  *stored bytes* removed, everything written counted: float values in the checkpoint's dtype,
  the indices or bit masks of sparse coefficients, and any other tensor the scheme stores. This
  is what memory, disk and decode speed follow: a user who asks for 30 % gets a file 30 % smaller.
* ``params``: R is the fraction of float *parameters* removed, indices not counted, as the
  papers (SVD-LLM, CoSpaDi, ROCKET) count them; kept for comparison tables with them.

The level sizes (lowrank rank, dictsparse atoms k and nonzeros s) are solved against the
scheme's own byte count (``Scheme.stored_bytes`` / ``stored_params``), so the budget is met by
what the writer actually stores, not by a separate formula that could drift from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimserve.errors import CompressionError
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.base import smallest_index_dtype
from slimserve.loaders.schemes.lowrank_sparse import sparse_encoding

BUDGETS = ("bytes", "params")


@dataclass(frozen=True)
class Budget:
    """The unit a ratio is counted in: ``"bytes"`` (with ``float_bytes`` per stored value) or ``"params"``."""

    unit: str = "params"
    float_bytes: int = 4

    def __post_init__(self) -> None:
        if self.unit not in BUDGETS:
            raise CompressionError(f"unknown --budget {self.unit!r}; expected one of {', '.join(BUDGETS)}")

    @property
    def value_cost(self) -> int:
        """Cost of one stored float value."""
        return self.float_bytes if self.unit == "bytes" else 1

    def index_cost(self, addressed: int) -> int:
        """Cost of one stored index into ``addressed`` positions (free when counting parameters)."""
        return smallest_index_dtype(addressed).itemsize if self.unit == "bytes" else 0

    def cost(self, scheme: str, spec: Mapping[str, Any]) -> int:
        """What one module stored as ``scheme`` with ``spec`` (scheme, in/out features, fields) costs."""
        if self.unit == "params":
            return SCHEMES[scheme].stored_params(spec)
        # the layout the writer will store (dictsparse: the smaller coefficient encoding), not a default one
        return SCHEMES[scheme].stored_bytes(SCHEMES[scheme].storage_spec(spec), self.float_bytes)

    def dense_cost(self, out_features: int, in_features: int) -> int:
        return out_features * in_features * self.value_cost

    def allowed(self, out_features: int, in_features: int, ratio: float) -> float:
        """The most a layer compressed by ``ratio`` may cost: ``(1 − R)`` of its dense cost."""
        return (1.0 - ratio) * self.dense_cost(out_features, in_features)


PARAMS = Budget("params")


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise CompressionError(
            f"--ratio {ratio} is out of range; expected 0 <= ratio < 1 (fraction of decoder-linear bytes, "
            "or with --budget params parameters, removed)")
    return ratio


def lowrank_rank(out_features: int, in_features: int, ratio: float, budget: Budget = PARAMS) -> int:
    """Largest r whose factors cost at most (1 − R) of the dense weight, at least 1 and at most min(out, in).

    lowrank stores no indices, so bytes and parameters give the same rank: r·(out + in) <= (1 − R)·out·in.
    """
    r = int((1.0 - ratio) * out_features * in_features // (out_features + in_features))
    r = max(1, min(r, out_features, in_features))
    limit = budget.allowed(out_features, in_features, ratio)
    while r > 1 and budget.cost("lowrank", _spec(out_features, in_features, rank=r)) > limit:
        r -= 1
    return r


def dictsparse_sizes(out_features: int, in_features: int, ratio: float, atoms_per_nnz: float = 2.0,
                     budget: Budget = PARAMS) -> tuple[int, int]:
    """Atoms k and nonzeros s per output, k/s = ρ, whose stored cost is at most (1 − R) of the dense weight.

    In the papers' notation d1 = in, d2 = out and counting parameters, k·in + s·out <= (1 − R)·d1·d2
    gives k = (1 − R)·d1·d2 / (d1 + d2/ρ), s = k/ρ. Counting bytes, each nonzero also stores its
    position: with v bytes a value and p position bytes a nonzero, v·k·in + (v + p)·s·out <= (1 − R)·v·out·in,
    where p is the smaller of an index (ELL) and a row's mask spread over its nonzeros (k/8/s = ρ/8 bytes).
    The estimate is then walked to the largest k whose exact cost (the encoding the writer picks) fits.
    """
    limit = budget.allowed(out_features, in_features, ratio)

    def fits(atoms: int) -> bool:
        nnz = max(1, int(atoms / atoms_per_nnz))
        return budget.cost("dictsparse", _spec(out_features, in_features, atoms=atoms, nnz=nnz)) <= limit

    k = 1
    for _ in range(2):  # the index width depends on k: estimate with the narrowest, then with k's own
        position = min(budget.index_cost(k), atoms_per_nnz / 8) if budget.unit == "bytes" else 0
        k = max(1, int(limit / (budget.value_cost * in_features + (budget.value_cost + position) * out_features
                                / atoms_per_nnz)))
    # Counting bytes, mask rounding (ceil(k/8)) leaves the estimate a little off either way; counting
    # parameters the closed form is the papers' own k, kept as they state it.
    while budget.unit == "bytes" and fits(k + 1):
        k += 1
    while k > 1 and not fits(k):
        k -= 1
    return k, max(1, int(k / atoms_per_nnz))


def lowrank_sparse_nnz(out_features: int, in_features: int, rank: int, limit: float,
                       budget: Budget = PARAMS) -> int | None:
    """Largest per-row count s of a ``lowrank_sparse`` layer of rank ``rank`` costing at most ``limit``.

    The cost is the scheme's own (factors + S in its smaller encoding, as the writer stores it);
    ``None`` when even s = 1 does not fit. Rank 0 is a plain row-sparse weight (the pruners').
    """
    def cost(nnz: int) -> int:
        return budget.cost("lowrank_sparse", _spec(out_features, in_features, rank=rank, nnz=nnz,
                                                   encoding=sparse_encoding(out_features, in_features, nnz)))

    if cost(1) > limit:
        return None
    low, high = 1, in_features  # cost is non-decreasing in s: bisect the largest s that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= limit else (low, mid - 1)
    return low


def _spec(out_features: int, in_features: int, **fields: int | str) -> dict[str, int | str]:
    return {"in_features": in_features, "out_features": out_features, **fields}
