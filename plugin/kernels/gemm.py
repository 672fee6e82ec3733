"""Dense GEMM with a weight prepared once, on the same path vLLM's own dense layers use.

On CPU, vLLM's dense linear runs oneDNN (or its small-GEMM kernel) on weights prepacked at
load time; plain ``F.linear`` on bf16 is several times slower there, which alone makes a
factorized model slower than its dense original (docs/methods/cpu_kernels.md). Every
factor product therefore goes through ``prepacked_linear``.

One exception: a host that serves float32 because it has no bf16 arithmetic (AVX2 only) gets
a bf16 checkpoint's factors in vLLM's float32 buffers. Their values are bf16 numbers, so the
compiled kernel ``bf16_panels_cpu.cpp`` keeps them in bf16, laid out as panels of 16 rows side by
side, and widens them in registers (exact), as the sparse kernels keep their values
(``precision.py``): a decode step streams half the bytes, and the process holds half. From
``STRIPS_FROM_TOKENS`` tokens on, steps widen the panels in cache and multiply them by slimserve's
register-tiled float32 GEMM (``tile_gemm_panels`` in vector_rows.h): at prefill within about 10 %
of oneDNN's GEMM on a float32 copy, either side, where ATen's GEMM on the same strips took 1.2-1.3x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimserve.plugin.kernels.cpp import load_cpu_extension, loop_isa
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.kernels.precision import NARROWING_ISAS, stored_values

#: From this many tokens a bf16-kept factor's panels are widened in cache and multiplied by the tiled GEMM instead of
#: the few-token loop. AMD EPYC (Zen 2, AVX2), 2 threads, float32 x, ms panels loop / tiled GEMM for [5632, 2048] /
#: [2048, 5632] / [5632, 315] / [315, 2048] / [1100, 2048] / [1536, 87]: 16 tokens 2.78 / 3.17, 2.77 / 3.32, 0.39 /
#: 0.46, 0.15 / 0.21, 0.48 / 0.61, 0.060 / 0.053; 32 tokens 5.34 / 5.30, 5.26 / 5.49, 0.89 / 1.23, 0.29 / 0.37, 1.06 /
#: 1.11, 0.096 / 0.082; 48 tokens 7.78 / 6.82, 7.72 / 6.96, 1.15 / 0.98, 0.42 / 0.47, 1.45 / 1.35, 0.099 / 0.089. At 8
#: tokens the loop took 1.98 / 1.53 / 0.21 / 0.11 / 0.25 / 0.031 ms against oneDNN's 4.04 / 3.53 / 0.28 / 0.14 / 0.35 /
#: 0.045 on the float32 copy this path does not keep (docs/methods/cpu_kernels.md).
STRIPS_FROM_TOKENS = 40


class _WeightHolder(torch.nn.Module):
    """The minimal module vLLM's CPU GEMM dispatcher prepares: it reads ``.weight`` and sets ``.cpu_linear``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


#: Rows side by side in one panel of a bf16-kept factor (``bf16_panels_cpu.cpp``; tile_gemm's W panels).
PANEL_ROWS = 16


def _bf16_panels_kernel():
    return load_cpu_extension("slimserve_bf16_panels_cpu", "bf16_panels_cpu.cpp")


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` as panels ``[ceil(out / 16), in, 16]``: panel p holds rows 16p .. 16p + 15 side by side
    for each input, rows past ``out`` zero."""
    out, inp = weight.shape
    count = -(-out // PANEL_ROWS)
    padded = torch.zeros(count * PANEL_ROWS, inp, dtype=weight.dtype)
    padded[:out] = weight
    return padded.view(count, PANEL_ROWS, inp).transpose(1, 2).contiguous()


def from_panels(panels: torch.Tensor, out: int) -> torch.Tensor:
    """The ``[out, in]`` weight ``to_panels`` laid out."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out]


def _bf16_panels_linear_shape(x: torch.Tensor, panels: torch.Tensor, out: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out)


@register_op("bf16_panels_linear", fake=_bf16_panels_linear_shape)
def bf16_panels_linear(x: torch.Tensor, panels: torch.Tensor, out: int) -> torch.Tensor:
    """``x [N, in] · Wᵀ`` for float32 x and W ``[out, in]`` kept as bf16 ``panels`` (``to_panels``): ``[N, out]``
    float32."""
    ext = _bf16_panels_kernel()
    if ext is None:
        return F.linear(x, from_panels(panels, out).to(x.dtype))
    if x.shape[0] >= STRIPS_FROM_TOKENS:
        return ext.bf16_panels_linear_strips(x, panels, out)
    return ext.bf16_panels_linear(x, panels, out)


class Bf16PanelsLinear:
    """``f(x) = x @ weightᵀ`` for a float32-served factor kept in bf16, as panels, on ``bf16_panels_cpu.cpp``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = weight.shape[0]
        self.panels = to_panels(weight)

    @property
    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` bf16 weight the panels hold (a copy)."""
        return from_panels(self.panels, self.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.bf16_panels_linear(x, self.panels, self.out_features)


def prepacked_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``f(x) = x @ weightᵀ`` for ``weight [n, k]``, prepared for the current device.

    The returned function owns its copy of the weight (packed where a packed kernel is used,
    bf16 where the host serves float32 and the values are bf16 numbers), so the caller's buffer
    can be freed.
    """
    weight = weight.contiguous()
    narrowing = loop_isa() in NARROWING_ISAS
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and narrowing:
        ext = _bf16_panels_kernel()
        narrowed = stored_values(weight, ext.isa() if ext is not None else None)
        if narrowed.dtype == torch.bfloat16:
            return Bf16PanelsLinear(narrowed)
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
