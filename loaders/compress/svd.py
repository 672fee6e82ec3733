"""Plain truncated SVD: W ≈ (U_r √Σ_r)(√Σ_r V_rᵀ), the uncalibrated low-rank baseline."""

from __future__ import annotations

import torch


def truncated_svd(weight: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Factor ``weight [out, in]`` into ``u [out, r]`` and ``v [r, in]`` (float32, √Σ split evenly)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return {"u": u[:, :rank] * root, "v": root[:, None] * vh[:rank]}
