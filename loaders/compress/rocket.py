"""ROCKET's single-step sparse-dictionary factorization (arXiv 2602.11008, §1.1 of compression.md).

In slimserve's ``[out, in]`` layout, with ``W·S = UΣVᵀ`` the SVD of the whitened weight:
1. basis: the top-k right singular vectors (rows of Vᵀ) are the eigenbasis of the whitened
   weight's input covariance; coefficients ``C = U_kΣ_k`` ``[out, k]``;
2. importance ``|c_oi| · ‖S⁻ᵀ b_i‖^0.5`` (whitened magnitude times the atom's norm back in the
   original space), top-s per output row;
3. closed-form ridge refit of the dictionary on the sparse coefficients,
   ``D = (CᵀC + µI)⁻¹ Cᵀ (W·S)`` with ``µ = max(1e-6, 1e-3·tr(CᵀC)/k)``, mapped back by ``S⁻¹``.
With s = k (ks = 1) no coefficient is dropped and this is SVD-LLM, stored as ``lowrank``.

Deliberate simplifications, for determinism and CPU time: the paper code's 0.5 % over-
sparsify-and-refill and its 100 Adam refinement steps are not run (pure least squares, as
compression.md §1.8 recommends for tests), and ks is searched on a coarse grid.
"""

from __future__ import annotations

import torch

from slimserve.loaders.compress.budget import dictsparse_sizes
from slimserve.loaders.compress.whitening import Factorization, SvdLlm, Whitening, dictsparse_option

# Atoms per nonzero (ks = k/s) tried at each level; ks = 1 is SVD-LLM. The paper searches
# 1.0-3.0 in steps of 0.1; two values keep the profile of a 210-linear model to minutes on 2 cores.
KS_GRID = (1.0, 2.0)
IMPORTANCE_EXPONENT = 0.5


class Rocket:
    """One layer's ROCKET factorizations; the whitened SVD is shared by every level and ks."""

    def __init__(self, weight: torch.Tensor, whitening: Whitening, ks_grid: tuple[float, ...] = KS_GRID) -> None:
        self.weight = weight
        self.whitening = whitening
        self.ks_grid = ks_grid
        self.svd = SvdLlm(weight, whitening)
        # The SVD needs float64 (S can be ill-conditioned); the sparse refit is well posed in float32.
        self.whitened = whitening.whiten(weight).float()
        self.whitened_norm = float(self.whitened.norm())
        # ‖S⁻ᵀ bᵢ‖^λ per basis vector, for the importance score.
        self.atom_scale = self.svd.basis.norm(dim=1).pow(IMPORTANCE_EXPONENT)

    def at_ratio(self, ratio: float) -> tuple[Factorization, float]:
        """The lowest-error factorization over the ks grid at this level, and its whitened relative error."""
        best = self.svd.at_ratio(ratio)
        if best[0].scheme == "dense":
            return best
        out_features, in_features = self.weight.shape
        for ks in self.ks_grid:
            if ks == 1.0:
                continue
            atoms, nnz = dictsparse_sizes(out_features, in_features, ratio, ks)
            if atoms > min(out_features, in_features) or nnz >= atoms:
                continue  # the eigenbasis has only min(out, in) vectors
            candidate = self.sparse_dictionary(atoms, nnz)
            if candidate[1] < best[1]:
                best = candidate
        return best

    def sparse_dictionary(self, atoms: int, nnz: int) -> tuple[Factorization, float]:
        """Steps 1-3 above for k = ``atoms``, s = ``nnz``."""
        coef = self.svd.u[:, :atoms] * self.svd.sigma[:atoms]
        importance = coef.abs() * self.atom_scale[:atoms]
        keep = importance.topk(nnz, dim=1).indices
        sparse = torch.zeros_like(coef).scatter_(1, keep, coef.gather(1, keep))
        gram = sparse.t() @ sparse
        mu = max(1e-6, 1e-3 * float(gram.trace()) / atoms)
        gram.diagonal().add_(mu)
        dictionary = torch.linalg.solve(gram, sparse.t() @ self.whitened)  # [k, in], whitened space
        error = float((self.whitened - sparse @ dictionary).norm()) / max(self.whitened_norm, 1e-30)
        return dictsparse_option(sparse, dictionary, nnz, self.whitening), error
