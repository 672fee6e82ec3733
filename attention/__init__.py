"""Sparse attention as math and kernels: patterns, block masks, searches and backends.

Plain PyTorch: imports neither vLLM nor ``slimserve.server``.
"""

from slimserve.attention.kernels import fused_attention, mode_attention
from slimserve.attention.patterns import Mode, PatternParams, VideoLayout
from slimserve.attention.schedule import Schedule
from slimserve.attention.search import choose_modes

__all__ = ["Mode", "PatternParams", "Schedule", "VideoLayout", "choose_modes", "fused_attention", "mode_attention"]
