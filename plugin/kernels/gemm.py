"""Dense GEMM with a weight prepared once, on the same path vLLM's own dense layers use.

On CPU, vLLM's dense linear runs oneDNN (or its small-GEMM kernel) on weights prepacked at
load time; plain ``F.linear`` on bf16 is several times slower there, which alone makes a
factorized model slower than its dense original (docs/methods/cpu_kernels.md). Every
factor product therefore goes through ``prepacked_linear``.

One exception: a host that serves float32 because it has no bf16 arithmetic (AVX2 only) gets
a bf16 checkpoint's factors in vLLM's float32 buffers. Their values are bf16 numbers, so the
compiled kernel ``bf16_rows_cpu.cpp`` keeps them in bf16 and widens them in registers (exact),
as the sparse kernels keep their values (``precision.py``): a decode step streams half the
bytes, and the process holds half. From ``STRIPS_FROM_TOKENS`` tokens on the row loop is no longer
ahead, and steps widen rows in cache and multiply them by slimserve's register-tiled float32 GEMM
(``tile_gemm`` in vector_rows.h): at prefill within about 10 % of oneDNN's GEMM on a float32 copy,
either side, where ATen's GEMM on the same strips took 1.2-1.3x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimserve.plugin.kernels.cpp import load_cpu_extension, loop_isa
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.kernels.precision import NARROWING_ISAS, stored_values

#: From this many tokens a bf16-kept factor is widened in strips and multiplied by the tiled GEMM instead of the row
#: loop. AMD EPYC (Zen 2, AVX2), 2 threads, float32 x, ms for [5632, 2048] / [5632, 1100] / [1100, 2048] /
#: [2048, 5632]: row loop 7.16 / 4.95 / 1.40 / 6.87 at 32 tokens (strips 8.38 / 4.49 / 1.55 / 7.73), 10.7 / 7.11 /
#: 2.04 / 10.1 at 48 (strips 9.70 / 5.52 / 1.88 / 9.65), 13.5 / 9.10 / 2.64 / 13.0 at 64 (strips 12.1 / 6.16 / 2.37 /
#: 11.5). At 500 tokens the strips take 67.0 / 35.7 / 14.6 / 75.5 ms against 69.5 / 37.3 / 14.7 / 73.8 for vLLM's
#: oneDNN GEMM on the float32 copy this path does not keep (docs/methods/cpu_kernels.md).
STRIPS_FROM_TOKENS = 48


class _WeightHolder(torch.nn.Module):
    """The minimal module vLLM's CPU GEMM dispatcher prepares: it reads ``.weight`` and sets ``.cpu_linear``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def _bf16_rows_kernel():
    return load_cpu_extension("slimserve_bf16_rows_cpu", "bf16_rows_cpu.cpp")


def _bf16_rows_linear_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@register_op("bf16_rows_linear", fake=_bf16_rows_linear_shape)
def bf16_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [N, in] · weightᵀ`` for a bf16 ``weight [out, in]`` and float32 x: ``[N, out]`` float32."""
    ext = _bf16_rows_kernel()
    if ext is None:
        return F.linear(x, weight.to(x.dtype))
    if x.shape[0] >= STRIPS_FROM_TOKENS:
        return ext.bf16_rows_linear_strips(x, weight)
    return ext.bf16_rows_linear(x, weight)


class Bf16RowsLinear:
    """``f(x) = x @ weightᵀ`` for a float32-served factor kept in bf16 (``weight``), on ``bf16_rows_cpu.cpp``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.bf16_rows_linear(x, self.weight)


def prepacked_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``f(x) = x @ weightᵀ`` for ``weight [n, k]``, prepared for the current device.

    The returned function owns its copy of the weight (packed where a packed kernel is used,
    bf16 where the host serves float32 and the values are bf16 numbers), so the caller's buffer
    can be freed.
    """
    weight = weight.contiguous()
    narrowing = loop_isa() in NARROWING_ISAS
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and narrowing:
        ext = _bf16_rows_kernel()
        narrowed = stored_values(weight, ext.isa() if ext is not None else None)
        if narrowed.dtype == torch.bfloat16:
            return Bf16RowsLinear(narrowed)
    weight = weight.clone()
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
