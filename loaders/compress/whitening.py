"""Truncation-aware whitening (SVD-LLM) and what every calibrated method shares.

With the calibration Gram ``G = XᵀX = S·Sᵀ`` (S lower-triangular Cholesky factor) the output
error of a replacement Ŵ is ``‖X(W − Ŵ)ᵀ‖_F = ‖(W − Ŵ)·S‖_F``: compressing the *whitened*
weight ``W·S`` in the plain Frobenius norm and mapping back with ``S⁻¹`` minimizes the error on
the calibration activations. For SVD-LLM the truncated SVD of ``W·S`` is that minimizer, and
each dropped singular value is exactly the output error it causes (hence "truncation-aware").
Everything here runs in float64: ``S`` can be badly conditioned and ``S⁻¹`` amplifies rounding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from slimserve.errors import CompressionError
from slimserve.loaders.compress.budget import PARAMS, Budget, lowrank_rank
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.dictsparse import dense_to_coef

# Relative ridge always added to the Gram's diagonal before Cholesky (a no-op for a healthy Gram).
BASE_RIDGE = 1e-8
# Relative ridge added above the shift that makes a singular Gram positive definite.
SINGULAR_RIDGE = 1e-6


@dataclass
class Factorization:
    """One way to store a layer: a slimserve scheme, its tensors (float32) and fields."""

    scheme: str
    tensors: dict[str, torch.Tensor]
    fields: dict[str, int] = field(default_factory=dict)
    out_features: int = 0
    in_features: int = 0

    @property
    def spec(self) -> dict[str, int | str]:
        return {"scheme": self.scheme, "in_features": self.in_features, "out_features": self.out_features,
                **self.fields}

    @property
    def stored_params(self) -> int:
        """Float values stored (indices not counted), the papers' and the knapsack's cost."""
        return SCHEMES[self.scheme].stored_params(self.spec)

    def stored_bytes(self, float_bytes: int) -> int:
        """Bytes the checkpoint stores for this layer with ``float_bytes`` per value, indices included."""
        scheme = SCHEMES[self.scheme]
        return scheme.stored_bytes(scheme.storage_spec(self.spec), float_bytes)  # the layout the writer stores

    def cost(self, budget: Budget) -> int:
        """What this layer costs in ``budget``'s unit (the knapsack's option cost)."""
        return budget.cost(self.scheme, self.spec)

    def reconstruct(self) -> torch.Tensor:
        return SCHEMES[self.scheme].reconstruct(self.spec, self.tensors).double()


def dense_option(weight: torch.Tensor) -> Factorization:
    """Keep the original weight: zero error, full cost (the knapsack's "no compression" choice)."""
    out_features, in_features = weight.shape
    return Factorization("dense", {"weight": weight.float()}, out_features=out_features, in_features=in_features)


def dictsparse_option(coef: torch.Tensor, whitened_dictionary: torch.Tensor, nnz: int,
                      whitening: Whitening) -> Factorization:
    """Store ``W ≈ coef · dictionary · S⁻¹`` (coef ``[out, k]`` with ``nnz`` nonzeros per row) as dictsparse."""
    atoms, in_features = whitened_dictionary.shape
    dictionary = whitening.unwhiten(whitened_dictionary)
    coef = coef.double()
    # Balance each atom against its coefficients (same product): neither factor under- or overflows
    # float32 when the whitening's scale is far from the weight's (very small or large activations).
    balance = _balance(coef.norm(dim=0), dictionary.norm(dim=1))
    values, indices = dense_to_coef(coef / balance, nnz)
    return Factorization(
        "dictsparse",
        {"dictionary": (dictionary * balance[:, None]).float(), "coef_values": values.float(),
         "coef_indices": indices},
        {"atoms": atoms, "nnz": nnz}, out_features=coef.shape[0], in_features=in_features)


def _balance(left_norms: torch.Tensor, right_norms: torch.Tensor) -> torch.Tensor:
    """Per component, the factor f with ‖left/f‖ = ‖right·f‖ (1 where either side is zero)."""
    usable = (left_norms > 0) & (right_norms > 0)
    return torch.where(usable, (left_norms / right_norms.where(usable, 1.0)).sqrt(), 1.0)


def check_whitened(whitened: torch.Tensor, module: str) -> float:
    """``‖W·S‖`` of one layer (1.0 for an all-zero weight), refusing NaN/Inf by the layer's name."""
    if not torch.isfinite(whitened).all():
        raise CompressionError(
            "the weight (or the weight times its calibration whitening) has NaN or Inf values; check the dense "
            "checkpoint with a finite-values scan, or compress without calibration (--method svd)", layer=module)
    norm = float(whitened.norm())
    return norm if norm > 0 else 1.0


class Whitening:
    """The Cholesky factor S of one linear's input Gram (``G ≈ S·Sᵀ``), in float64.

    Without a Gram (plain SVD) S is the identity, so "activation-space" errors reduce to
    weight-space errors and every method runs uncalibrated.
    """

    def __init__(self, gram: torch.Tensor | None, in_features: int, module: str = "") -> None:
        self.ridge = 0.0
        self.module = module
        if gram is None:
            self.factor = None
            return
        if gram.shape != (in_features, in_features):
            raise CompressionError(f"{module}: calibration Gram has shape {list(gram.shape)}, "
                                   f"expected [{in_features}, {in_features}] (stale --calib-cache?)")
        g = gram.double()
        if not torch.isfinite(g).all():
            raise CompressionError("the calibration Gram XᵀX has NaN or Inf values: the dense model's activations "
                                   "are not finite on the --calib text (NaN/Inf weights, or float32 overflow); "
                                   "check the dense checkpoint's weights", layer=module)
        scale = float(g.diagonal().mean())
        if not scale > 0:
            raise CompressionError(f"{module}: the calibration inputs of this layer are all zero; "
                                   "the Gram XᵀX carries no information (check the --calib text)")
        eye = torch.eye(in_features, dtype=torch.float64)
        factor, info = torch.linalg.cholesky_ex(g + BASE_RIDGE * scale * eye)
        if info != 0:
            smallest = float(torch.linalg.eigvalsh(g)[0])
            self.ridge = max(0.0, -smallest) + SINGULAR_RIDGE * scale
            warnings.warn(
                f"{module}: calibration Gram XᵀX is singular (smallest eigenvalue {smallest:.3g}, mean diagonal "
                f"{scale:.3g}); adding a ridge of {self.ridge:.3g} to whiten. More, or more varied, calibration "
                "text gives a better-posed Gram.", stacklevel=2)
            factor = torch.linalg.cholesky(g + self.ridge * eye)
        self.factor = factor

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``W·S`` in float64."""
        w = weight.double()
        return w if self.factor is None else w @ self.factor

    def unwhiten(self, matrix: torch.Tensor) -> torch.Tensor:
        """``M·S⁻¹`` (a triangular solve, never an explicit inverse)."""
        m = matrix.double()
        if self.factor is None:
            return m
        return torch.linalg.solve_triangular(self.factor, m, upper=False, left=False)


def relative_errors(weight: torch.Tensor, approx: torch.Tensor, whitening: Whitening) -> tuple[float, float]:
    """(weight-space ``‖W − Ŵ‖/‖W‖``, activation-space ``‖(W − Ŵ)S‖/‖WS‖``)."""
    w = weight.double()
    diff = w - approx.double()
    weight_err = float(diff.norm() / w.norm().clamp_min(1e-30))
    act_err = float(whitening.whiten(diff).norm() / whitening.whiten(w).norm().clamp_min(1e-30))
    return weight_err, act_err


class SvdLlm:
    """SVD-LLM (whitening only): truncated SVD of ``W·S``, factors ``u = U_r√Σ_r``, ``v = √Σ_r V_rᵀ S⁻¹``.

    The SVD is computed once per layer and ``Vᵀ·S⁻¹`` is mapped back once; every compression
    level is then a slice of both, and its whitened error is read off the singular values.
    The whitening and the map back run in float64 (S can be ill-conditioned); the SVD itself
    runs in float32 (3-30x faster on CPU): its rounding is ~1e-7 relative *in whitened space*,
    which is the space every error here is measured in, far below any truncation error.
    """

    def __init__(self, weight: torch.Tensor, whitening: Whitening, budget: Budget = PARAMS) -> None:
        self.weight = weight
        self.whitening = whitening
        self.budget = budget
        whitened = whitening.whiten(weight)
        # The SVD runs on W·S / ‖W·S‖ (float32-safe at any weight scale); sigma is of that unit-norm matrix.
        self.scale = check_whitened(whitened, whitening.module)
        self.u, self.sigma, self.vh = torch.linalg.svd((whitened / self.scale).float(), full_matrices=False)
        # Row i is vᵢᵀS⁻¹, i.e. (S⁻ᵀvᵢ)ᵀ: the basis vector back in the original input space.
        self.basis64 = whitening.unwhiten(self.vh)
        self.basis = self.basis64.float()
        energy = self.sigma.double().square()
        # tail[r] = Σ_{i >= r} σᵢ²: the whitened squared error of keeping rank r.
        self.tail = energy.flip(0).cumsum(0).flip(0).tolist() + [0.0]
        self.total = float(energy.sum())

    def at_ratio(self, ratio: float) -> tuple[Factorization, float]:
        """The factorization removing ``ratio`` of the layer's bytes or parameters and its whitened relative error."""
        out_features, in_features = self.weight.shape
        rank = lowrank_rank(out_features, in_features, ratio, self.budget)
        if ratio == 0.0 or rank * (out_features + in_features) >= out_features * in_features:
            return dense_option(self.weight), 0.0
        return self.at_rank(rank)

    def at_rank(self, rank: int) -> tuple[Factorization, float]:
        """Rank-``rank`` factors (capped at min(out, in)) and their whitened relative error."""
        out_features, in_features = self.weight.shape
        rank = min(rank, out_features, in_features)
        u = self.u[:, :rank].double() * (self.sigma[:rank].double() * self.scale)
        v = self.basis64[:rank]
        balance = _balance(u.norm(dim=0), v.norm(dim=1))
        fact = Factorization("lowrank", {"u": (u / balance).float(), "v": (v * balance[:, None]).float()},
                             {"rank": rank}, out_features=out_features, in_features=in_features)
        return fact, (self.tail[rank] / max(self.total, 1e-300)) ** 0.5
