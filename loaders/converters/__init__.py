"""Converters from other projects' compressed checkpoints into the slimserve format."""

from slimserve.loaders.converters.lowrank_sparse import convert_lowrank_sparse
from slimserve.loaders.converters.rocket import convert_rocket
from slimserve.loaders.converters.svdllm import convert_svdllm

CONVERTERS = {"rocket": convert_rocket, "svd-llm": convert_svdllm, "lowrank-sparse": convert_lowrank_sparse}

__all__ = ["CONVERTERS", "convert_lowrank_sparse", "convert_rocket", "convert_svdllm"]
