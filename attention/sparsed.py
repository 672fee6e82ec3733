"""SparseD: head-specific block-sparse attention for bidirectional diffusion LMs.

A diffusion LM runs its whole sequence through the model at every denoising step, and its
heads attend in patterns that barely change from step to step (SparseD, Wang et al. 2025,
§3). So the tiles worth computing are chosen once per request, per layer and per query head,
from one full-attention step, and reused by every later step:

1. Steps ``0 .. select_step`` run full attention; ``select_step = floor(T * skip) + 1``, as in
   the authors' code, so ``skip >= 1`` never goes sparse.
2. At ``select_step``, :func:`select_tiles` scores each ``(query block, key block)`` tile by
   its mean softmax probability (fp32, as one SDPA pass against one-hot block indicators, so
   it costs about one dense attention call and never holds ``[L, L]`` scores) and keeps the
   top ``floor(n * rho) + 1`` key blocks among the prompt's blocks and, separately, among the
   generation's blocks ("isolated selection"):
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

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from slimserve.attention.kernels import compiled_flex_attention, flex_kernel_options

# FlexAttention's tiles must be a multiple of 16 rows on every backend (CPU included).
BLOCK_MULTIPLE = 16
# Above this kept-tile fraction a layer runs unmasked SDPA instead: the gathered kernel no longer
# wins. Measured by bench/sparsed.py (bench/README.md) on 2 loaded Xeon cores: a density sweep puts
# the crossover between 40 % (1.12x) and 50 % kept at 4k and 8k tokens, but SparseD's own tiles at
# 31 % kept gave only 1.11x at 8k and 0.91-1.20x at 12k, so the threshold keeps that margin. Full
# attention is what the sparse run approximates, so nothing is lost.
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


def _block_indicator(length: int, block: int, device: torch.device, width: int) -> torch.Tensor:
    """``[length, width]`` fp32 one-hot: key ``c`` has a 1 in column ``c // block`` (later columns stay 0)."""
    indicator = torch.zeros(length, width, device=device)
    keys = torch.arange(length, device=device)
    indicator[keys, keys // block] = 1.0
    return indicator


def block_mass_full_passes(query: torch.Tensor, key: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """``[B, H_q, L, nb]``: each query row's softmax probability summed over each key block's keys.

    ``softmax(QK^T * scale) @ V`` with ``V`` the one-hot block indicator of each key is exactly that,
    so it costs one fused SDPA pass and never materializes ``[L, L]`` probabilities. SDPA kernels
    are only fast when the value width equals the query's (``head_dim``), so each pass covers
    ``head_dim`` blocks; more blocks take more passes over all keys (see :func:`block_mass`).
    """
    batch, heads, length, dim = query.shape
    num_blocks = -(-length // block)
    indicator = _block_indicator(length, block, query.device, num_blocks)
    masses = []
    for first in range(0, num_blocks, dim):
        columns = indicator[:, first:first + dim]
        values = F.pad(columns, (0, dim - columns.shape[1])).expand(batch, key.shape[1], length, dim).contiguous()
        mass = F.scaled_dot_product_attention(query, key, values, scale=scale, enable_gqa=heads != key.shape[1])
        masses.append(mass[..., :columns.shape[1]])
    return torch.cat(masses, dim=-1)


def block_mass(query: torch.Tensor, key: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """:func:`block_mass_full_passes` in one pass over the keys for any number of blocks (CPU).

    The keys are split into groups of ``head_dim`` blocks: each group's SDPA returns its mass
    normalized within the group plus the group's logsumexp, and rescaling by
    ``exp(lse_group - lse_all)`` restores the full softmax. Only the private CPU flash op returns
    the logsumexp, so other devices (and block counts that fit one pass) take the full passes.
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    num_blocks = -(-length // block)
    if num_blocks <= dim or query.device.type != "cpu":
        return block_mass_full_passes(query, key, block, scale)
    # The private op has no GQA: a key head's query heads are stacked along the sequence
    # (bidirectional rows attend independently, so this is the same attention).
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    masses, lses = [], []
    for first in range(0, num_blocks, dim):
        group_keys = key[:, :, first * block:(first + dim) * block].contiguous()
        values = _block_indicator(group_keys.shape[2], block, query.device, dim)
        values = values.expand(batch, kv_heads, group_keys.shape[2], dim).contiguous()
        mass, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            grouped, group_keys, values, 0.0, False, attn_mask=None, scale=scale)
        masses.append(mass[..., :-(-group_keys.shape[2] // block)])
        lses.append(lse)
    lse_all = torch.logsumexp(torch.stack(lses), dim=0)
    mass = torch.cat([m * torch.exp(lse - lse_all).unsqueeze(-1) for m, lse in zip(masses, lses, strict=True)], -1)
    return mass.reshape(batch, heads, length, num_blocks)


def tile_means(query: torch.Tensor, key: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Mean softmax probability of every ``(query block, key block)`` tile, ``[B, H_q, nb, nb]`` fp32.

    SparseD's ``avgpool(softmax(QK^T * scale), block)``, computed in fp32 for about the cost of one
    dense attention pass (:func:`block_mass`), then summed over each query block's rows and divided
    by the tile's real size (ragged last tiles included).
    """
    length = query.shape[2]
    num_blocks = -(-length // block)
    row_mass = block_mass(query.float(), key.float(), block, scale)
    tiles = F.pad(row_mass, (0, 0, 0, num_blocks * block - length)).unflatten(-2, (num_blocks, block)).sum(-2)
    widths = torch.full((num_blocks,), float(block), device=query.device)
    widths[-1] = length - (num_blocks - 1) * block
    return tiles / (widths[:, None] * widths[None, :])


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
    heads, dim = query.shape[1], query.shape[-1]
    if heads % key.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({key.shape[1]})")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = tile_means(query, key, params.block, scale)
    num_blocks = scores.shape[-1]
    boundary = prompt_block_count(prompt_length, query.shape[2], params.block)
    return (_top_columns(scores, 0, boundary, params.rho)
            | _top_columns(scores, boundary, num_blocks, params.rho))


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


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask,
                     scale: float | None = None, compiled: bool = True) -> torch.Tensor:
    """FlexAttention over ``mask``'s tiles (GQA through ``enable_gqa``); the alternative to :func:`gathered_attention`.

    ``compiled=False`` runs FlexAttention's eager path, which materializes the scores: for tests
    and small shapes, where compiling would dominate. The mask must be built for the same path
    (:func:`tile_block_mask`'s ``eager``).
    """
    kernel = compiled_flex_attention() if compiled else flex_attention
    return kernel(query, key, value, block_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1],
                  kernel_options=flex_kernel_options(mask, query))


def kept_block_rows(keep: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H_q, nb, kept]`` row numbers into keys laid out ``[B * H_kv * nb, block * D]``.

    Every query block keeps the same number of key blocks (one budget per region, see
    :func:`select_tiles`), which is what lets :func:`gathered_attention` batch them as one SDPA.
    """
    batch, heads, num_blocks, _ = keep.shape
    counts = keep.sum(-1)
    kept = int(counts.flatten()[0])
    if not bool((counts == kept).all()):
        raise ValueError("gathered attention needs the same number of kept key blocks in every query block")
    order = torch.argsort(keep.to(torch.int8), dim=-1, descending=True, stable=True)[..., :kept]
    key_head = torch.arange(heads, device=keep.device) // (heads // kv_heads)
    base = (torch.arange(batch, device=keep.device)[:, None] * kv_heads + key_head[None, :]) * num_blocks
    return base[:, :, None, None] + order


def gathered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor,
                       block: int, scale: float | None = None, chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Block-sparse attention as dense SDPA over each query block's gathered key/value blocks.

    ``rows`` comes from :func:`kept_block_rows`. For every (head, query block) the kept key and
    value blocks are copied side by side (``index_select`` of whole ``block * D`` rows) and the
    query block attends to them with the fused SDPA kernel, all (head, query block) pairs as one
    batch. Nothing is compiled, so a new sequence length costs nothing extra (FlexAttention on
    CPU compiles per length). A ragged last key block is padded; a key-validity mask broadcast
    over the query rows hides the padding. Heads are processed in chunks of about
    ``chunk_bytes`` of gathered keys and values.
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    num_blocks, kept = rows.shape[-2], rows.shape[-1]
    padding = num_blocks * block - length
    if padding:
        query, key, value = (F.pad(t, (0, 0, 0, padding)) for t in (query, key, value))
    query = query.reshape(batch, heads, num_blocks, block, dim)
    key_rows = key.reshape(batch * kv_heads * num_blocks, block * dim)
    value_rows = value.reshape(batch * kv_heads * num_blocks, block * dim)
    valid = None
    if padding:
        valid = torch.ones(batch * kv_heads * num_blocks, block, dtype=torch.bool, device=query.device)
        valid.view(batch, kv_heads, num_blocks, block)[:, :, -1, block - padding:] = False
    per_head = num_blocks * kept * block * dim * key.element_size() * 2
    step = max(1, chunk_bytes // per_head)
    outputs = []
    for first in range(0, heads, step):
        chunk = rows[:, first:first + step]
        pairs = chunk.shape[1] * num_blocks
        flat = chunk.reshape(-1)
        keys = key_rows.index_select(0, flat).view(batch, pairs, kept * block, dim)
        values = value_rows.index_select(0, flat).view(batch, pairs, kept * block, dim)
        mask = None if valid is None else valid.index_select(0, flat).view(batch, pairs, 1, kept * block)
        queries = query[:, first:first + step].reshape(batch, pairs, block, dim)
        # reshape, not view: CUDA's SDPA kernels may return another memory layout than CPU's.
        outputs.append(F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
                       .reshape(batch, chunk.shape[1], num_blocks * block, dim))
    output = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    return output[:, :, :length] if padding else output


SparseKernel = Literal["auto", "gather", "flex", "flex_eager"]


@dataclass
class LayerTiles:
    """One layer's choice for the rest of a request: its tiles, their density and what the kernel needs.

    ``kernel`` picks the block-sparse implementation: ``"gather"`` (:func:`gathered_attention`,
    the fastest on CPU and never compiled), ``"flex"`` (compiled FlexAttention) or
    ``"flex_eager"`` (FlexAttention's eager path, for small shapes). All three compute the same
    masked attention. ``"auto"`` (the default) takes ``"flex"`` on CUDA, where it measured about
    twice as fast as the gathered kernel (``bench/cuda_backends.py``), and ``"gather"`` elsewhere.
    """

    keep: torch.Tensor
    density: float
    block: int
    kernel: SparseKernel
    plan: torch.Tensor | BlockMask | None  # None: the density is too high for a sparse kernel to win

    @classmethod
    def build(cls, keep: torch.Tensor, block: int, length: int, kv_heads: int,
              dense_above: float = DENSE_ABOVE_DENSITY, kernel: SparseKernel = "auto") -> LayerTiles:
        if kernel == "auto":
            kernel = "flex" if keep.is_cuda else "gather"
        density = tile_density(keep)
        plan: torch.Tensor | BlockMask | None = None
        if density <= dense_above:
            plan = (kept_block_rows(keep, kv_heads) if kernel == "gather"
                    else tile_block_mask(keep, block, length, eager=kernel == "flex_eager"))
        return cls(keep, density, block, kernel, plan)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor | None:
        """The layer's block-sparse attention ``[B, H, L, D]``, or None where dense SDPA should run."""
        if self.plan is None:
            return None
        if isinstance(self.plan, BlockMask):
            return sparse_attention(query, key, value, self.plan, scale, compiled=self.kernel == "flex")
        return gathered_attention(query, key, value, self.plan, self.block, scale)
