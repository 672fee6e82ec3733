"""CoSpaDi: whitened sparse dictionary learning (arXiv 2509.22075; docs/methods/compression.md).

Minimize ``‖W·S − C·D‖_F`` over a dictionary D ``[k, in]`` (unit-norm atoms, whitened space)
and coefficients C ``[out, k]`` with exactly s nonzeros per output row, by alternating
1. sparse coding: orthogonal matching pursuit, each output row coded independently;
2. K-SVD: every atom in turn becomes the best rank-1 fit (power iteration) of the residual
   of the rows that use it, with those rows' coefficients updated alongside;
then store ``dictionary = D·S⁻¹`` and C as ``dictsparse``. k/s = ρ = 2 by default.

CPU budget (documented deviations from the paper's 60 iterations, 8 power steps, one atom
per OMP step): ``iterations`` = 1 round of coding + K-SVD, then a final coding; one power
step per atom (warm-started from the current atom); and OMP picks ``ceil(s/omp_steps)``
atoms per step (generalized OMP, 2 steps) with an exact least-squares refit on the support
after each step, so a 1536-output layer with s = 230 costs 2 batched solves instead of 230.
Even so CoSpaDi is by far the slowest method (tens of seconds per large layer on 2 cores).
"""

from __future__ import annotations

import math

import torch

from slimserve.loaders.compress.budget import PARAMS, Budget, dictsparse_sizes
from slimserve.loaders.compress.whitening import (
    Factorization,
    Whitening,
    check_whitened,
    dense_option,
    dictsparse_option,
)

ITERATIONS = 1
OMP_STEPS = 2
ATOMS_PER_NNZ = 2.0
_ROW_CHUNK = 256


def sparse_code(signals: torch.Tensor, atoms: torch.Tensor, nnz: int, steps: int = OMP_STEPS) -> torch.Tensor:
    """Code each row of ``signals [n, d]`` with ``nnz`` rows of ``atoms [k, d]``; returns dense ``[n, k]``.

    Works on the k×k atom Gram (Batch-OMP style): correlations of the residual are
    ``Aᵀy − G·x`` and each support's least-squares refit is a small Cholesky solve. A support
    whose atoms are linearly dependent (duplicate or zero atoms, a rank-deficient weight: OMP
    then picks atoms the residual no longer correlates with) has a singular sub-Gram; those rows
    get the minimum-norm least-squares solution instead, which puts no weight on a redundant atom.
    """
    n, k = signals.shape[0], atoms.shape[0]
    gram = atoms @ atoms.t()
    ridge = 1e-10 * float(gram.diagonal().mean())
    target = signals @ atoms.t()  # [n, k]
    coef = torch.zeros(n, k, dtype=signals.dtype)
    support = torch.zeros(n, 0, dtype=torch.long)
    per_step = math.ceil(nnz / steps)
    while support.shape[1] < nnz:
        corr = (target - coef @ gram).abs().scatter_(1, support, -1.0)
        picked = corr.topk(min(per_step, nnz - support.shape[1]), dim=1).indices
        support = torch.cat([support, picked], dim=1)
        coef = torch.zeros(n, k, dtype=signals.dtype)
        for start in range(0, n, _ROW_CHUNK):
            idx = support[start:start + _ROW_CHUNK]
            sub = gram[idx[:, :, None], idx[:, None, :]]
            sub.diagonal(dim1=1, dim2=2).add_(ridge)
            rhs = target[start:start + _ROW_CHUNK].gather(1, idx).unsqueeze(-1)
            values = _solve_support(sub, rhs)
            coef[start:start + _ROW_CHUNK].scatter_(1, idx, values)
    return coef


def _solve_support(sub: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve the batched ``sub · x = rhs`` (``sub`` symmetric PSD); Cholesky, min-norm where it is singular."""
    factor, info = torch.linalg.cholesky_ex(sub)
    values = torch.cholesky_solve(rhs, factor).squeeze(-1)
    singular = (info != 0) | ~torch.isfinite(values).all(dim=1)
    if singular.any():
        values[singular] = (torch.linalg.pinv(sub[singular], hermitian=True) @ rhs[singular]).squeeze(-1)
    return values


def ksvd_update(signals: torch.Tensor, atoms: torch.Tensor, coef: torch.Tensor) -> None:
    """One K-SVD sweep in place: each used atom and its coefficients become a rank-1 residual fit."""
    residual = signals - coef @ atoms
    for j in range(atoms.shape[0]):
        rows = coef[:, j].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        c = coef[rows, j]
        error = residual[rows] + c[:, None] * atoms[j]
        direction = error.t() @ c
        norm = direction.norm()
        if norm == 0:
            continue
        atom = direction / norm
        c_new = error @ atom
        residual[rows] = error - c_new[:, None] * atom
        atoms[j] = atom
        coef[rows, j] = c_new


class CoSpaDi:
    """One layer's CoSpaDi factorization at a given level (seeded dictionary initialization)."""

    def __init__(self, weight: torch.Tensor, whitening: Whitening, *, seed: int = 0,
                 iterations: int = ITERATIONS, atoms_per_nnz: float = ATOMS_PER_NNZ,
                 budget: Budget = PARAMS) -> None:
        self.weight = weight
        self.budget = budget
        self.whitening = whitening
        self.seed = seed
        self.iterations = iterations
        self.atoms_per_nnz = atoms_per_nnz
        whitened = whitening.whiten(weight)
        # Factorize W·S / ‖W·S‖ (unit norm, float32-safe for weights of any scale); the scale goes back
        # into the coefficients when the factorization is stored.
        self.scale = check_whitened(whitened, whitening.module)
        self.whitened = (whitened / self.scale).float()
        self.whitened_norm = float(self.whitened.norm())

    def at_ratio(self, ratio: float) -> tuple[Factorization, float]:
        out_features, in_features = self.weight.shape
        atoms, nnz = dictsparse_sizes(out_features, in_features, ratio, self.atoms_per_nnz, self.budget)
        spec = {"in_features": in_features, "out_features": out_features, "atoms": atoms, "nnz": nnz}
        if ratio == 0.0 or self.budget.cost("dictsparse", spec) >= self.budget.dense_cost(out_features, in_features):
            return dense_option(self.weight), 0.0
        generator = torch.Generator().manual_seed(self.seed)
        # Initialization from random (whitened) weight rows, as the paper does from columns of W_L.
        start = torch.randperm(out_features, generator=generator)[:atoms]
        dictionary = self.whitened[start].clone()
        dictionary /= dictionary.norm(dim=1, keepdim=True).clamp_min(1e-30)
        for _ in range(self.iterations):
            coef = sparse_code(self.whitened, dictionary, nnz)
            ksvd_update(self.whitened, dictionary, coef)
        coef = sparse_code(self.whitened, dictionary, nnz)
        error = float((self.whitened - coef @ dictionary).norm()) / max(self.whitened_norm, 1e-30)
        return dictsparse_option(coef.double() * self.scale, dictionary, nnz, self.whitening), error
