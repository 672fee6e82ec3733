"""Sparse-vDiT attention patterns as FlexAttention mask functions and cached block masks.

A video DiT's self-attention runs over ``F`` frames of ``P`` tokens each, stored frame-major
(token index ``f * P + p``), plus text tokens that some models put before the video
(CogVideoX) and some after it (HunyuanVideo); Wan has none. Sparse-vDiT
(``docs/methods/sparse_vdit.md``) observes that every head follows one of a few fixed
patterns, so each (step, layer, head) gets one :class:`Mode`:

- ``FULL``: dense attention.
- ``SKIP``: the head's output is zero; nothing is computed.
- ``DIAGONAL``: a within-frame window: same frame and ``|p_q - p_k| <= diagonal_window``.
- ``MULTI_DIAGONAL``: the same spatial neighbourhood in every frame,
  ``|p_q - p_k| <= multi_diagonal_window``. In frame-major order these diagonals touch every
  tile (no tile can be skipped), so the kernel permutes the head's video tokens to token-major
  order (``p * F + f``), where the pattern is a band of whole ``F``-token groups, and back.
- ``STRIPE``: vertical stripes: every query sees a fixed set of key blocks chosen offline.

Text rows and text columns are always dense (the text covers <1 % of the map but carries
the conditioning). Masks are built once per (mode, layout, parameters, stripe columns) and
cached, because ``create_block_mask`` costs as much as a masked call (docs/methods/cpu_kernels.md).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Building a block mask eagerly materializes the S x S boolean mask; above this length the
# builder is compiled instead (slow to compile once, then cheap and memory-light).
_COMPILE_MASK_MIN_TOKENS = 4096


class Mode(enum.IntEnum):
    """One attention mode per (step, layer, head); the value is the paper's mode index."""

    FULL = 0
    SKIP = 1
    DIAGONAL = 2
    MULTI_DIAGONAL = 3
    STRIPE = 4

    @property
    def char(self) -> str:
        """One-letter code used in schedule files (F, S, D, M, V)."""
        return "FSDMV"[self.value]

    @classmethod
    def from_char(cls, char: str) -> Mode:
        return cls("FSDMV".index(char))


SPARSE_MODES = (Mode.SKIP, Mode.DIAGONAL, Mode.MULTI_DIAGONAL, Mode.STRIPE)


