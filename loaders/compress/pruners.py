"""Pruning math shared by ``compress`` and ``prune``: Wanda and SparseGPT, to N:M or to row-sparse.

Both methods read only the calibration Gram ``G = XᵀX`` the compressor already collects and
caches (``calibration.py``), never the activations themselves:

- **Wanda** scores ``|W_ij|·‖X_j‖`` (``‖X_j‖ = √G_jj``) and keeps the best weights; no kept
  weight is changed. With equal input norms it is magnitude pruning.
- **SparseGPT** (optimal brain surgeon, column by column): ``H = G + λI`` with λ = 1 % of the
  mean diagonal; the upper Cholesky factor ``U`` of ``H⁻¹``; for each column i in order, the
  pruned part of column i is ``err = (w − q)/U_ii`` and ``err ⊗ U[i, i:]`` is subtracted from
  the columns not processed yet, so the kept weights absorb what the pruned ones did on the
  calibration inputs. Updates inside a block of 128 columns are applied at once, to the rest of
  the matrix lazily once per block (one GEMM). Which weights are kept is chosen on the weights
  *as already updated*, by ``w²/U_cc²``, once per mask window: each N:M group when it starts, or
  each 128-column block when it starts (the paper's adaptive mask selection).

Two patterns:

- **N:M** (``nm`` scheme): N of every M consecutive inputs of a row kept (N counts the weights
  **kept**, as the ``nm`` scheme does; the papers' code passes the count zeroed). ``prune.py``.
- **Row-sparse** (``lowrank_sparse`` with rank 0, i.e. W ≈ S): exactly ``nnz`` weights kept per
  output row anywhere along it (unstructured within the row; a fixed count per row is what the
  bitmask / ELL encodings store). SparseGPT spreads a row's ``nnz`` over its 128-column blocks in
  proportion to their widths and picks within each block; Wanda picks over the whole row.
  ``RowPruner`` is the ``compress`` layer interface (``at_ratio``), so ``--ratio``, ``--budget``,
  ``--sequential``, the knapsack and healing all apply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimserve.errors import CompressionError
from slimserve.loaders.compress.budget import PARAMS, Budget, lowrank_sparse_nnz
from slimserve.loaders.compress.whitening import Factorization, Whitening, dense_option, relative_errors
from slimserve.loaders.schemes.lowrank_sparse import encode_sparse, sparse_encoding
from slimserve.loaders.schemes.nm import nm_mask

PRUNE_METHODS = ("sparsegpt", "wanda")
#: SparseGPT's dampening: λ = this fraction of the Hessian's mean diagonal (the paper's 1 %).
DAMPENING = 0.01
#: SparseGPT's lazy-update block (columns); also the row-sparse mask window.
BLOCK_COLUMNS = 128

#: ``choose(saliency [out, width], start) -> keep mask [out, width]`` for the mask window starting at column ``start``.
MaskChooser = Callable[[torch.Tensor, int], torch.Tensor]


def input_norms(gram: torch.Tensor) -> torch.Tensor:
    """‖X_j‖ per input feature: the square root of the Gram's diagonal (Wanda's statistic)."""
    return gram.diagonal().double().clamp_min(0).sqrt()


def wanda_prune(weight: torch.Tensor, gram: torch.Tensor, kept: int, group: int) -> torch.Tensor:
    """Wanda N:M: zero all but the ``kept`` largest ``|W_ij|·‖X_j‖`` of every group; the rest unchanged."""
    score = weight.double().abs() * input_norms(gram)
    return weight * nm_mask(score, kept, group)


def wanda_rows(weight: torch.Tensor, gram: torch.Tensor, nnz: int) -> torch.Tensor:
    """Wanda row-sparse: keep the ``nnz`` largest ``|W_ij|·‖X_j‖`` of every row; the rest zeroed."""
    score = weight.double().abs() * input_norms(gram)
    return weight * top_per_row(score, nnz)


def top_per_row(score: torch.Tensor, kept: int | torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the ``kept`` (one count, or one per row) largest scores of every row.

    Ties go to the lower column, so the mask is deterministic.
    """
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=1)  # each entry's place in its row's order
    return ranks < (kept[:, None] if isinstance(kept, torch.Tensor) else kept)


def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, kept: int, group: int, *,
                    dampening: float = DAMPENING) -> torch.Tensor:
    """SparseGPT N:M: the mask of each group chosen when the sweep reaches it."""
    return sparsegpt(weight, gram, lambda saliency, _: nm_mask(saliency, kept, group), group, dampening=dampening)


