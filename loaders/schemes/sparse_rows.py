"""Row-sparse matrices ``[out, k]`` with exactly s stored entries per row: the two stored encodings.

Any scheme that stores such a matrix (dictsparse's coefficients C, lowrank_sparse's S) uses the
functions here, so every encoding has one definition of its layout, byte count, validation and
reference product.

* **ELL** (ELLPACK): ``values [out, s]`` and ``indices [out, s]``, the column of each value,
  strictly increasing within a row. Indices are uint8 when k <= 256, int16 when k <= 32767, else
  int32 (``smallest_index_dtype``). Costs ``s · index_bytes`` a row beside the values.
* **BITMASK**: the same ``values [out, s]`` (packed in column order, so they equal the ELL values
  of the same matrix) and ``mask [out, ceil(k/8)]`` uint8: bit j of row r is set iff column j is
  stored. Bit order is little-endian within a byte: column j is bit ``j % 8`` (value ``1 << (j % 8)``)
  of byte ``j // 8``; the bits past k in a row's last byte are zero. Costs ``ceil(k/8)`` bytes a row
  beside the values, independent of s.

Both store the same s values a row, so the smaller encoding is the one with fewer bytes of
positions: bitmask when ``ceil(k/8) < s · index_bytes`` (e.g. k = 1024, s = 512: 128 bytes
against 1024 of int16 indices), else ELL. The choice never depends on the value dtype.
"""

from __future__ import annotations

import torch

from slimserve.loaders.schemes.base import smallest_index_dtype

ELL = "ell"
BITMASK = "bitmask"
ENCODINGS = (ELL, BITMASK)

_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)


def mask_bytes_per_row(k: int) -> int:
    """Bytes of one bitmask row over k columns."""
    return (k + 7) // 8


def position_bytes(encoding: str, out: int, k: int, s: int) -> int:
    """Bytes an encoding spends on positions (indices or mask) for an ``[out, k]`` matrix with s per row."""
    if encoding == ELL:
        return out * s * smallest_index_dtype(k).itemsize
    if encoding == BITMASK:
        return out * mask_bytes_per_row(k)
    raise ValueError(f"unknown row-sparse encoding {encoding!r}; expected one of {ENCODINGS}")


def encoding_bytes(encoding: str, out: int, k: int, s: int, value_bytes: int) -> int:
    """Bytes stored for the matrix in ``encoding``: s values of ``value_bytes`` a row plus positions."""
    return out * s * value_bytes + position_bytes(encoding, out, k, s)


def smallest_encoding(out: int, k: int, s: int) -> str:
    """The encoding storing the matrix in the fewest bytes (ELL on a tie: it needs no mask decoding)."""
    return BITMASK if position_bytes(BITMASK, out, k, s) < position_bytes(ELL, out, k, s) else ELL


# ---- ELL -------------------------------------------------------------------------------------------


