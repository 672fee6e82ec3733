"""Running Sparse-vDiT modes: one kernel call per group of heads that share a mode.

Backends (all take and return ``(batch, heads, seq, head_dim)``):

- ``"flex"``: compiled FlexAttention with the mode's cached BlockMask (CPU and CUDA). The
  fast path; skipped tiles are never touched.
- ``"flex_eager"``: the same BlockMask through uncompiled FlexAttention. It materializes the
  score matrix, so it is only for tests and small shapes, where compiling would dominate.
- ``"sdpa"``: the reference: the mode's dense boolean mask through
  ``F.scaled_dot_product_attention``. Every fast path is tested against it.
- ``"xformers"``: CUDA only, for the patterns xformers has a mask type for (per-frame
  diagonal and zero-width multi-diagonal without text, both block-diagonal masks).
- ``"auto"``: xformers where it fits and is importable on CUDA, otherwise ``"flex"``.

``key_valid`` (``[batch]`` number of leading keys that are real) masks padded keys, which is
how HunyuanVideo drops padded text tokens at the end of its sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from slimserve.attention.patterns import Mode, PatternParams, VideoLayout, block_mask, dense_mask

BACKENDS = ("auto", "flex", "flex_eager", "sdpa", "xformers")
Stripes = tuple[tuple[int, ...], ...]


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)`` with static shapes, compiled once per process (Sparse-vDiT and SparseD).

    Every (mask, shape, dtype) compiles anew (about a minute on 2 CPU cores, seconds on a GPU):
    torch's CPU FlexAttention template does not build with dynamic shapes. Past dynamo's
    recompile limit it would silently fall back to the eager kernel that materializes O(S^2)
    scores, so the limit is raised here (Sparse-VideoGen uses the same value).
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 576)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 576)
    return torch.compile(flex_attention, dynamic=False)


def flex_kernel_options(mask: BlockMask, query: torch.Tensor) -> dict[str, int] | None:
    """Tile sizes for compiled FlexAttention on CUDA when the mask's blocks are smaller than its defaults.

    The CUDA kernel tiles queries and keys by up to 128 and refuses a mask whose blocks its tiles
    do not divide (the CPU kernel takes any multiple of 16), so there the tiles follow the mask.
    """
    q_block, kv_block = mask.BLOCK_SIZE
    if not query.is_cuda or min(q_block, kv_block) >= 128:
        return None
    return {"BLOCK_M": q_block, "BLOCK_N": kv_block}


def padding_mask(key_valid: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """``[batch, 1, 1, S]`` boolean mask of real keys, or None when nothing is padded."""
    if key_valid is None:
        return None
    return (torch.arange(seq_len, device=key_valid.device) < key_valid[:, None])[:, None, None, :]


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Full attention (mode FULL), honouring padded keys."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=padding_mask(key_valid, k.shape[2]))


def _xformers_seqlens(mode: Mode, layout: VideoLayout, params: PatternParams) -> list[int] | None:
    """Segment lengths when the mode is a block-diagonal mask xformers can express, else None."""
    if layout.text_len:
        return None
    if mode is Mode.DIAGONAL and params.diagonal_window >= layout.tokens_per_frame - 1:
        return [layout.tokens_per_frame] * layout.num_frames
    if mode is Mode.MULTI_DIAGONAL and params.multi_diagonal_window == 0:
        return [layout.num_frames] * layout.tokens_per_frame  # after the token-major permutation
    return None


@functools.cache
def xformers_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


def _xformers_block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Block-diagonal attention through xformers; batches become more segments of one sequence."""
    from xformers.ops import fmha, memory_efficient_attention

    batch, heads, seq, dim = q.shape
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(seqlens * batch)

    def pack(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(1, batch * seq, heads, dim)

    out = memory_efficient_attention(pack(q), pack(k), pack(v), attn_bias=bias)
    return out.reshape(batch, seq, heads, dim).transpose(1, 2)


def _padding_score_mod(key_valid: torch.Tensor):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx < key_valid[b], score, -float("inf"))

    return score_mod


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: Mode,
    layout: VideoLayout,
    params: PatternParams,
    stripes: Stripes | None = None,
    backend: str = "auto",
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one mode for a group of heads, in the mode's kernel order.

    For ``MULTI_DIAGONAL`` the inputs must already be token-major (see :func:`mode_attention`).
    """
    device = str(q.device)
    if backend == "sdpa":
        mask = dense_mask(mode, layout, params, stripes, device)[None]
        pad = padding_mask(key_valid, layout.seq_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if pad is None else mask & pad)
    seqlens = _xformers_seqlens(mode, layout, params) if key_valid is None else None
    if backend == "xformers" or (backend == "auto" and q.is_cuda and seqlens and xformers_available()):
        if seqlens is None:
            raise ValueError(f"xformers has no mask type for mode {mode.name} with {layout} and {params}")
        return _xformers_block_diagonal(q, k, v, seqlens)
    if backend not in ("auto", "flex", "flex_eager"):
        raise ValueError(f"unknown attention backend {backend!r} (expected one of {BACKENDS})")
    kernel = flex_attention if backend == "flex_eager" else compiled_flex_attention()
    score_mod = None if key_valid is None else _padding_score_mod(key_valid)
    mask = block_mask(mode, layout, params, stripes, device)
    return kernel(q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=flex_kernel_options(mask, q))


def mode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: Mode,
    layout: VideoLayout,
    params: PatternParams,
    stripes: Stripes | None = None,
    backend: str = "auto",
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one mode for ``(batch, heads, seq, dim)`` inputs in the model's token order."""
    if mode is Mode.SKIP:
        return torch.zeros_like(q)
    if mode is Mode.FULL:
        return dense_attention(q, k, v, key_valid)
    if mode is not Mode.MULTI_DIAGONAL:
        return masked_attention(q, k, v, mode, layout, params, stripes, backend, key_valid)
    # Multi-diagonal: reorder frame-major -> token-major, run a band, reorder back. Text stays
    # in place, so padded (trailing text) keys keep their positions and key_valid still holds.
    index = layout.token_major_index(q.device)
    out = masked_attention(
        q[:, :, index], k[:, :, index], v[:, :, index], mode, layout, params, None, backend, key_valid
    )
    return torch.empty_like(out).index_copy_(2, index, out)


