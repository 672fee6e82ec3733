"""Dense GEMM with a weight prepared once, on the same path vLLM's own dense layers use.

On CPU, vLLM's dense linear runs oneDNN (or its small-GEMM kernel) on weights prepacked at
load time; plain ``F.linear`` on bf16 is several times slower there, which alone makes a
factorized model slower than its dense original (docs/methods/cpu_kernels.md). Every
factor product therefore goes through ``prepacked_linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class _WeightHolder(torch.nn.Module):
    """The minimal module vLLM's CPU GEMM dispatcher prepares: it reads ``.weight`` and sets ``.cpu_linear``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def prepacked_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``f(x) = x @ weightᵀ`` for ``weight [n, k]``, prepared for the current device.

    The returned function owns its copy of the weight (packed where a packed kernel is used),
    so the caller's buffer can be freed.
    """
    weight = weight.contiguous().clone()
    if weight.device.type == "cpu":
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        holder = _WeightHolder(weight)
        del weight
        dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
        cpu_linear = holder.cpu_linear
        # Packed paths emptied holder.weight; the plain fallback still reads it at call time.
        kept = holder.weight
        return lambda x: cpu_linear(x, kept, None)
    return lambda x: F.linear(x, weight)
