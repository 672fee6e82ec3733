"""The precision slimserve's CPU sparse kernels keep a layer's stored values in.

A host without bf16 arithmetic (AVX2 only: AMD EPYC Zen 3 and older) serves a bf16 checkpoint as
float32, because vLLM's dense bf16 GEMMs would widen every element in software there and run slower
than float32. vLLM then loads every tensor into a float32 buffer, the sparse values included, so a
decode step streams twice the bytes the checkpoint stored for them. The sparse kernels do not need
that: they widen bf16 to float32 in a register (a 16-bit shift), which is exact, and their sums stay
float32. Keeping the values as the checkpoint stored them changes no result bit and halves the bytes a
memory-bound step reads for them. Dense factors (lowrank U, V; dictsparse's dictionary; the low-rank
part of lowrank_sparse) follow the same rule in ``gemm.py``: kept bf16, widened in registers by
``bf16_panels_cpu.cpp``, instead of oneDNN's float32 GEMM on vLLM's float32 copy.
"""

from __future__ import annotations

import torch

#: Kernel builds whose loops widen bf16 values in registers at every token count (the one-token and batch loops,
#: and the panels many-token steps take on AVX2). Other builds take many-token steps on strips multiplied by ATen's
#: GEMM, which for the N:M kernel run in the values' dtype; those keep float32 values.
NARROWING_ISAS = ("avx2",)


def stored_values(values: torch.Tensor, isa: str | None) -> torch.Tensor:
    """``values`` as a sparse kernel of build ``isa`` streams them: bf16 where they are float32 numbers that bf16
    holds exactly (a bf16 checkpoint loaded into vLLM's float32 buffers) and the build widens bf16 at every token
    count, else unchanged (a float32 checkpoint's values keep their low bits)."""
    if values.device.type != "cpu" or isa not in NARROWING_ISAS or not holds_bf16(values):
        return values
    return values.to(torch.bfloat16)


def holds_bf16(values: torch.Tensor) -> bool:
    """Whether ``values`` are float32 numbers that bf16 holds exactly (the low 16 bits of each zero): a bf16
    checkpoint's tensors after vLLM loaded them into float32 buffers."""
    return values.dtype == torch.float32 and not bool((values.view(torch.int32) & 0xFFFF).any())
