"""``y = x · Wᵀ`` for an N:M sparse weight stored as kept values plus packed offsets (the ``nm`` scheme).

The compiled kernel (``nm_cpu.cpp``) reads only the stored bytes. Few tokens (decode) run its
vector loops: memory-bound, so at 2:4 in bf16 they read 56 % of dense's bytes. From a handful of
tokens on those loops are compute-bound and lose to oneDNN's dense GEMM, which on CPUs with AMX
(Intel Sapphire Rapids and later) runs on the tile unit. There, bf16 batches of 2:4 and 4:8
weights go to the tile unit too: the kernel expands 16 rows at a time into a dense strip in cache
and multiplies it with AMX, at every token count up to prefill. On AVX2 hosts (which serve fp32)
2:4 and 4:8 batches expand each row's kept values into dense lanes once per 8 inputs and share
them across the tokens with plain FMAs, and steps above ``MANY_TOKENS`` multiply only the kept
weights against x packed in panels of 48 tokens: half of dense's multiply-adds at 2:4, at a load of x
per FMA, which beat the strips on the register-tiled GEMM at every count measured (64-2048 tokens,
docs/methods/nm.md). On CPUs with
AVX512_BF16 and no tile unit (AMD Zen 4) the dense bf16 GEMM is bound by memory up to about 8 tokens
and by its dot products (``_mm512_dpbf16_ps``) from about 16 on. There 2:4 bf16 batches from 2 tokens
to below ``GATHERED_BELOW_TOKENS`` permute each token's inputs to a row's kept columns (``vpermt2w``)
and dot them with its stored values: half a dense GEMM's dot products (1.0-2x of dense on one layer up
to 16 tokens, 0.87-0.93x from 32 to 256); longer prefills take the strips. 4:8 batches of 2 to
``DOT_UP_TO_TOKENS`` tokens expand two rows' stored values in registers and dot them, zeros included,
with 4 or 8 tokens at a time. Elsewhere steps above ``MANY_TOKENS`` decompress strips of rows into one
buffer that stays in cache and run ATen's GEMM per strip, so the process never holds a dense copy of a
layer. Crossovers are measured with ``bench/nm_kernel.py`` (see docs/methods/nm.md). Without a
compiler the PyTorch reference of the scheme does the same arithmetic, more slowly.

On CUDA, 2:4 fp16/bf16 weights go to NVIDIA's sparse tensor cores (Ampere and later) through
PyTorch's semi-structured sparse tensor, which stores the same kind of packed values and 2-bit
positions as this scheme; other patterns, dtypes and shapes the tensor cores refuse take the
reference path (``bench/cuda_backends.py`` measures both on a GPU).

The product is the operator ``slimserve::nm_matmul`` (``ops.py``) so torch.compile (vLLM's default on CPU)
treats it as one opaque call.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from slimserve.loaders.schemes.nm import nm_to_dense
from slimserve.plugin.kernels.cpp import load_cpu_extension
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.kernels.precision import stored_values

logger = logging.getLogger(__name__)

#: Token counts above this leave the few-token loops (unless a bf16 loop or the AMX tile unit takes them): AVX2
#: builds for the loop over the kept weights, others for dense GEMMs on decompressed strips of W.
MANY_TOKENS = 16

#: On CPUs with AVX512_BF16 and no tile unit (AMD Zen 4), bf16 4:8 batches up to this many tokens stay in the
#: kernel's bf16 dot-product loop; the strips overtake it above (bench/nm_kernel.py, docs/methods/nm.md). 2:4 takes
#: the gathered loop there (``gathered_usable``) below ``GATHERED_BELOW_TOKENS``.
DOT_UP_TO_TOKENS = 32

#: From this many tokens 2:4 bf16 batches leave the gathered loop for the strips. The loop passes every token's x
#: (2 MiB at 500 tokens of 2048 inputs) once per 64 rows, from L3 once it outgrows L2, the likely reason (no hardware
#: counters on these VMs to confirm it); the crossover itself is measured. AMD EPYC (Zen 4), 2 threads,
#: the four products of a layer of the Llama 2048 / 5632 at 2:4 (qkv, o, gate+up, down), single calls, median ms
#: gathered / strips (dense prepacked): 128 tokens 32.6 / 37.3 (31.6), 256 60.0 / 61.4 (54.2), 320 80.2 / 77.4
#: (67.1), 384 120.2 / 95.5 (84.2), 500 125.0 / 118.4 (105.3) and 151.8 / 124.7 (108.4) in two runs, 1000
#: 290.6 / 236.3 (214.8).
GATHERED_BELOW_TOKENS = 256


def _cpu_kernel():
    return load_cpu_extension("slimserve_nm_cpu", "nm_cpu.cpp")


def many_tokens_product(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kept: int,
                        group: int) -> torch.Tensor:
    """``x · Wᵀ`` for many tokens: on AVX2 hosts the kernel's loop over the kept weights only (half the
    multiply-adds at 2:4), on other CPUs dense GEMMs per strip of rows decompressed in cache, else through the
    reference's whole dense weight."""
    ext = _cpu_kernel() if values.device.type == "cpu" else None
    if ext is not None and ext.isa() == "avx2":
        return ext.nm_matmul_kept(x, values, positions, kept, group)
    if ext is not None:
        return ext.nm_matmul_strips(x, values, positions, kept, group)
    return F.linear(x, nm_to_dense(values, positions, x.shape[1], kept, group).to(x.dtype))


