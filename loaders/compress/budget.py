"""How many parameters a compressed layer may keep, as the papers count them.

The compression ratio R is the fraction of a layer's (and of the model's decoder-linear)
parameters removed: R = 0.3 keeps 70 %.
"""

from __future__ import annotations

from slimserve.errors import CompressionError


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise CompressionError(
            f"--ratio {ratio} is out of range; expected 0 <= ratio < 1 (fraction of parameters removed)")
    return ratio


def lowrank_rank(out_features: int, in_features: int, ratio: float) -> int:
    """Largest r with r·(out + in) <= (1 − R)·out·in, at least 1 and at most min(out, in)."""
    r = int((1.0 - ratio) * out_features * in_features // (out_features + in_features))
    return max(1, min(r, out_features, in_features))


def dictsparse_sizes(out_features: int, in_features: int, ratio: float, atoms_per_nnz: float = 2.0) -> tuple[int, int]:
    """Atoms k and nonzeros s per output with k·in + s·out <= (1 − R)·out·in and k/s = ρ.

    In the papers' notation d1 = in, d2 = out: k = (1 − R)·d1·d2 / (d1 + d2/ρ), s = k/ρ.
    """
    k = int((1.0 - ratio) * in_features * out_features / (in_features + out_features / atoms_per_nnz))
    k = max(1, k)
    s = max(1, int(k / atoms_per_nnz))
    while k * in_features + s * out_features > (1.0 - ratio) * out_features * in_features and k > 1:
        k -= 1
        s = max(1, int(k / atoms_per_nnz))
    return k, s
