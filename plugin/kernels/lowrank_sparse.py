"""``y = (x Vᵀ) Uᵀ + x Sᵀ`` as one operator, where the factors are bf16 panels (AVX2 hosts serving float32).

A lowrank_sparse layer runs three products and an add; a fused layer (q/k/v, gate/up) runs one U per
shard besides, on its slice of ``x Vᵀ``, and concatenates them. Each product as its own operator
costs a dispatch of about 10 µs, and a split, copies and a concatenation besides: on the real
SmolLM2 (30 layers of four such layers, most of them small) one decoded token spent about 4 ms of
its 21 ms in those layers outside the kernels. ``slimserve::lowrank_sparse_panels`` crosses the
dispatcher once per layer: S's product runs first, then one C++ call (``bf16_panels_lowrank_add``)
multiplies V and adds each U's product of its slice of ``x Vᵀ`` straight into its columns of S's
output, so no concatenation or separate sum is made. Each factor takes the road
``bf16_panels_linear`` would give it (the panels loop, or for many tokens and few inputs the tiled
GEMM, which writes into the columns too).

Only factors kept as bf16 panels (``Bf16PanelsLinear``) take it: elsewhere the factors run on
vLLM's prepacked oneDNN GEMMs, closures no operator can take as arguments, and the layer keeps
its three operators.
"""

from __future__ import annotations

import torch

from slimserve.plugin.kernels.bitmask import BitmaskMatmul, bitmask_matmul
from slimserve.plugin.kernels.ell import EllMatmul, ell_matmul
from slimserve.plugin.kernels.gemm import (
    STRIPS_BELOW_INPUTS,
    STRIPS_FROM_TOKENS,
    Bf16PanelsLinear,
    _bf16_panels_kernel,
    bf16_panels_linear,
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
        z = bf16_panels_linear(x, v_panels, sum(panels.shape[1] for panels in u_panels))
        column = start = 0
        for panels, width in zip(u_panels, u_outs):
            rank = panels.shape[1]
            y[:, column:column + width] += bf16_panels_linear(z[:, start:start + rank], panels, width)
            column += width
            start += rank
        return y
    # bf16_panels_linear's rule: short factors (a U's rank, a small model's V) take the tiled GEMM for many tokens
    ext.bf16_panels_lowrank_add(x, v_panels, u_panels, u_outs, y,
                                STRIPS_BELOW_INPUTS if x.shape[0] >= STRIPS_FROM_TOKENS else 0)
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
