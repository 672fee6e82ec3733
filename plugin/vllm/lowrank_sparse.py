"""vLLM runner of ``lowrank_sparse`` shards: ``y = (x Vᵀ) Uᵀ + x Sᵀ``.

S needs the layer input x itself, so the runner has no first factor (linear.py hands it x):
V and U run as prepacked GEMMs (vLLM's own dense path on CPU) and S as the sparse product of its
encoding (ELL or bitmask), which reads only S's stored values and positions.

Tensor parallelism: column-parallel layers (q/k/v, gate/up) split u, S's rows and their
positions along the output axis like a dense weight, in the generic loader. A row-parallel
layer (o, down) splits the *input* axis, which a row-sparse S cannot be narrowed along (each
row's entries fall anywhere in it, so its columns of one rank are a ragged subset of the
row's). The scheme therefore declares S whole on every rank (``full_in_features``), and this
runner decodes it once at load, keeps this rank's column range and re-encodes it with as many
entries per row as the fullest row of the slice has (the others padded with zeros): memory per
rank is about S's, not S's / TP, in exchange for no format change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from slimserve.loaders.schemes.lowrank_sparse import decode_sparse, encode_sparse
from slimserve.plugin.kernels.bitmask import BitmaskMatmul
from slimserve.plugin.kernels.ell import EllMatmul
from slimserve.plugin.kernels.gemm import prepacked_linear


def local_sparse(tensors: Mapping[str, torch.Tensor], in_full: int, in_start: int,
                 in_local: int) -> dict[str, torch.Tensor]:
    """S's tensors restricted to input columns ``[in_start, in_start + in_local)``, re-encoded."""
    columns = decode_sparse(tensors, in_full)[:, in_start:in_start + in_local]
    return reencoded(columns, max(1, int((columns != 0).sum(dim=1).max())), tensors["s_values"].dtype)


def reencoded(dense: torch.Tensor, nnz: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """S's tensors for a decoded (float32) S at ``nnz`` entries a row, its values back in the stored ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in encode_sparse(dense, nnz).items()}


class LowRankSparseShard:
    """One ``lowrank_sparse`` shard of a (possibly fused, possibly TP-split) vLLM linear, or a fused layer's shards
    stacked into one (``layer``)."""

    first_factor = None

    def __init__(self, tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any],
                 us: Sequence[torch.Tensor] | None = None) -> None:
        """``us``: for stacked shards, each shard's U in order, with ``tensors["v"]`` their V stacked row-wise and
        S theirs; None for one shard (its U is ``tensors["u"]``)."""
        in_local, in_full = tensors["v"].shape[1], int(spec["in_features"])
        sparse = {k: v for k, v in tensors.items() if k.startswith("s_")}
        if in_local != in_full:
            from vllm.distributed import get_tensor_model_parallel_rank

            sparse = local_sparse(sparse, in_full, get_tensor_model_parallel_rank() * in_local, in_local)
        us = [tensors["u"]] if us is None else list(us)
        self.out_features = sum(u.shape[0] for u in us)
        if "s_mask" in sparse:
            self.sparse = BitmaskMatmul(sparse["s_values"], sparse["s_mask"], in_local)
        else:
            self.sparse = EllMatmul(sparse["s_values"], sparse["s_indices"], in_local)
        if tensors["v"].shape[0] == 0:  # rank 0 (a pruned, row-sparse weight): S alone, no empty GEMMs
            self.second = self.sparse
            return
        self.v = prepacked_linear(tensors["v"])
        self.ranks = [u.shape[1] for u in us]
        self.us = [prepacked_linear(u) for u in us]
        self.second = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.v(x)
        if len(self.us) == 1:
            low_rank = self.us[0](z)
        else:
            low_rank = torch.cat([u(part.contiguous()) for u, part in zip(self.us, z.split(self.ranks, dim=1))], dim=1)
        return low_rank + self.sparse(x)

    @classmethod
    def layer(cls, shard_tensors: Sequence[Mapping[str, torch.Tensor]],
              specs: Sequence[Mapping[str, Any]]) -> LowRankSparseShard | None:
        """A fused layer's shards (q/k/v, gate/up) as one, or None to run them shard by shard.

        Shards over the whole input (no row-parallel re-slicing) stack S row-wise into one sparse
        product and V row-wise into one GEMM; each shard's U multiplies its slice of ``x Vᵀ``.
        Shards that are S alone (rank 0, a pruned weight) run as that one sparse product. Per
        shard, a decode step made three calls and an add each; on a small model's decode step
        those calls are most of what the sparse layers cost beyond their reads. A mix of rank 0
        and low-rank shards runs shard by shard, as do shards whose nnz differ so much that
        padding every row to the largest would add more than ``MAX_STACK_PADDING`` to S.
        """
        whole_input = all(t["v"].shape[1] == int(spec["in_features"]) for t, spec in zip(shard_tensors, specs))
        rank_zero = {int(spec["rank"]) == 0 for spec in specs}
        if len(specs) < 2 or len(rank_zero) != 1 or not whole_input:
            return None
        sparse = stacked_sparse(shard_tensors, int(specs[0]["in_features"]))
        if sparse is None:
            return None
        stacked = {**sparse, "v": torch.cat([t["v"] for t in shard_tensors])}
        if rank_zero == {True}:
            return cls({**stacked, "u": torch.cat([t["u"] for t in shard_tensors])}, specs[0])
        return cls(stacked, specs[0], us=[t["u"] for t in shard_tensors])


#: The most a fused layer's stacked S may grow, as a fraction of its stored entries, by padding every shard's rows to
#: the largest nnz.
MAX_STACK_PADDING = 0.05


def stacked_sparse(shard_tensors: Sequence[Mapping[str, torch.Tensor]],
                   in_features: int) -> dict[str, torch.Tensor] | None:
    """The shards' S stacked row-wise as one S, or None where padding would cost over ``MAX_STACK_PADDING``.

    Shards of one nnz and encoding concatenate as stored. Otherwise (OATS sizes each shape's S
    on its own, so q and k differ by a few entries a row) the shards are decoded and re-encoded
    at the largest nnz, the shorter rows padded with explicit zeros as the encoder pads any row.
    """
    nnzs = [t["s_values"].shape[1] for t in shard_tensors]
    names = [{name for name in t if name.startswith("s_")} for t in shard_tensors]
    if len(set(nnzs)) == 1 and all(n == names[0] for n in names):
        return {name: torch.cat([t[name] for t in shard_tensors]) for name in names[0]}
    rows = [t["s_values"].shape[0] for t in shard_tensors]
    stored = sum(r * n for r, n in zip(rows, nnzs))
    if sum(rows) * max(nnzs) > (1 + MAX_STACK_PADDING) * stored:
        return None
    # Shard by shard, so only one shard's decoded S (46 MiB for a 5632 x 2048 float32 one) exists at a time: decoding
    # the stacked S at once raised the serving process's peak and steady RSS by 40-50 MiB on the benchmark Llama.
    encoded = [reencoded(decode_sparse({k: v for k, v in t.items() if k.startswith("s_")}, in_features), max(nnzs),
                         t["s_values"].dtype) for t in shard_tensors]
    if any(e.keys() != encoded[0].keys() for e in encoded):
        return None
    return {name: torch.cat([e[name] for e in encoded]) for name in encoded[0]}
