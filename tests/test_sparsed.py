"""SparseD's tile selection and block masks (``attention/sparsed.py``), against dense references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimserve.attention.sparsed import (
    LayerTiles,
    SparsedParams,
    block_mass,
    block_mass_full_passes,
    dense_tile_mask,
    gathered_attention,
    kept_block_rows,
    kept_blocks,
    prompt_block_count,
    select_tiles,
    sparse_attention,
    tile_block_mask,
    tile_means,
)


def _qkv(length: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=generator)
    k = torch.randn(1, kv_heads, length, dim, generator=generator)
    v = torch.randn(1, kv_heads, length, dim, generator=generator)
    return q, k, v


@pytest.mark.parametrize(("length", "prompt", "block", "rho"), [(300, 100, 32, 0.2), (256, 200, 64, 0.3),
                                                                 (97, 40, 16, 0.1)])
def test_every_query_block_keeps_its_budget_in_both_regions(length: int, prompt: int, block: int, rho: float) -> None:
    q, k, _ = _qkv(length)
    keep = select_tiles(q, k, prompt, SparsedParams(rho=rho, block=block))
    blocks = math.ceil(length / block)
    boundary = prompt_block_count(prompt, length, block)
    assert keep.shape == (1, 4, blocks, blocks)
    prompt_kept = keep[..., :boundary].sum(-1)
    generation_kept = keep[..., boundary:].sum(-1)
    assert (prompt_kept >= 1).all() and (generation_kept >= 1).all()
    assert (prompt_kept == kept_blocks(boundary, rho)).all()
    assert (generation_kept == kept_blocks(blocks - boundary, rho)).all()


def test_tile_scores_are_mean_probabilities_of_the_full_softmax() -> None:
    """Isolated selection picks the tiles an explicit avg-pool of softmax(QK^T/sqrt(d)) ranks highest (ragged tile)."""
    length, block, prompt = 90, 16, 40
    q, k, _ = _qkv(length, heads=2, kv_heads=2)
    probabilities = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    blocks = math.ceil(length / block)
    padded = F.pad(probabilities, (0, blocks * block - length, 0, blocks * block - length), value=float("nan"))
    tiles = padded.unflatten(-1, (blocks, block)).unflatten(-3, (blocks, block)).nanmean(dim=(-3, -1))
    boundary = prompt_block_count(prompt, length, block)
    rho = 0.25
    expected = torch.zeros_like(tiles, dtype=torch.bool)
    for first, last in ((0, boundary), (boundary, blocks)):
        top = tiles[..., first:last].topk(kept_blocks(last - first, rho), dim=-1).indices + first
        expected.scatter_(-1, top, True)
    assert torch.equal(select_tiles(q, k, prompt, SparsedParams(rho=rho, block=block)), expected)


def test_tile_means_over_several_sdpa_passes_equal_the_pooled_softmax() -> None:
    """More key blocks than head_dim (two indicator passes), GQA and a ragged last tile in both directions."""
    length, block = 300, 16
    q, k, _ = _qkv(length, heads=4, kv_heads=2, dim=16)
    scale = 0.3
    probabilities = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * scale, dim=-1)
    blocks = math.ceil(length / block)
    assert blocks > q.shape[-1]
    padded = F.pad(probabilities, (0, blocks * block - length, 0, blocks * block - length), value=float("nan"))
    expected = padded.unflatten(-1, (blocks, block)).unflatten(-3, (blocks, block)).nanmean(dim=(-3, -1))
    torch.testing.assert_close(tile_means(q, k, block, scale), expected, atol=1e-7, rtol=1e-5)
    # The one-pass logsumexp split (CPU) and the full passes (other devices) agree.
    torch.testing.assert_close(block_mass(q, k, block, scale), block_mass_full_passes(q, k, block, scale),
                               atol=1e-6, rtol=1e-5)


def test_gqa_query_heads_read_their_groups_key_head() -> None:
    q, k, v = _qkv(160, heads=6, kv_heads=2)
    params = SparsedParams(rho=0.2, block=32)
    keep = select_tiles(q, k, 64, params)
    for head in range(6):  # query heads 0-2 share key head 0, 3-5 key head 1 (transformers' grouping)
        alone = select_tiles(q[:, head:head + 1], k[:, head // 3:head // 3 + 1], 64, params)
        assert torch.equal(keep[:, head:head + 1], alone), head
    out = sparse_attention(q, k, v, tile_block_mask(keep, 32, 160), compiled=False)
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                               attn_mask=dense_tile_mask(keep, 32, 160))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [100, 257, 300])
def test_ragged_length_equals_dense_sdpa_with_the_same_mask(length: int) -> None:
    q, k, v = _qkv(length)
    keep = select_tiles(q, k, length // 3, SparsedParams(rho=0.3, block=64))
    mask = tile_block_mask(keep, 64, length)
    assert mask.shape[-2:] == (length, length)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_tile_mask(keep, 64, length), enable_gqa=True)
    torch.testing.assert_close(sparse_attention(q, k, v, mask, compiled=False), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("length", "heads", "kv_heads"), [(256, 4, 2), (300, 6, 2), (97, 3, 3)])
def test_gathered_kernel_equals_dense_sdpa_with_the_same_mask(length: int, heads: int, kv_heads: int) -> None:
    """The engine's default kernel: ragged last tiles (padding masked), GQA rows, chunked over heads."""
    q, k, v = _qkv(length, heads=heads, kv_heads=kv_heads)
    block = 32
    keep = select_tiles(q, k, length // 2, SparsedParams(rho=0.2, block=block))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_tile_mask(keep, block, length),
                                               enable_gqa=heads != kv_heads)
    rows = kept_block_rows(keep, kv_heads)
    for chunk_bytes in (1, 1 << 30):  # one head per chunk, then all heads at once
        out = gathered_attention(q, k, v, rows, block, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    tiles = LayerTiles.build(keep, block, length, kv_heads, dense_above=1.0)
    torch.testing.assert_close(tiles.attend(q, k, v, None), reference, atol=1e-5, rtol=1e-5)


def test_gathered_kernel_refuses_unequal_row_budgets() -> None:
    keep = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    keep[..., 0, :2] = keep[..., 1, :1] = keep[..., 2, :1] = True
    with pytest.raises(ValueError, match="same number"):
        kept_block_rows(keep, 1)


def test_the_automatic_kernel_on_cpu_is_the_gathered_one() -> None:
    q, k, _ = _qkv(200)
    keep = select_tiles(q, k, 50, SparsedParams(rho=0.2, block=32))
    tiles = LayerTiles.build(keep, 32, 200, kv_heads=2, dense_above=1.0)
    assert tiles.kernel == "gather" and isinstance(tiles.plan, torch.Tensor)


def test_rho_one_keeps_every_tile_and_falls_back_to_dense() -> None:
    q, k, _ = _qkv(200)
    keep = select_tiles(q, k, 50, SparsedParams(rho=1.0, block=32))
    assert keep.all()
    tiles = LayerTiles.build(keep, 32, 200, kv_heads=2)
    assert tiles.density == 1.0 and tiles.plan is None
    assert LayerTiles.build(keep, 32, 200, kv_heads=2, dense_above=1.5).plan is not None


def test_select_step_follows_the_reference_code() -> None:
    # T = 128, skip 0.2: steps 0..26 run dense (the mask is chosen during step 26), 101 steps sparse.
    assert SparsedParams(skip=0.2).select_step(128) == 26
    assert SparsedParams(skip=1.0).select_step(64) >= 64  # never sparse
    with pytest.raises(ValueError, match="multiple of 16"):
        SparsedParams(block=24)


@pytest.mark.slow
def test_compiled_kernel_matches_dense_sdpa_on_a_ragged_length() -> None:
    """The compiled FlexAttention kernel (full blocks, no mask_mod) on a length that is not a block multiple."""
    q, k, v = _qkv(300)
    keep = select_tiles(q, k, 100, SparsedParams(rho=0.3, block=64))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_tile_mask(keep, 64, 300), enable_gqa=True)
    with torch.no_grad():
        out = sparse_attention(q, k, v, tile_block_mask(keep, 64, 300, eager=False), compiled=True)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
