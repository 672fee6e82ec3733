"""Converters from other projects' compressed checkpoints into the slimserve format."""

from slimserve.loaders.converters.compressed_tensors import convert_compressed_tensors
from slimserve.loaders.converters.lowrank_sparse import convert_lowrank_sparse
from slimserve.loaders.converters.nm import convert_nm
from slimserve.loaders.converters.rocket import convert_rocket
from slimserve.loaders.converters.svdllm import convert_svdllm

CONVERTERS = {"rocket": convert_rocket, "svd-llm": convert_svdllm, "lowrank-sparse": convert_lowrank_sparse,
              "nm": convert_nm, "compressed-tensors": convert_compressed_tensors}

__all__ = ["CONVERTERS", "convert_compressed_tensors", "convert_lowrank_sparse", "convert_nm", "convert_rocket",
           "convert_svdllm"]
