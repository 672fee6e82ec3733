"""``rsparse``: R-Sparse rank-aware activation sparsity (Zhang et al., ICLR 2025).

Per token, input channel i is *exact* when its score ``|x_i|·‖W[:, i]‖₂`` exceeds a calibrated
static threshold t; exact channels use their weight columns, the rest go through the top-r
singular triplets of the same W:

    y = W (x ⊙ m) + U_r (S_r V_rᵀ (x ⊙ (1 − m))),   m_i = 1[|x_i|·‖W[:, i]‖₂ > t]

Stored per module (see FORMAT.md):

- ``weight_t [in, out]``: W transposed, so one input channel's weights are contiguous and a
  decode kernel skipping channel i skips one contiguous row;
- ``col_norm [in]``: ``‖W[:, i]‖₂`` over the *full* output (a tensor-parallel rank holding an
  output slice still needs the full norm for the same mask);
- ``u [out, r]`` and ``vs [r, in] = S_r V_rᵀ`` when ``rank > 0``.

Fields: ``rank`` (int, 0 exactly when alpha = 1), ``sparsity`` s, ``alpha`` (the share of the
kept budget given to exact channels, ρ in the paper) and ``threshold`` t (floats). The mode
follows alpha as in the official code: alpha = 1 is pure input thresholding (no low-rank
term), alpha = 0 is the plain rank-r product (no exact channel), anything else is both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes.base import Scheme, TensorSpec


def budget(in_features: int, out_features: int, sparsity: float, alpha: float) -> tuple[int, int, float]:
    """``(expected exact channels c, rank r, threshold quantile q)`` of one layer (official setup.py).

    ``c = max(⌊in·(1−s)·α⌋, 1)``, ``r = max(⌊(in·out·(1−s) − c·out)/(in+out)⌋, 1)`` capped by
    ``min(in, out)``, ``q = 1 − (1−s)·α``, so ``c·out + r·(in+out) ≈ (1−s)·in·out``. Shapes are
    the true (GQA) ones. alpha = 1 has no low-rank term, so its rank is 0.
    """
    kept = 1.0 - sparsity
    c = max(math.floor(in_features * kept * alpha), 1)
    rank = 0 if alpha >= 1.0 else max(math.floor((in_features * out_features * kept - c * out_features)
                                                 / (in_features + out_features)), 1)
    return c, min(rank, in_features, out_features), 1.0 - kept * alpha


class RSparseScheme(Scheme):
    name = "rsparse"
    fields = ("rank", "sparsity", "alpha", "threshold")

    def tensor_specs(self, spec: Mapping[str, Any]) -> list[TensorSpec]:
        out, inp, r = spec["out_features"], spec["in_features"], spec["rank"]
        specs = [TensorSpec("weight_t", (inp, out), out_dim=1, in_dim=0), TensorSpec("col_norm", (inp,), in_dim=0)]
        if r > 0:
            specs += [TensorSpec("u", (out, r), out_dim=0), TensorSpec("vs", (r, inp), in_dim=1)]
        return specs

    def check_fields(self, module: str, spec: Mapping[str, Any], file: str) -> None:
        where = f"quantization_config.modules.{module}"
        rank = spec.get("rank")
        largest = min(spec["in_features"], spec["out_features"])
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= largest:
            raise CheckpointError(f"module '{module}' has rank={rank!r}", file=file, field=f"{where}.rank",
                                  expected=f"an integer in [0, min(out, in)] = [0, {largest}]")
        ranges = {"sparsity": (0.0, 1.0, "a number in [0, 1)"), "alpha": (0.0, 1.0, "a number in [0, 1]")}
        for name, (low, high, text) in ranges.items():
            value = spec.get(name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
            if not ok or (name == "sparsity" and value >= 1.0):
                raise CheckpointError(f"module '{module}' has {name}={value!r}", file=file, field=f"{where}.{name}",
                                      expected=text)
        t = spec.get("threshold")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or math.isnan(t):
            raise CheckpointError(f"module '{module}' has threshold={t!r}", file=file, field=f"{where}.threshold",
                                  expected="a number (-Infinity makes every channel exact)")
        if (rank == 0) != (spec["alpha"] >= 1.0):
            raise CheckpointError(f"module '{module}' has rank={rank} with alpha={spec['alpha']}", file=file,
                                  field=f"{where}.rank", expected="rank 0 exactly when alpha = 1 (no low-rank term)")

    def check_values(self, module: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     files: Mapping[str, str]) -> None:
        norms = tensors["weight_t"].float().norm(dim=1)
        stored = tensors["col_norm"].float()
        if not torch.allclose(stored, norms, rtol=2e-2, atol=1e-3 * float(norms.max().clamp_min(1e-12))):
            i = int((stored - norms).abs().argmax())
            raise CheckpointError(f"entry {i} is {float(stored[i]):.6g} but ‖W[:, {i}]‖₂ = {float(norms[i]):.6g}",
                                  file=files["col_norm"], tensor=f"{module}.col_norm",
                                  expected="the L2 norm of each column of W (row of weight_t)")

    def reconstruct(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dense W: R-Sparse keeps it exactly (the factors only replace *small* activations)."""
        return tensors["weight_t"].float().t()

    def forward(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The R-Sparse product for every token of ``x [..., in]``, the ground truth of the fast paths."""
        alpha = float(spec["alpha"])
        if alpha <= 0.0:
            return low_rank(tensors, x)
        mask = exact_mask(x, tensors["col_norm"], float(spec["threshold"]))
        y = (x * mask) @ tensors["weight_t"].to(x.dtype)
        if alpha < 1.0:
            y = y + low_rank(tensors, x * ~mask)
        return y


def exact_mask(x: torch.Tensor, col_norm: torch.Tensor, threshold: float) -> torch.Tensor:
    """``m = |x|·‖W[:, i]‖₂ > t`` element-wise (per token), computed in float32."""
    return scores(x, col_norm) > threshold


def low_rank(tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``U_r (S_r V_rᵀ x)``: the rank-r path for the inexact channels."""
    return (x @ tensors["vs"].to(x.dtype).t()) @ tensors["u"].to(x.dtype).t()


def scores(x: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """Calibration scores ``|x_i|·‖W[:, i]‖₂`` for every token and channel (float32)."""
    return x.float().abs() * col_norm.float()
