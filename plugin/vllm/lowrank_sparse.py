"""vLLM runner of ``lowrank_sparse`` shards: ``y = (x Vᵀ) Uᵀ + x Sᵀ``.

S needs the layer input x itself, so the runner has no first factor (linear.py hands it x):
V and U run as prepacked GEMMs (vLLM's own dense path on CPU) and S as the sparse product of its
encoding (ELL or bitmask), which reads only S's stored values and positions. Where V and U are
kept as bf16 panels (AVX2 hosts serving float32) the three run as one operator
(``LowRankSparsePanels``), which saves two or more operator dispatches and the sum a layer. Where
a bf16 bitmask S runs on the bitmask kernel's dot loop (AMD Zen 4) each row of U is stored after
S's values, V as plain rows, and a few-token step is one kernel call (``LowRankSparseFolded``;
measured in ``plugin/kernels/lowrank_sparse.py``).

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
from slimserve.plugin.kernels.gemm import factor_linear
from slimserve.plugin.kernels.lowrank_sparse import LowRankSparseFolded, LowRankSparsePanels


def local_sparse(tensors: Mapping[str, torch.Tensor], in_full: int, in_start: int,
                 in_local: int) -> dict[str, torch.Tensor]:
    """S's tensors restricted to input columns ``[in_start, in_start + in_local)``, re-encoded."""
    columns = decode_sparse(tensors, in_full)[:, in_start:in_start + in_local]
    nnz = max(1, int((columns != 0).sum(dim=1).max()))
    encoded = encode_sparse(columns, nnz)
    return {k: v.to(tensors["s_values"].dtype) if v.is_floating_point() else v for k, v in encoded.items()}


class LowRankSparseShard:
    """One ``lowrank_sparse`` shard of a (possibly fused, possibly TP-split) vLLM linear, or a fused layer's shards
    stacked into one (``layer``)."""

    first_factor = None

    def __init__(self, tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any],
                 us: Sequence[torch.Tensor] | None = None) -> None:
        """``us``: for stacked shards, each shard's U in order (of rank 0 they give only the output widths), with
        ``tensors["v"]`` their V stacked row-wise and S theirs; None for one shard (its U is ``tensors["u"]``)."""
        in_local, in_full = tensors["v"].shape[1], int(spec["in_features"])
        sparse = {k: v for k, v in tensors.items() if k.startswith("s_")}
        if in_local != in_full:
            from vllm.distributed import get_tensor_model_parallel_rank

            sparse = local_sparse(sparse, in_full, get_tensor_model_parallel_rank() * in_local, in_local)
        us = [tensors["u"]] if us is None else list(us)
        self.out_features = sum(u.shape[0] for u in us)
        if "s_mask" in sparse:
            product = BitmaskMatmul(sparse["s_values"], sparse["s_mask"], in_local)
        else:
            product = EllMatmul(sparse["s_values"], sparse["s_indices"], in_local)
        if tensors["v"].shape[0] == 0:  # rank 0 (a pruned, row-sparse weight): S alone, no empty GEMMs
            self.second = self.sparse = product
            return
        self.ranks = [u.shape[1] for u in us]
        if LowRankSparseFolded.usable(product):  # U stored inside S's rows, V as plain rows: no oneDNN copies
            self.second = LowRankSparseFolded(tensors["v"], us, product)
            return
        self.sparse = product
        self.v = factor_linear(tensors["v"])
        self.us = [factor_linear(u) for u in us]
        self.second = LowRankSparsePanels(self.v, self.us, self.sparse) if LowRankSparsePanels.usable(
            self.v, self.us) else self.forward

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

        Shards of one nnz and encoding, each over the whole input (no row-parallel re-slicing),
        stack S row-wise into one sparse product and V row-wise into one GEMM; each shard's U
        multiplies its slice of ``x Vᵀ``. Shards that are S alone (rank 0, a pruned weight) run as
        that one sparse product. Per shard, a decode step made three calls and an add each; on a
        small model's decode step those calls are most of what the sparse layers cost beyond their
        reads. A mix of rank 0 and low-rank shards runs shard by shard, and so do shards of
        different nnz (OATS sizes S per shape, so q and k differ by a few entries a row):
        re-encoding them padded to the largest nnz at load cost the benchmark Llama 2.5 s of start
        (1.19x dense) and 60 MiB of RSS for no decode speed measured there.
        """
        same_rows = len({(int(spec["nnz"]), spec.get("encoding")) for spec in specs}) == 1
        whole_input = all(t["v"].shape[1] == int(spec["in_features"]) for t, spec in zip(shard_tensors, specs))
        rank_zero = {int(spec["rank"]) == 0 for spec in specs}
        if len(specs) < 2 or len(rank_zero) != 1 or not (same_rows and whole_input):
            return None
        stacked = {name: torch.cat([t[name] for t in shard_tensors]) for name in shard_tensors[0] if name != "u"}
        return cls(stacked, specs[0], us=[t["u"] for t in shard_tensors])
