"""R-Sparse exact-channel product ``(x ⊙ m) W`` that reads only the weight rows of active channels.

Decode is memory-bound: the speed of R-Sparse is in never reading the columns of W (rows of
the stored ``weight_t [in, out]``) whose input channel is below the threshold. A gather of
the active rows into a copy followed by a matmul reads them twice, so both paths here
stream the active rows straight from ``weight_t``:

- CPU: a C++ extension (``rsparse_cpu.cpp``, AVX-512 inner loops, bf16 and float32) built with
  ``torch.utils.cpp_extension.load`` at first use by ``cpp.py``, which caches the build per CPU
  and logs it;
- CUDA: a small Triton kernel whose weight loads are masked per row, so inactive rows issue no
  memory transactions. It runs only when a GPU and triton are present; there is no GPU here,
  so it is tested only through triton's interpreter (``TRITON_INTERPRET=1``).

A batch of several tokens reads the union of their active channels once; each token keeps
its own mask (a zero coefficient for channels it does not use), so the result is exactly the
per-token R-Sparse product. Layers that read the same input (q | k | v, gate | up) run as
segments of one call (``segmented_sparse_mm``): one dispatch instead of three, and one pool of
column tasks that keeps both threads busy even for 192-column segments.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from slimserve.loaders.schemes.rsparse import exact_mask
from slimserve.plugin.kernels.cpp import load_cpu_extension


def cpu_extension() -> ModuleType | None:
    """The compiled CPU kernel (``rsparse_cpu.cpp``), built once per machine; None if it cannot be built."""
    return load_cpu_extension("slimserve_rsparse_cpu", "rsparse_cpu.cpp")


def sparse_mm(x: torch.Tensor, weight_t: torch.Tensor, col_norm: torch.Tensor, threshold: float,
              with_rest: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, rest)`` with ``y = (x ⊙ m) weight_t`` and ``rest = x ⊙ (1 − m)`` (None unless asked).

    ``x [N, in]``, ``weight_t [in, out]`` contiguous in x's dtype, ``col_norm [in]`` float32,
    ``m = |x|·col_norm > threshold`` per token.
    """
    y, rests = segmented_sparse_mm(x, weight_t, col_norm[None], [threshold], [weight_t.shape[1]], with_rest)
    return y, (rests[0] if rests is not None else None)


