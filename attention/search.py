"""The per-layer decision of the Sparse-vDiT offline search (paper Eq. 2-3, Algorithm 1).

For one (step, layer) and the calibration batch, every mode runs on every head; head ``h``
scores ``L_i = MSE(O_i,h, O_full,h) + lam * (1 - S_i)``, where ``S_i`` is the fraction of tiles
mode ``i`` skips. It takes ``argmin_i L_i`` unless every ``L_i > eps``, in which case it keeps
full attention. The chosen per-head outputs are returned so the caller feeds them forward
(the search is greedy along the sparse trajectory, not the dense one).

The cost uses ``lam * (1 - S_i)`` (Eq. 2 and Figure 5); Algorithm 1's ``lam * S_i`` would
reward density and is read as a typo (docs/methods/sparse_vdit.md, "The offline search").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.attention.kernels import fused_attention, mode_attention, padding_mask
from slimserve.attention.patterns import (
    SPARSE_MODES,
    Mode,
    PatternParams,
    VideoLayout,
    num_blocks,
    sparsity,
    text_blocks,
)

# Query rows sampled to estimate key-column mass for stripe heads: enough to find the heavy
# columns, few enough that the estimate costs a fraction of one attention call.
STRIPE_SAMPLE_ROWS = 256


@dataclass
class LayerChoice:
    """What the search picked for one (step, layer)."""

    modes: list[Mode]
    stripes: dict[int, tuple[int, ...]]
    output: torch.Tensor  # (batch, heads, seq, dim): the chosen modes' outputs, fed forward
    losses: torch.Tensor  # (heads, len(SPARSE_MODES)): L_i per head and sparse mode


def stripe_columns(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, params: PatternParams, key_valid: torch.Tensor | None = None
) -> dict[int, tuple[int, ...]]:
    """Per head, the ``stripe_blocks`` video key blocks that receive the most attention mass.

    Text blocks are always kept by the stripe mask, so they are not candidates.
    """
    batch, heads, seq, dim = q.shape
    rows = torch.linspace(0, seq - 1, min(seq, STRIPE_SAMPLE_ROWS), device=q.device).long()
    scores = q[:, :, rows] @ k.transpose(-1, -2) * dim**-0.5
    pad = padding_mask(key_valid, seq)
    if pad is not None:
        scores = scores.masked_fill(~pad, -float("inf"))
    mass = scores.softmax(-1).sum(dim=(0, 2))  # (heads, seq)
    total = num_blocks(layout, params.block_size)
    mass = torch.nn.functional.pad(mass, (0, total * params.block_size - seq)).view(heads, total, -1).sum(-1)
    candidates = [b for b in range(total) if b not in text_blocks(layout, params.block_size)]
    mass = mass[:, candidates]
    top = mass.topk(min(params.stripe_blocks, len(candidates)), dim=-1).indices
    return {h: tuple(sorted(candidates[i] for i in top[h].tolist())) for h in range(heads)}


def choose_modes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    params: PatternParams,
    lam: float = 0.5,
    eps: float = 1.0,
    backend: str = "auto",
    key_valid: torch.Tensor | None = None,
) -> LayerChoice:
    """Run all modes on ``(batch, heads, seq, dim)`` inputs and pick one mode per head."""
    heads = q.shape[1]
    full = mode_attention(q, k, v, Mode.FULL, layout, params, key_valid=key_valid)
    stripes = stripe_columns(q, k, layout, params, key_valid)
    outputs = {Mode.FULL: full}
    losses = torch.empty(heads, len(SPARSE_MODES), dtype=torch.float64)
    for i, mode in enumerate(SPARSE_MODES):
        out = fused_attention(q, k, v, [mode] * heads, layout, params, stripes, backend, key_valid)
        outputs[mode] = out
        mse = (out.float() - full.float()).square().mean(dim=(0, 2, 3)).double()
        kept = torch.tensor(
            [1.0 - sparsity(mode, layout, params, stripes[h] if mode is Mode.STRIPE else None) for h in range(heads)],
            dtype=torch.float64,
        )
        losses[:, i] = mse.cpu() + lam * kept
    best = losses.argmin(dim=1)
    modes = [Mode.FULL if bool((losses[h] > eps).all()) else SPARSE_MODES[int(best[h])] for h in range(heads)]
    output = torch.stack([outputs[mode][:, h] for h, mode in enumerate(modes)], dim=1)
    chosen_stripes = {h: stripes[h] for h, mode in enumerate(modes) if mode is Mode.STRIPE}
    return LayerChoice(modes=modes, stripes=chosen_stripes, output=output, losses=losses)