def sparsegpt_rows(weight: torch.Tensor, gram: torch.Tensor, nnz: int) -> torch.Tensor:
    """SparseGPT row-sparse: ``nnz`` kept per row, each block's share of them fixed before the sweep.

    A row's share per 128-column block is how many of its ``nnz`` best weights by the initial
    saliency ``w²/U_cc²`` fall in that block, so a row may keep most of its weights where its
    important inputs are (a fixed share per block, as the paper's per-block sparsity, loses that);
    within the block the kept weights are then chosen adaptively on the updated weights.
    """
    upper = hessian_inverse_factor(gram)
    initial = weight.double().square() / upper.diagonal().square()
    in_block = top_per_row(initial, nnz)

    def choose(saliency: torch.Tensor, start: int) -> torch.Tensor:
        return top_per_row(saliency, in_block[:, start:start + saliency.shape[1]].sum(dim=1))

    return sparsegpt(weight, gram, choose, BLOCK_COLUMNS, upper=upper)


def hessian_inverse_factor(gram: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """The upper Cholesky factor of ``(G + λI)⁻¹``, λ = ``dampening`` × mean diagonal; dead inputs get ``G_jj = 1``."""
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * float(h.diagonal().mean()))
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise CompressionError("the dampened calibration Hessian XᵀX + λI is not positive definite",
                               expected="finite activations on the --calib text") from None


def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, choose: MaskChooser, window: int, *,
              dampening: float = DAMPENING, block_columns: int = BLOCK_COLUMNS,
              upper: torch.Tensor | None = None) -> torch.Tensor:
    """SparseGPT's sweep (see the module docstring) in float64; returns the pruned, updated weight in its dtype.

    ``choose`` picks the kept weights of each ``window`` columns (which divides the lazy block,
    rounded up to a multiple of it) from their saliency when the sweep reaches them. Inputs never
    seen in calibration (``G_jj = 0``) carry no information: their weights are zeroed and their
    Hessian diagonal set to 1 so the factorization exists (as the paper's code does). ``upper``:
    the factor ``hessian_inverse_factor`` returns, when the caller already has it.
    """
    w = weight.double().clone()
    w[:, gram.diagonal() == 0] = 0.0
    if upper is None:
        upper = hessian_inverse_factor(gram, dampening)
    columns = w.shape[1]
    block = -(-block_columns // window) * window
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        local = w[:, start:stop].clone()
        errors = torch.zeros_like(local)
        u_block = upper[start:stop, start:stop]
        diag = u_block.diagonal()
        keep = torch.zeros_like(local, dtype=torch.bool)
        for i in range(stop - start):
            if i % window == 0:
                span = slice(i, min(i + window, stop - start))
                keep[:, span] = choose(local[:, span].square() / diag[span].square(), start + i)
            column = local[:, i]
            err = (column - column * keep[:, i]) / diag[i]
            # Row i of U spreads the pruned mass over the columns after i (column i becomes its kept part).
            local[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, start:stop] = local * keep
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return w.to(weight.dtype)


class RowPruner:
    """One layer pruned row-sparse by ``method`` at any budget level (the compressor's ``at_ratio`` interface).

    Stored as ``lowrank_sparse`` with rank 0: no factors, S holding the kept weights in its
    smaller encoding (a bitmask at the densities a budget up to ~90 % leaves).
    """

    def __init__(self, method: str, weight: torch.Tensor, whitening: Whitening, gram: torch.Tensor,
                 budget: Budget = PARAMS) -> None:
        if method not in PRUNE_METHODS:
            raise CompressionError(f"unknown pruning method {method!r}", field="--method",
                                   expected=" or ".join(PRUNE_METHODS))
        self.prune = sparsegpt_rows if method == "sparsegpt" else wanda_rows
        self.weight = weight
        self.whitening = whitening
        self.gram = gram
        self.budget = budget

    def at_ratio(self, ratio: float) -> tuple[Factorization, float]:
        """The row-sparse weight removing ``ratio`` of the layer's cost, and its relative whitened error."""
        out_features, in_features = self.weight.shape
        nnz = lowrank_sparse_nnz(out_features, in_features, 0, self.budget.allowed(out_features, in_features, ratio),
                                 self.budget)
        if ratio == 0.0 or nnz is None or nnz >= in_features:
            return dense_option(self.weight), 0.0
        pruned = self.prune(self.weight.float(), self.gram, nnz).float()
        fact = Factorization("lowrank_sparse",
                             {"u": pruned.new_zeros(out_features, 0), "v": pruned.new_zeros(0, in_features),
                              **encode_sparse(pruned, nnz)},
                             {"rank": 0, "nnz": nnz, "encoding": sparse_encoding(out_features, in_features, nnz)},
                             out_features=out_features, in_features=in_features)
        return fact, relative_errors(self.weight, pruned, self.whitening)[1]
