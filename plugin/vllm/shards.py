"""Per-scheme runtime of one shard: its dense first factor and its second op (see linear.py).

Adding a scheme to the vLLM plugin means one runner here (or in its own module) and one
line in ``SHARD_RUNNERS`` (and in ``LAYER_RUNNERS`` if the shards of a fused layer run better
as one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from slimserve.loaders.schemes.dictsparse import encoding_of
from slimserve.loaders.schemes.sparse_rows import BITMASK
from slimserve.plugin.kernels.bitmask import BitmaskMatmul, DictionaryBitmaskPanels, DictionaryBitmaskRows
from slimserve.plugin.kernels.ell import EllMatmul
from slimserve.plugin.kernels.gemm import LowRankPanels, LowRankRows, factor_linear
from slimserve.plugin.kernels.nm import NMMatmul
from slimserve.plugin.vllm.lowrank_sparse import LowRankSparseShard
from slimserve.plugin.vllm.rsparse import RSparseLayer


class ShardRunner(Protocol):
    #: [r, in_local], joins the stacked first GEMM; None for a runner that needs the layer input
    #: itself (rsparse: its mask tests x), whose ``second`` then receives x [N, in_local]
    first_factor: torch.Tensor | None
    second: Callable[[torch.Tensor], torch.Tensor] | None  # [N, r] -> [N, out_local]; None = identity
    out_features: int


class DenseShard:
    """A dense shard: its weight is the first factor, the second op is the identity."""

    #: A whole dense weight stays on vLLM's own prepacked GEMM (linear.py): the plain rows compressed factors take
    #: where they decode faster run many-token steps 10-20 % slower, which a weight that saves no work would show.
    first_factor_is_dense_weight = True

    def __init__(self, tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> None:
        self.first_factor = tensors["weight"]
        self.second = None
        self.out_features = tensors["weight"].shape[0]


class LowRankShard:
    """``y = (x Vᵀ) Uᵀ``: V joins the stacked first GEMM, U is a GEMM of its own (``factor_linear``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> None:
        self.first_factor = tensors["v"]
        self.second = factor_linear(tensors["u"])
        self.out_features = tensors["u"].shape[0]

    @staticmethod
    def layer(shard_tensors: Sequence[Mapping[str, torch.Tensor]],
              specs: Sequence[Mapping[str, Any]]) -> OneCallLayer | None:
        """A low-rank layer's shards (one, or a fused layer's) as one operator where every factor is kept as plain
        bf16 rows (``LowRankRows``) or, on hosts serving float32, as bf16 panels (``LowRankPanels``); else None, to
        run the stacked V and each U as their own GEMMs."""
        vs, us = [t["v"] for t in shard_tensors], [t["u"] for t in shard_tensors]
        if LowRankRows.usable(vs[0], us):
            return OneCallLayer(LowRankRows(stacked_copy(vs), [u.clone() for u in us]))
        if LowRankPanels.usable(vs, us):
            return OneCallLayer(LowRankPanels(torch.cat(vs), us))
        return None


class DictSparseShard:
    """``y = (x Dᵀ) Cᵀ``: the dictionary joins the stacked GEMM, C runs as a sparse product in its encoding."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> None:
        self.first_factor = tensors["dictionary"]
        self.second = self.coefficients(tensors, spec)
        self.out_features = tensors["coef_values"].shape[0]

    @staticmethod
    def coefficients(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> BitmaskMatmul | EllMatmul:
        """C as the sparse product of its encoding (a copy of its tensors where the kernel keeps them apart)."""
        if encoding_of(spec) == BITMASK:
            return BitmaskMatmul(tensors["coef_values"], tensors["coef_mask"], int(spec["atoms"]))
        return EllMatmul(tensors["coef_values"], tensors["coef_indices"], int(spec["atoms"]))

    @classmethod
    def layer(cls, shard_tensors: Sequence[Mapping[str, torch.Tensor]],
              specs: Sequence[Mapping[str, Any]]) -> OneCallLayer | None:
        """A dictsparse layer's shards as one operator where every C is a bitmask and the dictionaries are plain bf16
        rows (``DictionaryBitmaskRows``, every C's values bf16) or, on hosts serving float32, bf16 panels
        (``DictionaryBitmaskPanels``); else None, to run the stacked dictionary and each C on their own."""
        dictionaries = [t["dictionary"] for t in shard_tensors]
        if not all(encoding_of(spec) == BITMASK for spec in specs):
            return None
        rows = DictionaryBitmaskRows.usable(dictionaries[0], [t["coef_values"] for t in shard_tensors])
        if not (rows or DictionaryBitmaskPanels.usable(dictionaries)):
            return None
        coefficients = [cls.coefficients({k: t.clone() for k, t in tensors.items() if k.startswith("coef_")}, spec)
                        for tensors, spec in zip(shard_tensors, specs)]
        if rows:
            return OneCallLayer(DictionaryBitmaskRows(stacked_copy(dictionaries), coefficients))
        return OneCallLayer(DictionaryBitmaskPanels(torch.cat(dictionaries), coefficients))


def stacked_copy(shard_factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The shards' first factors stacked row-wise, as a tensor of their own: the shards' tensors are views of the load
    buffers, dropped after loading."""
    return torch.cat(list(shard_factors)) if len(shard_factors) > 1 else shard_factors[0].clone()


class OneCallLayer:
    """Every shard of a layer on one operator call (the rows and panels runners of ``LowRankShard`` and
    ``DictSparseShard``), which reads the layer input itself."""

    first_factor = None

    def __init__(self, second: LowRankRows | LowRankPanels | DictionaryBitmaskRows | DictionaryBitmaskPanels) -> None:
        self.second = second
        self.out_features = second.out_features


class NMShard:
    """N:M sparse shard: no first factor; the kernel reads x and only the kept values and their positions."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> None:
        self.first_factor = None
        self.second = NMMatmul(tensors["values"], tensors["positions"], int(spec["kept"]), int(spec["group"]))
        self.out_features = tensors["values"].shape[0]

    @classmethod
    def layer(cls, shard_tensors: Sequence[Mapping[str, torch.Tensor]],
              specs: Sequence[Mapping[str, Any]]) -> NMShard | None:
        """A fused layer's shards (q/k/v, gate/up) as one N:M weight, or None to run them shard by shard.

        Shards of one pattern over the same inputs stack row-wise (a row's values and positions do not
        depend on its neighbours): one kernel call per layer packs the tokens once and writes the
        output whole, where shard by shard each call repacked them and its output was copied into a
        column slice of the layer's.
        """
        same_pattern = len({(int(spec["kept"]), int(spec["group"])) for spec in specs}) == 1
        same_inputs = len({t["values"].shape[1] for t in shard_tensors}) == 1
        if len(specs) < 2 or not (same_pattern and same_inputs):
            return None
        return cls({name: torch.cat([t[name] for t in shard_tensors]) for name in ("values", "positions")}, specs[0])


SHARD_RUNNERS: dict[str, Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], ShardRunner]] = {
    "dense": DenseShard,
    "lowrank": LowRankShard,
    "dictsparse": DictSparseShard,
    "rsparse": RSparseLayer.shard,
    "nm": NMShard,
    "lowrank_sparse": LowRankSparseShard,
}
# Schemes whose shards, when every shard of a layer has that scheme, may run as one runner over
# all of them (called with the shards' tensors and specs, in output order; None: run them shard by shard).
LAYER_RUNNERS: dict[str, Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[Mapping[str, Any]]],
                                  ShardRunner | None]] = {
    "rsparse": RSparseLayer,
    "lowrank": LowRankShard.layer,
    "dictsparse": DictSparseShard.layer,
    "lowrank_sparse": LowRankSparseShard.layer,
    "nm": NMShard.layer,
}
