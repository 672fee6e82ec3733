"""The weight schemes a slimserve checkpoint can use, by name. Adding one = one module + one line here."""

from __future__ import annotations

from slimserve.loaders.schemes.base import Scheme, TensorSpec
from slimserve.loaders.schemes.dense import DenseScheme
from slimserve.loaders.schemes.dictsparse import DictSparseScheme
from slimserve.loaders.schemes.lowrank import LowRankScheme
from slimserve.loaders.schemes.lowrank_sparse import LowRankSparseScheme
from slimserve.loaders.schemes.nm import NMScheme
from slimserve.loaders.schemes.rsparse import RSparseScheme

SCHEMES: dict[str, Scheme] = {s.name: s for s in (DenseScheme(), LowRankScheme(), DictSparseScheme(), RSparseScheme(),
                                                NMScheme(), LowRankSparseScheme())}

__all__ = ["SCHEMES", "Scheme", "TensorSpec"]
