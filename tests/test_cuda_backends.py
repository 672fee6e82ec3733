"""The CUDA backends against their portable references, on the same GPU tensors.

Every test here needs a CUDA GPU and skips without one; the CPU paths these backends stand in
for are tested in test_nm_scheme.py, test_rsparse_kernel.py, test_vdit_patterns.py and
test_sparsed.py. ``bench/cuda_backends.py`` times the same paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimserve.attention.kernels import fused_attention
from slimserve.attention.patterns import Mode, PatternParams, VideoLayout
from slimserve.attention.sparsed import (
    LayerTiles,
    SparsedParams,
    dense_tile_mask,
    gathered_attention,
    kept_block_rows,
    select_tiles,
    sparse_attention,
    tile_block_mask,
)
from slimserve.loaders.schemes.nm import nm_mask, pack_nm
from slimserve.plugin.kernels.nm import NMMatmul, sparse_tensor_core_weight
from slimserve.plugin.kernels.rsparse import masked_segments, segmented_sparse_mm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pruned(rows: int, cols: int, kept: int, group: int, dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    return (weight * nm_mask(weight, kept, group)).to(dtype).to(device)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def test_cpu_weights_never_go_to_the_tensor_cores() -> None:
    """The one rule the portable build relies on: off CUDA the scheme's own tensors stay."""
    tensors = pack_nm(_pruned(64, 128, 2, 4, torch.bfloat16, "cpu"), 2, 4)
    assert sparse_tensor_core_weight(tensors["values"], tensors["positions"], 128, 2, 4) is None
    runner = NMMatmul(tensors["values"], tensors["positions"], 2, 4)
    assert runner.tensor_cores is None and runner.values is not None


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_24_weights_run_on_the_sparse_tensor_cores(dtype: torch.dtype) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("sparse tensor cores need compute capability 8.0 or later")
    weight = _pruned(256, 512, 2, 4, dtype)
    tensors = pack_nm(weight, 2, 4)
    runner = NMMatmul(tensors["values"], tensors["positions"], 2, 4)
    assert isinstance(runner.tensor_cores, torch.sparse.SparseSemiStructuredTensor)
    assert runner.values is None and runner.positions is None  # one copy of the weight, not two
    for tokens in (1, 7, 64, 300):
        x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
        got = runner(x)
        assert got.dtype == dtype and got.shape == (tokens, 256)
        assert _relative_error(got, x.float() @ weight.float().t()) < 1e-2


@cuda
@pytest.mark.parametrize(("rows", "cols", "kept", "group", "dtype"), [
    (256, 512, 4, 8, torch.bfloat16),  # not 2:4
    (256, 512, 2, 4, torch.float32),  # the tensor cores' sparse path is fp16/bf16 (and int8)
    (40, 128, 2, 4, torch.bfloat16),  # rows not a multiple of the kernels' tile
])
def test_weights_the_tensor_cores_refuse_take_the_reference_path(rows: int, cols: int, kept: int, group: int,
                                                                 dtype: torch.dtype) -> None:
    weight = _pruned(rows, cols, kept, group, dtype)
    tensors = pack_nm(weight, kept, group)
    runner = NMMatmul(tensors["values"], tensors["positions"], kept, group)
    assert runner.tensor_cores is None
    for tokens in (1, 40):
        x = torch.randn(tokens, cols, device="cuda", dtype=dtype)
        assert _relative_error(runner(x), x.float() @ weight.float().t()) < 1e-2


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_rsparse_triton_kernel_equals_the_masked_product(dtype: torch.dtype, tokens: int) -> None:
    """Two segments (gate | up) sharing x, with the rest ``x ⊙ (1 − m)`` the low-rank part reads."""
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 256, generator=generator).to(dtype).cuda()
    weight_t = torch.randn(256, 384, generator=generator).to(dtype).cuda()
    splits = [128, 256]
    norms = torch.stack([w.float().norm(dim=1) for w in weight_t.split(splits, dim=1)])
    thresholds = [float((x.float().abs() * n).median()) for n in norms]  # about half the channels active
    y, rest = segmented_sparse_mm(x, weight_t, norms, thresholds, splits, with_rest=True)
    expected_y, expected_rest = masked_segments(x, weight_t, norms, thresholds, splits, with_rest=True)
    assert y.dtype == dtype and y.is_cuda
    # From 16 tokens triton contracts the fp32 product into a TF32 tensor-core dot (measured 7.6e-4 on an H200).
    assert _relative_error(y, expected_y) < (2e-3 if dtype == torch.float32 else 1e-2)
    assert torch.equal(rest, expected_rest)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vdit_patterns_through_compiled_flex_on_the_gpu_equal_sdpa(dtype: torch.dtype) -> None:
    layout = VideoLayout(4, 256, text_len=32, text_first=True)
    params = PatternParams.for_layout(layout, block_size=128)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, layout.seq_len, 64, generator=generator).to(dtype).cuda() for _ in range(3))
    modes = [Mode.DIAGONAL, Mode.MULTI_DIAGONAL, Mode.STRIPE]
    stripes = {2: (1, 4)}
    fast = fused_attention(q, k, v, modes, layout, params, stripes, backend="flex")
    slow = fused_attention(q, k, v, modes, layout, params, stripes, backend="sdpa")
    assert _relative_error(fast, slow) < (1e-5 if dtype == torch.float32 else 1e-2)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsed_kernels_on_the_gpu_equal_dense_sdpa_with_the_same_mask(dtype: torch.dtype) -> None:
    length, block = 1000, 64  # a ragged last tile
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, length, 64, generator=generator).to(dtype).cuda()
    k, v = (torch.randn(1, 2, length, 64, generator=generator).to(dtype).cuda() for _ in range(2))
    keep = select_tiles(q, k, length // 2, SparsedParams(rho=0.3, block=block))
    assert keep.is_cuda
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_tile_mask(keep, block, length),
                                               enable_gqa=True)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        flex = sparse_attention(q, k, v, tile_block_mask(keep, block, length, eager=False), compiled=True)
        gathered = gathered_attention(q, k, v, kept_block_rows(keep, 2), block)
    assert _relative_error(flex, reference) < tolerance
    assert _relative_error(gathered, reference) < tolerance
    tiles = LayerTiles.build(keep, block, length, kv_heads=2, dense_above=1.0)
    assert tiles.kernel == "flex"  # the automatic choice on CUDA
    assert _relative_error(tiles.attend(q, k, v, None), reference) < tolerance
