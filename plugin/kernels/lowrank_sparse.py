"""``y = (x Vᵀ) Uᵀ + x Sᵀ`` as one operator, for S stored as a bitmask or where the factors are bf16 panels.

A lowrank_sparse layer runs three products and an add; a fused layer (q/k/v, gate/up) runs one U per
shard besides, on its slice of ``x Vᵀ``, and concatenates them. Each product as its own operator
costs a dispatch of about 10 µs, and a split, copies and a concatenation besides: on the real
SmolLM2 (30 layers of four such layers, most of them small) one decoded token spent about 4 ms of
its 21 ms in those layers outside the kernels. Two operators cut that down.

``slimserve::lowrank_sparse_folded`` (hosts whose bf16 steps run the bitmask kernel's dot loop and
have no tile unit: AMD Zen 4) stores each row of U after S's values in S's bitmask layout and V as plain
rows, so a few-token step is one kernel call: ``x Vᵀ`` and then one bitmask
product of ``[x | x Vᵀ]``, with U streamed in the same pass as S. oneDNN ran each U (a GEMM of a few
hundred inputs) well under its memory rate, and a call on SmolLM2's small V's cost about 22 µs. Weights
streamed from memory, 2 threads, the benchmark Llama at 30 % of bytes (8 layers): one token 18.1 ms
against 22.0 with V, S and each U apart (dense 29.8), 8 tokens 28.8 against 31.7 (28.9), level from 32 to
500 tokens; SmolLM2's shapes (30 layers): one token 8.2 against 15.3 (dense 10.6). Many-token steps run
``x Vᵀ`` and each U by ATen's GEMM on the stored rows and S's strips on the leading part of each row (the
strips take row-strided views): the same work as apart (docs/methods/lowrank_sparse.md).

``slimserve::lowrank_sparse_panels`` (factors kept as bf16 panels: AVX2 hosts serving float32) crosses
the dispatcher once per layer: S's product runs first, then one C++ call (``bf16_panels_lowrank_add``)
multiplies V and adds each U's product of its slice of ``x Vᵀ`` straight into its columns of S's
output, so no concatenation or separate sum is made. Each factor takes the road
``bf16_panels_linear`` would give it (the panels loop, or for many tokens and few inputs the tiled
GEMM, which writes into the columns too).

Elsewhere the factors run on vLLM's prepacked oneDNN GEMMs, closures no operator can take as
arguments, and the layer keeps its three operators.
"""

from __future__ import annotations

import torch

from slimserve.loaders.schemes.sparse_rows import pack_mask
from slimserve.plugin.kernels.bitmask import DENSE_FROM_TOKENS, BitmaskMatmul, _cpu_kernel, bitmask_matmul
from slimserve.plugin.kernels.ell import EllMatmul, ell_matmul
from slimserve.plugin.kernels.gemm import (
    Bf16PanelsLinear,
    _bf16_panels_kernel,
    bf16_panels_lowrank,
    panels_strips_below,
)
from slimserve.plugin.kernels.ops import register_op


def _lowrank_sparse_panels_shape(x: torch.Tensor, v_panels: torch.Tensor, u_panels: list[torch.Tensor],
                                 u_outs: list[int], s_values: torch.Tensor, s_positions: torch.Tensor,
                                 s_bitmask: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(u_outs))


@register_op("lowrank_sparse_panels", fake=_lowrank_sparse_panels_shape)
def lowrank_sparse_panels(x: torch.Tensor, v_panels: torch.Tensor, u_panels: list[torch.Tensor], u_outs: list[int],
                          s_values: torch.Tensor, s_positions: torch.Tensor, s_bitmask: bool) -> torch.Tensor:
    """``[N, Σ u_outs]``: S's product (bitmask ``s_positions`` = mask, else ELL indices), then each U's product of
    its slice of ``x Vᵀ`` (as wide as U's inputs, in order) added into its ``u_outs`` columns."""
    y = (bitmask_matmul if s_bitmask else ell_matmul)(x, s_values, s_positions)
    ext = _bf16_panels_kernel()
    if ext is None:  # no compiler: the products through their PyTorch fallbacks
        return y + bf16_panels_lowrank(x, v_panels, u_panels, u_outs)
    ext.bf16_panels_lowrank_add(x, v_panels, u_panels, u_outs, y, panels_strips_below(x.shape[0]))
    return y


class LowRankSparsePanels:
    """``f(x) = (x Vᵀ) [U₁ | U₂ | …]ᵀ + x Sᵀ`` on one operator call, for V and every U kept as bf16 panels."""

    def __init__(self, v: Bf16PanelsLinear, us: list[Bf16PanelsLinear], sparse: BitmaskMatmul | EllMatmul) -> None:
        self.v_panels = v.panels
        self.u_panels = [u.panels for u in us]
        self.u_outs = [u.out_features for u in us]
        self.s_bitmask = isinstance(sparse, BitmaskMatmul)
        self.s_values = sparse.values
        self.s_positions = sparse.mask if self.s_bitmask else sparse.indices

    @staticmethod
    def usable(v: object, us: list[object]) -> bool:
        """Whether V and every U are bf16 panels (the only factors this operator takes)."""
        return isinstance(v, Bf16PanelsLinear) and all(isinstance(u, Bf16PanelsLinear) for u in us)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.lowrank_sparse_panels(x, self.v_panels, self.u_panels, self.u_outs, self.s_values,
                                                         self.s_positions, self.s_bitmask)