def _nm_matmul_shape(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kept: int,
                     group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], values.shape[0])


@register_op("nm_matmul", fake=_nm_matmul_shape)
def nm_matmul(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kept: int, group: int) -> torch.Tensor:
    """``x [N, in] · Wᵀ`` for W given as ``values [out, in·kept/group]`` and ``positions``: ``[N, out]``, x dtype."""
    in_features = x.shape[1]
    ext = _cpu_kernel() if x.device.type == "cpu" else None
    bf16 = ext is not None and x.dtype == values.dtype == torch.bfloat16
    kernel_takes_batch = bf16 and (ext.amx_usable(in_features, kept, group)
                                   or (x.shape[0] < GATHERED_BELOW_TOKENS
                                       and ext.gathered_usable(in_features, kept, group))
                                   or (x.shape[0] <= DOT_UP_TO_TOKENS and ext.dot_usable(in_features, kept, group)))
    if x.shape[0] > MANY_TOKENS and not kernel_takes_batch:
        return many_tokens_product(x, values, positions, kept, group)
    if ext is not None:
        return ext.nm_matmul(x, values, positions, kept, group).to(x.dtype)
    return x @ nm_to_dense(values.to(x.dtype), positions, in_features, kept, group).t()


def sparse_tensor_core_weight(values: torch.Tensor, positions: torch.Tensor, in_features: int, kept: int,
                              group: int) -> torch.Tensor | None:
    """The weight as PyTorch's semi-structured sparse tensor when the GPU's sparse tensor cores take it, else None.

    Those cores multiply 2:4 fp16/bf16 weights directly (cuSPARSELt or CUTLASS underneath); the
    kernels want rows and inputs in multiples of their tile and a GPU of compute capability 8.0 or
    later, and PyTorch raises when a weight does not fit, so such a weight keeps the portable path.
    """
    if values.device.type != "cuda" or (kept, group) != (2, 4) or values.dtype not in (torch.float16, torch.bfloat16):
        return None
    from torch.sparse import to_sparse_semi_structured

    try:
        return to_sparse_semi_structured(nm_to_dense(values, positions, in_features, kept, group))
    except (RuntimeError, ValueError) as error:
        logger.info("a 2:4 weight of %d x %d stays off the sparse tensor cores: %s", values.shape[0], in_features,
                    error)
        return None


class NMMatmul:
    """``y = x · Wᵀ`` for one N:M sparse module (or its TP slice), prepared once at load."""

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, kept: int, group: int) -> None:
        in_features = values.shape[1] * group // kept
        self.tensor_cores = sparse_tensor_core_weight(values, positions, in_features, kept, group)
        # Build (or load) the kernel now, at model load, not inside the first traced forward.
        self.ext = _cpu_kernel() if values.device.type == "cpu" else None
        # The tensor cores' copy holds the whole weight; keeping the scheme's tensors too would double it.
        isa = self.ext.isa() if self.ext is not None else None
        self.values = None if self.tensor_cores is not None else stored_values(values.contiguous(), isa)
        self.positions = None if self.tensor_cores is not None else positions.contiguous()
        self.kept = kept
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tensor_cores is not None:
            return F.linear(x.to(self.tensor_cores.dtype), self.tensor_cores).to(x.dtype)
        return torch.ops.slimserve.nm_matmul(x.contiguous(), self.values, self.positions, self.kept, self.group)
