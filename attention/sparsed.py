"""SparseD: head-specific block-sparse attention for bidirectional diffusion LMs.

A diffusion LM runs its whole sequence through the model at every denoising step, and its
heads attend in patterns that barely change from step to step (SparseD, Wang et al. 2025,
§3). So the tiles worth computing are chosen once per request, per layer and per query head,
from one full-attention step, and reused by every later step:

1. Steps ``0 .. select_step`` run full attention; ``select_step = floor(T * skip) + 1``, as in
   the authors' code, so ``skip >= 1`` never goes sparse.
2. At ``select_step``, :func:`select_tiles` scores each ``(query block, key block)`` tile by
   its mean softmax probability (fp32, one query block at a time, so memory stays
   ``O(block * length)`` per head) and keeps the top ``floor(n * rho) + 1`` key blocks among the
   prompt's blocks and, separately, among the generation's blocks ("isolated selection"):
   generation tokens get little attention early on and a joint ranking would starve them.
   A block straddling the prompt/generation boundary counts as prompt (see ``prompt_block_count``).
3. :func:`tile_block_mask` turns the kept tiles into a FlexAttention ``BlockMask`` directly from
   their KV-block indices (``create_block_mask`` evaluates a ``mask_mod`` over every position and
   costs seconds cold); :func:`sparse_attention` runs it.

Grouped-query attention is handled by selecting per *query* head with each key head shared by
its group, and running FlexAttention with ``enable_gqa``. A length that is not a multiple of the
block size leaves a ragged last tile; scores average over the tile's real entries and the
``mask_mod`` only ever indexes blocks that exist.

Plain PyTorch: imports neither vLLM nor ``slimserve.server``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# FlexAttention's tiles must be a multiple of 16 rows on every backend (CPU included).
BLOCK_MULTIPLE = 16
# Above this kept-tile fraction a layer runs unmasked SDPA instead: the block-sparse kernel no
# longer wins (crossover measured by bench/sparsed.py, see bench/README.md), and full attention is
# what the sparse run approximates, so nothing is lost.
DENSE_ABOVE_DENSITY = 0.3


@dataclass(frozen=True)
class SparsedParams:
    """The three knobs of SparseD, with the paper's long-context defaults."""

    skip: float = 0.2
    rho: float = 0.3
    block: int = 128

    def __post_init__(self) -> None:
        if not self.skip >= 0:
            raise ValueError(f"SparseD skip must be >= 0, got {self.skip}")
        if not self.rho > 0:
            raise ValueError(f"SparseD rho must be > 0, got {self.rho}")
        if self.block < BLOCK_MULTIPLE or self.block % BLOCK_MULTIPLE:
            raise ValueError(f"SparseD block must be a positive multiple of {BLOCK_MULTIPLE}, got {self.block}")

    def select_step(self, total_steps: int) -> int:
        """The (0-based, global) denoising step whose Q and K choose the tiles; later steps are sparse."""
        return math.floor(total_steps * self.skip) + 1


def kept_blocks(num_blocks: int, rho: float) -> int:
    """Key blocks one region keeps per query block: ``floor(n * rho) + 1``, at most ``n``."""
    return min(num_blocks, math.floor(num_blocks * rho) + 1)


