"""Sparse-vDiT pattern math: masks, kernels and head fusion against dense SDPA references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from slimserve.attention.kernels import fused_attention, mode_attention
from slimserve.attention.patterns import (
    Mode,
    PatternParams,
    VideoLayout,
    block_mask,
    dense_mask,
    diagonal_mask_mod,
    multi_diagonal_mask_mod,
    sparsity,
    stripe_sparsity,
    tile_sparsity,
)
from slimserve.attention.search import choose_modes

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LAYOUTS = {
    "video-only": VideoLayout(4, 24),
    "text-first": VideoLayout(4, 24, text_len=10, text_first=True),
    "text-last": VideoLayout(3, 32, text_len=7, text_first=False),
}
STRIPES = ((0, 3, 5), (1, 2, 4))


def qkv(layout: VideoLayout, heads: int = 2, batch: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.seq_len, dim, generator=g) for _ in range(3)]


def reference(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Dense SDPA with an explicit boolean mask broadcast over batch (and heads)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def explicit_mask(mode: Mode, layout: VideoLayout, params: PatternParams) -> torch.Tensor:
    """Each mode's pattern written directly in the model's frame-major order."""
    mod = {
        Mode.DIAGONAL: diagonal_mask_mod(layout, params.diagonal_window),
        Mode.MULTI_DIAGONAL: multi_diagonal_mask_mod(layout, params.multi_diagonal_window),
    }[mode]
    return create_mask(mod, None, None, layout.seq_len, layout.seq_len, device="cpu")[0, 0]


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("mode", [Mode.DIAGONAL, Mode.MULTI_DIAGONAL])
@pytest.mark.parametrize("backend", ["flex_eager", "sdpa"])
def test_modes_match_explicit_masks(name, mode, backend):
    """DIAGONAL and the permuted band (MULTI_DIAGONAL) equal SDPA with the explicit mask."""
    layout = LAYOUTS[name]
    params = PatternParams.for_layout(layout, block_size=16)
    q, k, v = qkv(layout)
    out = mode_attention(q, k, v, mode, layout, params, backend=backend)
    expected = reference(q, k, v, explicit_mask(mode, layout, params))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-3)  # it is sparse


@pytest.mark.parametrize("name", LAYOUTS)
def test_permuted_band_is_the_multi_diagonal_mask(name):
    """Permuting the explicit multi-diagonal mask to token-major order gives the kernel's band."""
    layout = LAYOUTS[name]
    params = PatternParams.for_layout(layout, block_size=16)
    index = layout.token_major_index()
    explicit = explicit_mask(Mode.MULTI_DIAGONAL, layout, params)
    band = dense_mask(Mode.MULTI_DIAGONAL, layout, params)[0]
    assert torch.equal(explicit[index][:, index], band)
    # Why the permutation exists: in frame-major order no tile of the pattern is empty.
    naive = torch.nn.attention.flex_attention.create_block_mask(
        multi_diagonal_mask_mod(layout, params.multi_diagonal_window), None, None, layout.seq_len, layout.seq_len,
        device="cpu", BLOCK_SIZE=16,
    )
    assert tile_sparsity(naive) == 0.0 < sparsity(Mode.MULTI_DIAGONAL, layout, params)


@pytest.mark.parametrize("name", LAYOUTS)
def test_stripes_match_mask_and_keep_text(name):
    layout = LAYOUTS[name]
    params = PatternParams.for_layout(layout, block_size=16)
    q, k, v = qkv(layout)
    out = mode_attention(q, k, v, Mode.STRIPE, layout, params, STRIPES, backend="flex_eager")
    is_text, _ = layout.split(torch.arange(layout.seq_len))
    for head, blocks in enumerate(STRIPES):
        kv_block = torch.arange(layout.seq_len) // 16
        cols = is_text | torch.isin(kv_block, torch.tensor(blocks))
        mask = cols[None, :] | is_text[:, None]
        expected = reference(q[:, head], k[:, head], v[:, head], mask)
        torch.testing.assert_close(out[:, head], expected, atol=2e-6, rtol=1e-5)
        # Tile counting without a mask equals FlexAttention's own count.
        assert stripe_sparsity(layout, 16, blocks) == pytest.approx(
            tile_sparsity(block_mask(Mode.STRIPE, layout, params, (blocks,)))
        )