def fold_low_rank(values: torch.Tensor, mask: torch.Tensor, in_features: int,
                  us: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """S (bitmask ``values [out, s]``, ``mask [out, in/8]``) with the rows of the stacked ``us`` appended: each row's
    values are S's then its U's (zeros after a rank below the widest), and its mask bits over the inputs
    ``[x | x Vᵀ]`` mark its shard's ``widest`` columns of ``x Vᵀ`` from its slice's start (shard i's slice starts at
    the sum of the ranks before it; bits past its rank fall on later slices or spare columns and meet zeros)."""
    if in_features % 8:
        raise ValueError(f"fold_low_rank: S's mask must end on a byte: in_features {in_features} is no multiple of 8")
    out, nnz = values.shape
    if sum(u.shape[0] for u in us) != out:
        raise ValueError(f"fold_low_rank: the U's have {sum(u.shape[0] for u in us)} rows, S has {out}")
    widest = max(u.shape[1] for u in us)
    folded = values.new_zeros(out, nnz + widest)
    folded[:, :nnz] = values
    stored = torch.zeros(out, sum(u.shape[1] for u in us[:-1]) + widest, dtype=torch.bool)
    row = column = 0
    for u in us:
        folded[row:row + u.shape[0], nnz:nnz + u.shape[1]] = u.to(values.dtype)
        stored[row:row + u.shape[0], column:column + widest] = True
        row += u.shape[0]
        column += u.shape[1]
    return folded, torch.cat([mask, pack_mask(stored)], dim=1)


def _lowrank_sparse_folded_shape(x: torch.Tensor, v: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, nnz: int,
                                 u_rows: list[int], u_ranks: list[int]) -> torch.Tensor:
    return x.new_empty(x.shape[0], values.shape[0])


@register_op("lowrank_sparse_folded", fake=_lowrank_sparse_folded_shape)
def lowrank_sparse_folded(x: torch.Tensor, v: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, nnz: int,
                          u_rows: list[int], u_ranks: list[int]) -> torch.Tensor:
    """``[N, out]``: ``x Sᵀ`` plus each shard's U times its slice of ``x Vᵀ``, from ``fold_low_rank``'s layout (S's
    ``nnz`` values first in each row) and V ``[Σ ranks, in]`` as plain bf16 rows; the shards have ``u_rows``
    rows and ``u_ranks`` ranks, in order."""
    ext = _cpu_kernel()
    tokens, in_features = x.shape
    if tokens < DENSE_FROM_TOKENS:  # x Vᵀ, then one pass over [x | x Vᵀ], in one call
        return ext.bitmask_matmul_lowrank(x, v, values, mask)
    z = torch.mm(x, v.t())
    y = ext.bitmask_matmul_strips(x, values[:, :nnz], mask[:, :in_features // 8]).to(x.dtype)
    row = column = 0
    for rows, rank in zip(u_rows, u_ranks):
        y[:, row:row + rows].addmm_(z[:, column:column + rank], values[row:row + rows, nnz:nnz + rank].t())
        row += rows
        column += rank
    return y


class LowRankSparseFolded:
    """``f(x) = [S | U](x ‖ x Vᵀ)`` on ``lowrank_sparse_folded``: U stored inside S's rows, V as plain rows."""

    def __init__(self, v: torch.Tensor, us: list[torch.Tensor], sparse: BitmaskMatmul) -> None:
        self.v = v.to(sparse.values.dtype).contiguous()
        self.nnz = sparse.values.shape[1]
        self.u_rows = [u.shape[0] for u in us]
        self.u_ranks = [u.shape[1] for u in us]
        self.values, self.mask = fold_low_rank(sparse.values, sparse.mask, sparse.atoms, us)

    @staticmethod
    def usable(sparse: BitmaskMatmul | EllMatmul) -> bool:
        """Whether this host folds S's layer: bf16 bitmask values whole bytes wide, on the bitmask kernel's bf16 dot
        loop (AVX512_BF16) without a tile unit, where it was measured (bf16 batches on AMX take the tile unit's
        strips, which would decode U as well; not measured). The question is whether slimserve's own tile strips run
        (``amx_usable()``: built and permitted in this process), not ``cpu_has_amx_bf16()``."""
        ext = getattr(sparse, "ext", None)
        return (isinstance(sparse, BitmaskMatmul) and ext is not None and sparse.values.dtype == torch.bfloat16
                and sparse.atoms % 8 == 0 and hasattr(ext, "bitmask_matmul_lowrank") and not ext.amx_usable())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.lowrank_sparse_folded(x, self.v, self.values, self.mask, self.nnz,
                                                         self.u_rows, self.u_ranks)
