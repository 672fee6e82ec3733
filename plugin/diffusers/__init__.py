"""diffusers hooks: Sparse-vDiT attention processors for Wan, HunyuanVideo and CogVideoX.

``apply(pipe, schedule)`` runs a pipeline with a searched schedule; ``search(pipe, prompts)``
produces one. This package imports diffusers but never vLLM.
"""

from slimserve.plugin.diffusers.runtime import SPECS, Installed, apply, search

__all__ = ["SPECS", "Installed", "apply", "search"]