def prompt_block_count(prompt_length: int, length: int, block: int) -> int:
    """Key blocks that count as prompt: every block that starts inside the prompt.

    A block straddling the boundary counts as prompt (as in the authors' code), unless the
    generation fits inside it: then it counts as generation, so generation keys keep a block.
    """
    num_blocks = -(-length // block)
    straddled = -(-prompt_length // block)
    return min(straddled, num_blocks - 1) if length > prompt_length else num_blocks


def _tile_means(probabilities: torch.Tensor, block: int, num_blocks: int) -> torch.Tensor:
    """Mean probability per key block of ``[B, H, rows, L]`` fp32 rows (ragged last block included)."""
    length = probabilities.shape[-1]
    padded = F.pad(probabilities, (0, num_blocks * block - length))
    sums = padded.unflatten(-1, (num_blocks, block)).sum(dim=(-3, -1))  # [B, H, num_blocks]
    widths = torch.full((num_blocks,), float(block), device=probabilities.device)
    widths[-1] = length - (num_blocks - 1) * block
    return sums / (widths * probabilities.shape[-2])


def _top_columns(scores: torch.Tensor, first: int, last: int, rho: float) -> torch.Tensor:
    """Boolean ``[..., num_blocks]`` of the top-scored columns within ``[first, last)``."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if last <= first:
        return keep
    region = scores[..., first:last]
    top = region.topk(kept_blocks(last - first, rho), dim=-1).indices + first
    return keep.scatter_(-1, top, True)


@torch.no_grad()
def select_tiles(query: torch.Tensor, key: torch.Tensor, prompt_length: int, params: SparsedParams,
                 scale: float | None = None) -> torch.Tensor:
    """Kept tiles ``[B, H_q, nb, nb]`` (bool) from one step's post-RoPE queries and keys.

    ``query`` is ``[B, H_q, L, D]``, ``key`` ``[B, H_kv, L, D]`` with ``H_q`` a multiple of
    ``H_kv`` (query head ``h`` reads key head ``h // (H_q / H_kv)``, as transformers and SDPA's
    ``enable_gqa`` group them). ``scale`` is the model's softmax scale, ``1/sqrt(D)`` by default:
    SparseD's LLaDA code ranks at ``1/sqrt(heads)``, which looks like a slip, so the model's own
    temperature is used for every architecture.
    """
    batch, heads, length, dim = query.shape
    if heads % key.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({key.shape[1]})")
    group = heads // key.shape[1]
    keys = key.float().repeat_interleave(group, dim=1) if group > 1 else key.float()
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    block = params.block
    num_blocks = -(-length // block)
    boundary = prompt_block_count(prompt_length, length, block)
    keep = torch.empty(batch, heads, num_blocks, num_blocks, dtype=torch.bool, device=query.device)
    for row in range(num_blocks):
        rows = query[:, :, row * block:(row + 1) * block].float()
        probabilities = torch.softmax(rows @ keys.transpose(-1, -2) * scale, dim=-1)
        scores = _tile_means(probabilities, block, num_blocks)
        keep[:, :, row] = (_top_columns(scores, 0, boundary, params.rho)
                           | _top_columns(scores, boundary, num_blocks, params.rho))
    return keep


def tile_density(keep: torch.Tensor) -> float:
    """Fraction of tiles kept (the attention FLOPs a block-sparse kernel spends, ragged tile as a tile)."""
    return float(keep.float().mean())


def tile_block_mask(keep: torch.Tensor, block: int, length: int, eager: bool = True) -> BlockMask:
    """A FlexAttention ``BlockMask`` of ``keep``'s tiles, built from their KV-block indices.

    The compiled kernel needs no ``mask_mod``: a tile is all kept or all skipped, so ``eager=False``
    leaves the default (keep everything inside a listed block). torch 2.13's CPU template fails
    to build both a ``mask_mod`` that reads a captured tensor and "full" blocks, so the tiles are
    listed as ordinary blocks. FlexAttention's
    eager path and ``create_mask`` evaluate only the ``mask_mod``, so ``eager=True`` gives them the
    same tiles at token resolution: ``keep[..., q // block, kv // block]``, which exists for every
    padded position too.
    """
    counts = keep.sum(-1, dtype=torch.int32)
    # Kept block indices first, in ascending order; entries past a row's count are ignored.
    order = torch.argsort(keep.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return keep[b, h, q_idx // block, kv_idx // block]

    return BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=block, mask_mod=mask_mod if eager else None,
                                    seq_lengths=(length, length))


def dense_tile_mask(keep: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """``keep`` at token resolution, ``[B, H, L, L]``: the reference mask for SDPA."""
    return keep.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :length, :length]


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)`` once per process, with static shapes.

    Each new sequence length compiles anew (about a minute on 2 CPU cores, seconds on a GPU):
    torch 2.13's CPU FlexAttention template does not build with dynamic shapes. The compile
    cache keeps up to ``cache_size_limit`` lengths.
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask,
                     scale: float | None = None, compiled: bool = True) -> torch.Tensor:
    """Block-sparse attention over ``mask``'s tiles (GQA through ``enable_gqa``).

    ``compiled=False`` runs FlexAttention's eager path, which materializes the scores: for tests
    and small shapes, where compiling would dominate. The mask must be built for the same path
    (:func:`tile_block_mask`'s ``eager``).
    """
    kernel = compiled_flex_attention() if compiled else flex_attention
    return kernel(query, key, value, block_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


@dataclass
class LayerTiles:
    """One layer's choice for the rest of a request: its tiles, their density and the built mask."""

    keep: torch.Tensor
    density: float
    mask: BlockMask | None  # None: the density is too high for the sparse kernel to win

    @classmethod
    def build(cls, keep: torch.Tensor, block: int, length: int, dense_above: float = DENSE_ABOVE_DENSITY,
              compiled: bool = True) -> LayerTiles:
        density = tile_density(keep)
        mask = None if density > dense_above else tile_block_mask(keep, block, length, eager=not compiled)
        return cls(keep, density, mask)