def segmented_sparse_mm(x: torch.Tensor, weight_t: torch.Tensor, col_norms: torch.Tensor, thresholds: Sequence[float],
                        splits: Sequence[int], with_rest: bool = False,
                        low_rank: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sparse_mm`` of several layers sharing the input ``x`` (q | k | v, gate | up) in one call.

    ``weight_t [in, Σ splits]`` holds their Wᵀ side by side, segment s owning ``splits[s]``
    columns with its own ``col_norms[s]`` (``[S, in]`` float32) and ``thresholds[s]``. With
    ``low_rank[s] = (S_r·V_rᵀ [r, in] float32, U_rᵀ [r, splits[s]] in x's dtype)`` (see
    ``low_rank_operands``) segment s also gets ``U_r(S_r V_rᵀ(x ⊙ (1 − m_s)))``, the full R-Sparse
    output. Returns ``y [N, Σ splits]`` and, if asked, ``rest [S, N, in]`` with ``rest[s] = x ⊙ (1 − m_s)``.
    """
    low_rank = list(low_rank) if low_rank is not None else [None] * len(splits)
    ext = cpu_extension() if not x.is_cuda and x.dtype in (torch.bfloat16, torch.float32) else None
    if ext is not None:
        rest = x.new_empty(len(splits), *x.shape) if with_rest else None
        empty = x.new_empty(0)
        vs = [lr[0] if lr is not None else empty for lr in low_rank]
        ut = [lr[1] if lr is not None else empty for lr in low_rank]
        if not any(lr is not None for lr in low_rank):
            vs = ut = []
        y = ext.rsparse_sparse_mm(x, weight_t, col_norms, [float(t) for t in thresholds], list(splits), rest, vs, ut)
        return y, rest
    if not x.is_cuda:
        return masked_segments(x, weight_t, col_norms, thresholds, splits, with_rest, low_rank)
    segments = weight_t.split(list(splits), dim=1)
    parts = [_triton_sparse_mm(x, w, n, t, with_rest or lr is not None)
             for w, n, t, lr in zip(segments, col_norms, thresholds, low_rank)]
    return _add_low_rank([y for y, _ in parts], [r for _, r in parts], low_rank, with_rest)


def masked_segments(x: torch.Tensor, weight_t: torch.Tensor, col_norms: torch.Tensor, thresholds: Sequence[float],
                    splits: Sequence[int], with_rest: bool = False,
                    low_rank: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``segmented_sparse_mm`` in plain PyTorch (masked input times each segment's Wᵀ).

    For steps of many tokens, whose union of active channels is nearly every row, and for CPUs
    where the C++ kernel could not be built.
    """
    masks = [exact_mask(x, n, t) for n, t in zip(col_norms, thresholds)]
    ys = [(x * m) @ w for m, w in zip(masks, weight_t.split(list(splits), dim=1))]
    return _add_low_rank(ys, [x * ~m for m in masks], low_rank or [None] * len(splits), with_rest)


def _add_low_rank(ys: list[torch.Tensor], rests: list[torch.Tensor | None],
                  low_rank: Sequence[tuple[torch.Tensor, torch.Tensor] | None], with_rest: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adds each segment's ``U_r(S_r V_rᵀ rest)`` to its exact part and joins the segments."""
    for s, lr in enumerate(low_rank):
        if lr is not None:
            ys[s] = ys[s] + (rests[s].float() @ lr[0].t()).to(ys[s].dtype) @ lr[1]
    return torch.cat(ys, dim=1), (torch.stack(rests) if with_rest else None)


def low_rank_operands(vs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_r·V_rᵀ, U_r)`` as ``segmented_sparse_mm`` takes them: float32 ``[r, in]``, ``U_rᵀ [r, out]`` contiguous.

    The code ``S_r V_rᵀ(x ⊙ (1 − m))`` is a few dot products per token, done in float32; ``U_rᵀ``'s
    rows are accumulated like the rows of Wᵀ, so they keep the weights' dtype.
    """
    return vs.float().contiguous(), u.t().contiguous()


def _triton_sparse_mm(x: torch.Tensor, weight_t: torch.Tensor, col_norm: torch.Tensor, threshold: float,
                      with_rest: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    import triton

    tokens, in_features = x.shape
    out_features = weight_t.shape[1]
    x = x.contiguous()
    y = torch.zeros(tokens, out_features, dtype=torch.float32, device=x.device)
    block_n = max(triton.next_power_of_2(tokens), 1)
    grid = (triton.cdiv(out_features, TRITON_BLOCKS.out), triton.cdiv(in_features, TRITON_BLOCKS.inputs_per_program))
    # A segment of a fused Wᵀ (gate | up) is a column slice: rows stride by the fused width.
    if weight_t.stride(1) != 1:
        weight_t = weight_t.contiguous()
    _rsparse_kernel()[grid](x, weight_t, col_norm, y, tokens, in_features, out_features, weight_t.stride(0),
                            float(threshold),
                            BLOCK_N=block_n, BLOCK_IN=TRITON_BLOCKS.inputs, BLOCK_OUT=TRITON_BLOCKS.out,
                            K_STEPS=TRITON_BLOCKS.steps)
    rest = None
    if with_rest:
        rest = torch.where(x.float().abs() * col_norm > threshold, torch.zeros_like(x), x)
    return y.to(x.dtype), rest


@dataclass
class TritonBlocks:
    """The triton kernel's tile: ``inputs`` x ``out`` weights per step, ``steps`` steps of inputs per program.

    Each program accumulates ``steps`` tiles in registers before its one atomic add, so fewer
    steps mean more programs and more atomics on ``y``; ``bench/cuda_backends.py`` sweeps these.
    """

    inputs: int = 32
    out: int = 128
    steps: int = 8

    @property
    def inputs_per_program(self) -> int:
        return self.inputs * self.steps


TRITON_BLOCKS = TritonBlocks()


@functools.cache
def _rsparse_kernel():
    """Split-K over input channels; each program loads only its active rows (masked loads) of ``K_STEPS`` tiles,
    then atomically adds its partial sums."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, norm_ptr, y_ptr, tokens, in_features, out_features, w_row_stride, threshold,
               BLOCK_N: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr, K_STEPS: tl.constexpr):
        offs_o = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        offs_n = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=tl.float32)
        for step in tl.static_range(K_STEPS):
            offs_k = (tl.program_id(1) * K_STEPS + step) * BLOCK_IN + tl.arange(0, BLOCK_IN)
            in_k = offs_k < in_features
            x = tl.load(x_ptr + offs_n[:, None] * in_features + offs_k[None, :],
                        mask=(offs_n[:, None] < tokens) & in_k[None, :], other=0.0).to(tl.float32)
            norm = tl.load(norm_ptr + offs_k, mask=in_k, other=0.0)
            keep = tl.abs(x) * norm[None, :] > threshold
            xs = tl.where(keep, x, 0.0)
            active = tl.max(keep.to(tl.int32), axis=0) > 0  # union over the batch
            w = tl.load(w_ptr + offs_k[:, None] * w_row_stride + offs_o[None, :],
                        mask=active[:, None] & (offs_o[None, :] < out_features), other=0.0).to(tl.float32)
            acc += tl.sum(xs[:, :, None] * w[None, :, :], axis=1)  # [BLOCK_N, BLOCK_OUT]
        tl.atomic_add(y_ptr + offs_n[:, None] * out_features + offs_o[None, :], acc,
                      mask=(offs_n[:, None] < tokens) & (offs_o[None, :] < out_features))

    return kernel