def test_padded_keys_are_ignored():
    """HunyuanVideo pads trailing text keys; every mode must ignore them."""
    layout = LAYOUTS["text-last"]
    params = PatternParams.for_layout(layout, block_size=16)
    q, k, v = qkv(layout)
    key_valid = torch.tensor([layout.seq_len - 3, layout.seq_len - 5])
    real = torch.arange(layout.seq_len) < key_valid[:, None]
    for mode in (Mode.FULL, Mode.DIAGONAL, Mode.MULTI_DIAGONAL):
        out = mode_attention(q, k, v, mode, layout, params, backend="flex_eager", key_valid=key_valid)
        pattern = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
        if mode is not Mode.FULL:
            pattern = explicit_mask(mode, layout, params)
        expected = reference(q, k, v, pattern[None, None] & real[:, None, None, :])
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_head_fusion_equals_per_head():
    """Gather/compute/scatter equals computing each head alone; SKIP is exactly zero."""
    layout = LAYOUTS["text-first"]
    params = PatternParams.for_layout(layout, block_size=16)
    modes = [Mode.STRIPE, Mode.DIAGONAL, Mode.SKIP, Mode.MULTI_DIAGONAL, Mode.FULL, Mode.DIAGONAL, Mode.STRIPE]
    stripes = {0: (0, 3), 6: (2, 5, 6)}
    q, k, v = qkv(layout, heads=len(modes))
    fused = fused_attention(q, k, v, modes, layout, params, stripes, backend="flex_eager")
    for h, mode in enumerate(modes):
        cols = (stripes[h],) if mode is Mode.STRIPE else None
        head = slice(h, h + 1)
        one = mode_attention(q[:, head], k[:, head], v[:, head], mode, layout, params, cols, "flex_eager")
        torch.testing.assert_close(fused[:, h : h + 1], one, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(fused[:, 2]) == 0
    dense_head = F.scaled_dot_product_attention(q[:, 4], k[:, 4], v[:, 4])
    torch.testing.assert_close(fused[:, 4], dense_head, atol=1e-6, rtol=0)


def test_compiled_flex_matches_sdpa_reference():
    """The fast path: compiled FlexAttention on CPU equals the SDPA reference for every mask mode."""
    layout = VideoLayout(4, 64, text_len=16, text_first=True)
    params = PatternParams.for_layout(layout, block_size=32)
    q, k, v = qkv(layout, heads=3, batch=1, dim=16)
    modes = [Mode.DIAGONAL, Mode.MULTI_DIAGONAL, Mode.STRIPE]
    stripes = {2: (1, 4)}
    fast = fused_attention(q, k, v, modes, layout, params, stripes, backend="flex")
    slow = fused_attention(q, k, v, modes, layout, params, stripes, backend="sdpa")
    torch.testing.assert_close(fast, slow, atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("importlib").util.find_spec("xformers") is None,
    reason="xformers runs on CUDA only",
)
def test_xformers_block_diagonal_matches_sdpa():
    layout = VideoLayout(4, 64)
    params = PatternParams(block_size=64, diagonal_window=64, multi_diagonal_window=0)
    q, k, v = (x.cuda().half() for x in qkv(layout, dim=64))
    for mode in (Mode.DIAGONAL, Mode.MULTI_DIAGONAL):
        fast = mode_attention(q, k, v, mode, layout, params, backend="xformers")
        slow = mode_attention(q, k, v, mode, layout, params, backend="sdpa")
        torch.testing.assert_close(fast, slow, atol=2e-3, rtol=2e-3)


def test_search_cost_and_threshold():
    """eps=0 keeps every head FULL; otherwise each head takes argmin of MSE + lam * (1 - S)."""
    layout = LAYOUTS["text-first"]
    params = PatternParams.for_layout(layout, block_size=16)
    q, k, v = qkv(layout, heads=4)
    dense = choose_modes(q, k, v, layout, params, lam=0.5, eps=0.0, backend="flex_eager")
    assert dense.modes == [Mode.FULL] * 4
    torch.testing.assert_close(dense.output, F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)

    lam = 0.01
    chosen = choose_modes(q, k, v, layout, params, lam=lam, eps=10.0, backend="flex_eager")
    full = F.scaled_dot_product_attention(q, k, v)
    for h, mode in enumerate(chosen.modes):
        assert mode is not Mode.FULL
        cols = (chosen.stripes[h],) if mode is Mode.STRIPE else None
        one = slice(h, h + 1)
        expected = mode_attention(q[:, one], k[:, one], v[:, one], mode, layout, params, cols, "flex_eager")
        torch.testing.assert_close(chosen.output[:, one], expected, atol=1e-6, rtol=1e-6)
        # Recompute the winner's cost independently and check no mode beats it.
        mse = (chosen.output[:, h] - full[:, h]).square().mean().item()
        s = sparsity(mode, layout, params, chosen.stripes.get(h))
        assert mse + lam * (1 - s) == pytest.approx(chosen.losses[h].min().item(), rel=1e-5)