def dense_to_ell(dense: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the s largest-magnitude entries of each row of ``dense [out, k]`` as ELL ``(values, indices)``.

    Rows with fewer nonzeros are padded with explicit zeros on unused columns, so every row has
    exactly s entries with strictly increasing indices (ties, zero padding included, go to the
    lower column, deterministically). Indices take ``smallest_index_dtype(k)``.
    """
    k = dense.shape[1]
    if s > k:
        raise ValueError(f"s={s} exceeds the number of columns {k}")
    order = torch.argsort(dense.abs(), dim=1, descending=True, stable=True)[:, :s]
    indices, _ = torch.sort(order, dim=1)
    return torch.gather(dense, 1, indices), indices.to(smallest_index_dtype(k))


def ell_to_dense(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """Expand ELL ``values, indices [out, s]`` to the dense ``[out, k]`` matrix (values' dtype)."""
    dense = torch.zeros(values.shape[0], k, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, indices.long(), values)


def ell_product(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Reference ``z [N, k] · Mᵀ -> [N, out]`` for M in ELL, reading only the stored columns, in z's dtype."""
    gathered = z[:, indices.long()]  # [N, out, s]
    return (gathered * values.to(z.dtype)).sum(dim=-1)


def ell_problem(indices: torch.Tensor, k: int) -> tuple[int, str, str] | None:
    """The first ELL index defect as ``(row, what, expected)``, or None: range, then strict order."""
    wide = indices.long()
    bad = (wide < 0) | (wide >= k)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        return row, f"index {int(wide[row, col])} at [{row}, {col}] is out of range", f"indices in [0, {k})"
    if wide.shape[1] > 1:
        unordered = (wide[:, 1:] <= wide[:, :-1]).any(dim=1)
        if unordered.any():
            row = int(unordered.nonzero()[0])
            return row, f"row {row} has repeated or unsorted indices", "strictly increasing indices per row"
    return None


# ---- BITMASK ---------------------------------------------------------------------------------------


def pack_mask(stored: torch.Tensor) -> torch.Tensor:
    """Boolean ``[out, k]`` -> uint8 ``[out, ceil(k/8)]``, column j at bit ``j % 8`` of byte ``j // 8``."""
    out, k = stored.shape
    padded = torch.zeros(out, mask_bytes_per_row(k) * 8, dtype=torch.uint8, device=stored.device)
    padded[:, :k] = stored.to(torch.uint8)
    weights = _BIT_WEIGHTS.to(stored.device)
    return (padded.view(out, -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``[out, ceil(k/8)]`` -> boolean ``[out, k]`` (bits past k dropped)."""
    weights = _BIT_WEIGHTS.to(mask.device)
    bits = (mask.unsqueeze(-1) & weights) != 0  # [out, bytes, 8]
    return bits.reshape(mask.shape[0], -1)[:, :k]


def ell_to_bitmask(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ELL -> BITMASK ``(values, mask)``; the values are unchanged since ELL indices increase per row."""
    stored = torch.zeros(values.shape[0], k, dtype=torch.bool, device=values.device)
    stored.scatter_(1, indices.long(), True)
    return values, pack_mask(stored)


def bitmask_to_ell(values: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BITMASK -> ELL ``(values, indices)`` (needs exactly s bits per row, as ``bitmask_problem`` checks)."""
    stored = unpack_mask(mask, k)
    columns = stored.nonzero()[:, 1].view(values.shape[0], values.shape[1])
    return values, columns.to(smallest_index_dtype(k))


def dense_to_bitmask(dense: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the s largest-magnitude entries per row (as ``dense_to_ell``) as BITMASK ``(values, mask)``."""
    values, indices = dense_to_ell(dense, s)
    return ell_to_bitmask(values, indices, dense.shape[1])


def bitmask_to_dense(values: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Expand BITMASK ``values [out, s]``, ``mask`` to the dense ``[out, k]`` matrix (values' dtype)."""
    stored = unpack_mask(mask, k)
    dense = torch.zeros(stored.shape, dtype=values.dtype, device=values.device)
    dense[stored] = values.reshape(-1)  # row-major order of set bits = each row's values in column order
    return dense


def bitmask_product(z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference ``z [N, k] · Mᵀ -> [N, out]`` for M in BITMASK, in z's dtype (through the dense M)."""
    return z @ bitmask_to_dense(values.to(z.dtype), mask, z.shape[1]).t()


def bitmask_problem(mask: torch.Tensor, k: int, s: int) -> tuple[int, str, str] | None:
    """The first mask defect as ``(row, what, expected)``, or None: a bit past column k, or a row without s bits."""
    tail_bits = mask_bytes_per_row(k) * 8 - k
    if tail_bits:
        past_k = (mask[:, -1].to(torch.int32) >> (8 - tail_bits)) != 0
        if past_k.any():
            row = int(past_k.nonzero()[0])
            return row, f"row {row} sets bits past column {k - 1} (last byte {int(mask[row, -1]):#04x})", \
                f"no bits at columns >= {k}"
    counts = unpack_mask(mask, k).sum(dim=1)
    wrong = counts != s
    if wrong.any():
        row = int(wrong.nonzero()[0])
        return row, f"row {row} has {int(counts[row])} bits set", f"exactly {s} bits per row (one per stored value)"
    return None