def group_heads(modes: Sequence[Mode]) -> dict[Mode, list[int]]:
    """Heads per mode, in mode order (the groups that head fusion runs as one call each)."""
    groups: dict[Mode, list[int]] = {}
    for head, mode in enumerate(modes):
        groups.setdefault(Mode(mode), []).append(head)
    return dict(sorted(groups.items()))


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modes: Sequence[Mode],
    layout: VideoLayout,
    params: PatternParams,
    stripes: Mapping[int, tuple[int, ...]] | None = None,
    backend: str = "auto",
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head modes with head fusion: gather each mode's heads, one call, scatter back.

    Skipped heads are never computed and stay exactly zero. ``stripes`` maps a head index
    (within ``q``) to its key blocks and is needed for STRIPE heads only.
    """
    if len(modes) != q.shape[1]:
        raise ValueError(f"got {len(modes)} modes for {q.shape[1]} heads")
    out = torch.zeros_like(q)
    for mode, heads in group_heads(modes).items():
        cols = tuple(tuple(stripes[h]) for h in heads) if mode is Mode.STRIPE else None
        if len(heads) == len(modes):  # one group: no gather or scatter
            return mode_attention(q, k, v, mode, layout, params, cols, backend, key_valid)
        if mode is Mode.SKIP:
            continue
        idx = torch.tensor(heads, device=q.device)
        group = mode_attention(
            q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx),
            mode, layout, params, cols, backend, key_valid,
        )
        out.index_copy_(1, idx, group)
    return out
