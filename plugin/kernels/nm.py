"""``y = x · Wᵀ`` for an N:M sparse weight stored as kept values plus packed offsets (the ``nm`` scheme).

The compiled kernel (``nm_cpu.cpp``) reads only the stored bytes. Few tokens (decode) run its
vector loops: memory-bound, so at 2:4 in bf16 they read 56 % of dense's bytes. From a handful of
tokens on those loops are compute-bound and lose to oneDNN's dense GEMM, which on CPUs with AMX
(Intel Sapphire Rapids and later) runs on the tile unit. There, bf16 batches of 2:4 and 4:8
weights go to the tile unit too: the kernel expands 16 rows at a time into a dense strip in cache
and multiplies it with AMX, at every token count up to prefill. On AVX2 hosts (which serve fp32)
2:4 and 4:8 batches expand each row's kept values into dense lanes once per 8 inputs and share
them across the tokens with plain FMAs, and steps above ``MANY_TOKENS`` multiply only the kept
weights against x packed in panels of 32 tokens (half of dense's multiply-adds at 2:4; measured
about level with the dense GEMM at prefill, ahead of the strips below 128 tokens). Elsewhere
steps above ``MANY_TOKENS`` decompress strips of rows into one buffer that stays in cache and run
ATen's GEMM per strip, so the process never holds a dense copy of a layer. Crossovers are
measured with ``bench/nm_kernel.py`` (see docs/methods/nm.md). Without a compiler the PyTorch
reference of the scheme does the same arithmetic, more slowly.

The product is the custom op ``slimserve::nm_matmul`` so torch.compile (vLLM's default on CPU)
treats it as one opaque call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimserve.loaders.schemes.nm import nm_to_dense
from slimserve.plugin.kernels.cpp import load_cpu_extension

#: Token counts above this run dense GEMMs on decompressed strips of W, unless the AMX tile unit takes them.
MANY_TOKENS = 16


def _cpu_kernel():
    return load_cpu_extension("slimserve_nm_cpu", "nm_cpu.cpp")


def many_tokens_product(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kept: int,
                        group: int) -> torch.Tensor:
    """``x · Wᵀ`` for many tokens: on AVX2 hosts the kernel's loop over the kept weights only (half the
    multiply-adds at 2:4), elsewhere dense GEMMs per strip of rows decompressed in cache (compiled, on CPU), else
    through the reference's whole dense weight."""
    ext = _cpu_kernel() if values.device.type == "cpu" else None
    if ext is not None and ext.isa() == "avx2":
        return ext.nm_matmul_kept(x, values, positions, kept, group)
    if ext is not None:
        return ext.nm_matmul_strips(x, values, positions, kept, group)
    return F.linear(x, nm_to_dense(values, positions, x.shape[1], kept, group).to(x.dtype))


@torch.library.custom_op("slimserve::nm_matmul", mutates_args=())
def nm_matmul(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kept: int, group: int) -> torch.Tensor:
    """``x [N, in] · Wᵀ`` for W given as ``values [out, in·kept/group]`` and ``positions``: ``[N, out]``, x dtype."""
    in_features = x.shape[1]
    ext = _cpu_kernel() if x.device.type == "cpu" else None
    on_tile_unit = (ext is not None and x.dtype == values.dtype == torch.bfloat16
                    and ext.amx_usable(in_features, kept, group))
    if x.shape[0] > MANY_TOKENS and not on_tile_unit:
        return many_tokens_product(x, values, positions, kept, group)
    if ext is not None:
        return ext.nm_matmul(x, values, positions, kept, group).to(x.dtype)
    return x @ nm_to_dense(values.to(x.dtype), positions, in_features, kept, group).t()


@nm_matmul.register_fake
def _(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kept: int, group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], values.shape[0])


class NMMatmul:
    """``y = x · Wᵀ`` for one N:M sparse module (or its TP slice), prepared once at load."""

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, kept: int, group: int) -> None:
        self.values = values.contiguous()
        self.positions = positions.contiguous()
        self.kept = kept
        self.group = group
        # Build (or load) the kernel now, at model load, not inside the first traced forward.
        self.ext = _cpu_kernel() if values.device.type == "cpu" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.nm_matmul(x.contiguous(), self.values, self.positions, self.kept, self.group)