@dataclass(frozen=True)
class VideoLayout:
    """Where the video and text tokens sit in one self-attention sequence."""

    num_frames: int
    tokens_per_frame: int
    text_len: int = 0
    text_first: bool = False

    @property
    def video_len(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_start(self) -> int:
        return self.text_len if self.text_first else 0

    def token_major_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Gather index taking the sequence from frame-major to token-major video order.

        ``x[..., idx, :]`` holds at position ``start + p * F + f`` the token ``start + f * P + p``;
        text positions map to themselves.
        """
        start = self.video_start
        video = torch.arange(self.video_len, device=device).view(self.num_frames, self.tokens_per_frame)
        video = video.t().reshape(-1) + start
        index = torch.arange(self.seq_len, device=device)
        index[start : start + self.video_len] = video
        return index

    def split(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(is_text, video_index)`` for sequence positions (video_index is junk on text)."""
        if self.text_first:
            return idx < self.text_len, idx - self.text_len
        return idx >= self.video_len, idx


@dataclass(frozen=True)
class PatternParams:
    """The fixed shape of every sparse mode; the paper fixes these per pattern in advance."""

    block_size: int = 128
    diagonal_window: int = 0
    multi_diagonal_window: int = 0
    stripe_blocks: int = 1

    @classmethod
    def for_layout(cls, layout: VideoLayout, block_size: int = 128) -> PatternParams:
        """Defaults that give every sparse mode a density near ``1 / num_frames``.

        The diagonal is the whole frame (per-frame block diagonal); the multi-diagonal window
        keeps ``~P / F`` spatial neighbours in every frame; stripes keep one block in ``F``.
        """
        frames, per_frame = layout.num_frames, layout.tokens_per_frame
        num_blocks = -(-layout.seq_len // block_size)
        return cls(
            block_size=block_size,
            diagonal_window=per_frame,
            multi_diagonal_window=max(0, per_frame // (2 * frames)),
            stripe_blocks=max(1, -(-num_blocks // frames)),
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def diagonal_mask_mod(layout: VideoLayout, window: int) -> MaskMod:
    """Within-frame window in the model's own (frame-major) order."""
    per_frame = layout.tokens_per_frame

    def mask_mod(b, h, q_idx, kv_idx):
        q_text, q_video = layout.split(q_idx)
        k_text, k_video = layout.split(kv_idx)
        same_frame = (q_video // per_frame) == (k_video // per_frame)
        near = (q_video % per_frame - k_video % per_frame).abs() <= window
        return q_text | k_text | (same_frame & near)

    return mask_mod


def multi_diagonal_mask_mod(layout: VideoLayout, window: int) -> MaskMod:
    """The explicit multi-diagonal mask in frame-major order (the reference; no tile is empty)."""
    per_frame = layout.tokens_per_frame

    def mask_mod(b, h, q_idx, kv_idx):
        q_text, q_video = layout.split(q_idx)
        k_text, k_video = layout.split(kv_idx)
        return q_text | k_text | ((q_video % per_frame - k_video % per_frame).abs() <= window)

    return mask_mod


def token_major_band_mask_mod(layout: VideoLayout, window: int) -> MaskMod:
    """The multi-diagonal mask after :meth:`VideoLayout.token_major_index`: a band of F-groups."""
    frames = layout.num_frames

    def mask_mod(b, h, q_idx, kv_idx):
        q_text, q_video = layout.split(q_idx)
        k_text, k_video = layout.split(kv_idx)
        return q_text | k_text | ((q_video // frames - k_video // frames).abs() <= window)

    return mask_mod


def stripe_mask_mod(layout: VideoLayout, block_size: int, columns: torch.Tensor) -> MaskMod:
    """Fixed key blocks per head: ``columns`` is a bool tensor ``[heads, num_kv_blocks]``."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_text, _ = layout.split(q_idx)
        k_text, _ = layout.split(kv_idx)
        return q_text | k_text | columns[h, kv_idx // block_size]

    return mask_mod


def num_blocks(layout: VideoLayout, block_size: int) -> int:
    return -(-layout.seq_len // block_size)


def columns_tensor(
    layout: VideoLayout, block_size: int, stripes: tuple[tuple[int, ...], ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool ``[heads, num_kv_blocks]`` from per-head tuples of chosen key-block indices."""
    cols = torch.zeros(len(stripes), num_blocks(layout, block_size), dtype=torch.bool, device=device)
    for head, blocks in enumerate(stripes):
        cols[head, list(blocks)] = True
    return cols


def mask_mod_for(
    mode: Mode,
    layout: VideoLayout,
    params: PatternParams,
    stripes: tuple[tuple[int, ...], ...] | None = None,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """The mask function a mode's kernel applies, in the kernel's token order.

    ``MULTI_DIAGONAL`` returns the band in token-major order (what the kernel runs after its
    permutation); :func:`multi_diagonal_mask_mod` is the same pattern in model order.
    """
    if mode is Mode.DIAGONAL:
        return diagonal_mask_mod(layout, params.diagonal_window)
    if mode is Mode.MULTI_DIAGONAL:
        return token_major_band_mask_mod(layout, params.multi_diagonal_window)
    if mode is Mode.STRIPE:
        if stripes is None:
            raise ValueError("STRIPE needs its key-block columns (stripes=...)")
        return stripe_mask_mod(layout, params.block_size, columns_tensor(layout, params.block_size, stripes, device))
    raise ValueError(f"mode {mode.name} has no mask (FULL is dense, SKIP computes nothing)")


@functools.lru_cache(maxsize=256)
def block_mask(
    mode: Mode,
    layout: VideoLayout,
    params: PatternParams,
    stripes: tuple[tuple[int, ...], ...] | None = None,
    device: str = "cpu",
) -> BlockMask:
    """Cached FlexAttention BlockMask for one mode (per head only for stripes)."""
    heads = None if stripes is None else len(stripes)
    return create_block_mask(
        mask_mod_for(mode, layout, params, stripes, device),
        B=None,
        H=heads,
        Q_LEN=layout.seq_len,
        KV_LEN=layout.seq_len,
        device=device,
        BLOCK_SIZE=params.block_size,
        _compile=layout.seq_len >= _COMPILE_MASK_MIN_TOKENS,
    )


@functools.lru_cache(maxsize=64)
def dense_mask(
    mode: Mode,
    layout: VideoLayout,
    params: PatternParams,
    stripes: tuple[tuple[int, ...], ...] | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """Cached boolean ``[1 or heads, S, S]`` mask of one mode for the SDPA reference path."""
    heads = None if stripes is None else len(stripes)
    mask = create_mask(
        mask_mod_for(mode, layout, params, stripes, device), None, heads, layout.seq_len, layout.seq_len, device=device
    )
    return mask[0]


def text_blocks(layout: VideoLayout, block_size: int) -> set[int]:
    if not layout.text_len:
        return set()
    first = 0 if layout.text_first else layout.video_len
    return set(range(first // block_size, (first + layout.text_len - 1) // block_size + 1))


def stripe_sparsity(layout: VideoLayout, block_size: int, blocks: tuple[int, ...]) -> float:
    """Skipped-tile fraction of one stripe head, counted without building its mask.

    A schedule holds a column set per stripe head; building a BlockMask for each just to
    count tiles would dominate a report. Tested equal to ``BlockMask.sparsity()``.
    """
    total = num_blocks(layout, block_size)
    text = text_blocks(layout, block_size)
    kept = len(text) * total + (total - len(text)) * len(text | set(blocks))
    return 1.0 - kept / total**2


def sparsity(
    mode: Mode,
    layout: VideoLayout,
    params: PatternParams,
    stripe: tuple[int, ...] | None = None,
) -> float:
    """Fraction of ``block_size`` tiles the mode's kernel skips (S_i of the search's cost).

    ``stripe`` is the key-block set of one STRIPE head.
    """
    if mode is Mode.FULL:
        return 0.0
    if mode is Mode.SKIP:
        return 1.0
    if mode is Mode.STRIPE:
        if stripe is None:
            raise ValueError("STRIPE sparsity needs the head's key blocks (stripe=...)")
        return stripe_sparsity(layout, params.block_size, stripe)
    return tile_sparsity(block_mask(mode, layout, params))


def tile_sparsity(mask: BlockMask) -> float:
    """Fraction of tiles a BlockMask skips, counting the ragged last tile as a tile.

    ``BlockMask.sparsity()`` divides by ``(S / block)^2`` and goes negative when the sequence
    is not a multiple of the block size, which video token counts rarely are.
    """
    computed = mask.kv_num_blocks.sum() + (0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum())
    total = mask.kv_num_blocks.numel() * mask.kv_num_blocks.shape[-1]
    return 1.0 - float(computed) / total
