"""The ``nm`` scheme (N:M semi-structured sparsity): packing, reference forward, validation, CPU kernel per ISA."""

from __future__ import annotations

import pytest
import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.nm import nm_mask, pack_nm, pack_positions, unpack_positions
from slimserve.plugin.kernels import nm as nm_kernel

SCHEME = SCHEMES["nm"]
PATTERNS = [(2, 4), (4, 8), (1, 4)]


def _pruned(out: int, in_features: int, kept: int, group: int, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(out, in_features, generator=torch.Generator().manual_seed(seed))
    return weight * nm_mask(weight, kept, group)


def _spec(out: int, in_features: int, kept: int, group: int) -> dict:
    return {"scheme": "nm", "out_features": out, "in_features": in_features, "kept": kept, "group": group}


@pytest.mark.parametrize(("kept", "group"), PATTERNS)
def test_pack_round_trips_and_the_reference_equals_the_dense_product(kept: int, group: int) -> None:
    weight = _pruned(6, 5 * group, kept, group)
    spec = _spec(6, 5 * group, kept, group)
    tensors = pack_nm(weight, kept, group)
    assert [tuple(t.shape) for t in tensors.values()] == [t.shape for t in SCHEME.tensor_specs(spec)]
    assert tensors["positions"].dtype == torch.uint8
    assert torch.equal(SCHEME.reconstruct(spec, tensors), weight)
    x = torch.randn(3, 5 * group)
    torch.testing.assert_close(SCHEME.forward(spec, tensors, x), x @ weight.t())


def test_2of4_costs_four_bits_a_group_packed_least_significant_first() -> None:
    # Row 0 keeps offsets (1, 3) in group 0 and (0, 2) in group 1: bits 01 11 00 10 from bit 0 up.
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]])
    tensors = pack_nm(weight, 2, 4)
    assert tensors["values"].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert tensors["positions"].tolist() == [[0b10_00_11_01]]
    assert SCHEME.stored_bytes(_spec(64, 128, 2, 4), float_bytes=2) == 64 * (64 * 2 + 16)


def test_mask_keeps_the_largest_magnitudes_and_breaks_ties_towards_lower_offsets() -> None:
    weight = torch.tensor([[1.0, -5.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0]])
    assert nm_mask(weight, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]


def test_underfull_groups_pad_with_explicit_zeros_at_the_lowest_unused_offsets() -> None:
    weight = torch.tensor([[0.0, 0.0, 7.0, 0.0]])
    tensors = pack_nm(weight, 2, 4)
    assert tensors["values"].tolist() == [[0.0, 7.0]]
    assert unpack_positions(tensors["positions"], 4, 2, 4).tolist() == [[0, 2]]


def test_pack_names_the_first_row_and_group_breaking_the_pattern() -> None:
    weight = _pruned(4, 16, 2, 4)
    weight[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(CheckpointError, match=r"row 2, group 2 \(inputs 8\.\.11\) has 3 nonzeros") as err:
        pack_nm(weight, 2, 4, module="model.layers.0.mlp.up_proj")
    assert err.value.tensor == "model.layers.0.mlp.up_proj"


def test_validate_names_the_first_bad_group_and_the_fields() -> None:
    spec = _spec(4, 16, 2, 4)
    tensors = pack_nm(_pruned(4, 16, 2, 4), 2, 4)
    offsets = unpack_positions(tensors["positions"], 16, 2, 4)
    offsets[3, 4:6] = torch.tensor([2, 2])  # row 3, group 2: a repeated offset
    tensors["positions"] = pack_positions(offsets, 4)
    with pytest.raises(CheckpointError, match=r"row 3, group 2 .* offsets \[2, 2\]") as err:
        SCHEME.check_values("m", spec, tensors, {"positions": "model.safetensors"})
    assert err.value.tensor == "m.positions"
    with pytest.raises(CheckpointError, match="not a multiple of group=4"):
        SCHEME.check_fields("m", _spec(4, 18, 2, 4), "config.json")
    with pytest.raises(CheckpointError, match="kept <= group"):
        SCHEME.check_fields("m", _spec(4, 16, 5, 4), "config.json")


def test_non_power_of_two_groups_reject_offsets_past_the_group() -> None:
    spec = _spec(2, 12, 1, 3)
    tensors = pack_nm(_pruned(2, 12, 1, 3), 1, 3)
    offsets = unpack_positions(tensors["positions"], 12, 1, 3)
    offsets[1, 3] = 3  # 2 bits can hold 3, but a group of 3 has offsets 0..2
    tensors["positions"] = pack_positions(offsets, 3)
    with pytest.raises(CheckpointError, match="row 1, group 3"):
        SCHEME.check_values("m", spec, tensors, {"positions": "f"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kept", "group"), PATTERNS)
@pytest.mark.parametrize("tokens", [1, 3, 8, 11])
def test_kernel_equals_the_reference_per_isa(isa: str, kept: int, group: int, tokens: int,
                                             dtype: torch.dtype) -> None:
    # 37 rows and 232 inputs: not multiples of the vector widths, so every tail runs.
    out, in_features = 37, 232 if group == 4 else 240
    weight = _pruned(out, in_features, kept, group, seed=tokens).to(dtype)
    tensors = pack_nm(weight, kept, group)
    kernel = nm_kernel._cpu_kernel()
    assert kernel is not None and kernel.isa() == isa
    x = torch.randn(tokens, in_features).to(dtype)
    expected = x.float() @ weight.float().t()
    got = kernel.nm_matmul(x, tensors["values"], tensors["positions"], kept, group)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kept", "group", "in_features"),
                         [(2, 4, 1032), (4, 8, 1032), (2, 4, 6160), (2, 4, 1028), (1, 4, 1032)])
@pytest.mark.parametrize("tokens", [1, 2, 4, 9])
def test_long_rows_in_batches_equal_the_reference(isa: str, kept: int, group: int, in_features: int, tokens: int,
                                                  dtype: torch.dtype) -> None:
    # AVX2 expands rows in chunks of 24 KiB of x: 6144 inputs at one token, 3072 at two, 1536 at four, 768 for a
    # block of 8, so 6160 inputs are 2-9 chunks and 1032 one or two, each ending in offsets bytes short of a group of
    # 8; up to 4 tokens the inputs alternate between accumulator sets. 1028 is not a multiple of 8, which that loop
    # needs, so those rows take the permute path; 1:4 rows of 1032 inputs are 16 permute blocks of 64 inputs (AVX2:
    # 32 of 32) and a tail of 8.
    weight = _pruned(21, in_features, kept, group, seed=tokens).to(dtype)
    tensors = pack_nm(weight, kept, group)
    kernel = nm_kernel._cpu_kernel()
    assert kernel is not None and kernel.isa() == isa
    x = torch.randn(tokens, in_features).to(dtype)
    got = kernel.nm_matmul(x, tensors["values"], tensors["positions"], kept, group)
    torch.testing.assert_close(got, x.float() @ weight.float().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kept", "group"), PATTERNS)
def test_many_tokens_by_decompressed_strips_equal_the_reference(isa: str, kept: int, group: int,
                                                                dtype: torch.dtype) -> None:
    # 300 rows of over 16 KiB even in bf16: a whole strip (at most 4 MiB, at least 256 rows) and a partial one;
    # 8196 inputs: 2:4 rows end in a lone group (half a byte)
    in_features = 8196 if group == 4 else 8200
    weight = _pruned(300, in_features, kept, group, seed=group).to(dtype)
    tensors = pack_nm(weight, kept, group)
    kernel = nm_kernel._cpu_kernel()
    assert kernel is not None and kernel.isa() == isa
    x = torch.randn(20, in_features).to(dtype)
    got = kernel.nm_matmul_strips(x, tensors["values"], tensors["positions"], kept, group)
    assert got.dtype == dtype and got.shape == (20, 300)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), x.float() @ weight.float().t(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kept", "group", "in_features"), [(2, 4, 1028), (4, 8, 1032), (1, 4, 1028)])
@pytest.mark.parametrize("tokens", [17, 47, 70, 96])
def test_many_tokens_on_the_kept_weights_only_equal_the_reference(isa: str, kept: int, group: int, in_features: int,
                                                                  tokens: int, dtype: torch.dtype) -> None:
    # 301 rows: two blocks of 128 and a part ending in an unpaired row; over 128 kept values a row: several chunks;
    # 1028 inputs: 2:4 rows end in a lone group; tokens: a part panel of 48 alone (3 and 6 vectors), after a whole one,
    # and whole panels only.
    weight = _pruned(301, in_features, kept, group, seed=tokens).to(dtype)
    tensors = pack_nm(weight, kept, group)
    kernel = nm_kernel._cpu_kernel()
    assert kernel is not None and kernel.isa() == isa
    if isa == "scalar":
        assert not hasattr(kernel, "nm_matmul_kept")  # the loop is AVX2 + FMA; scalar builds keep the strips
        return
    x = torch.randn(tokens, in_features).to(dtype)
    got = kernel.nm_matmul_kept(x, tensors["values"], tensors["positions"], kept, group)
    assert got.dtype == dtype and got.shape == (tokens, 301)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), x.float() @ weight.float().t(), rtol=tolerance, atol=tolerance)


def test_the_op_switches_to_a_dense_gemm_above_the_crossover_with_the_same_result() -> None:
    weight = _pruned(40, 128, 2, 4)
    tensors = pack_nm(weight, 2, 4)
    runner = nm_kernel.NMMatmul(tensors["values"], tensors["positions"], 2, 4)
    for tokens in (nm_kernel.MANY_TOKENS, nm_kernel.MANY_TOKENS + 1):
        x = torch.randn(tokens, 128)
        torch.testing.assert_close(runner(x), x @ weight.t(), rtol=1e-4, atol=1e-4)


def test_avx2_many_tokens_take_the_kept_weights_at_every_count(kernel_entries) -> None:
    """On AVX2 hosts every many-token step multiplies only the kept weights: a short step and a prefill of whole
    48-token panels plus a part one (the strips other builds take are tested against the reference above)."""
    real = nm_kernel._cpu_kernel()
    if real is None or real.isa() != "avx2":
        pytest.skip("the kept-weights road is the AVX2 build's")
    called = kernel_entries(nm_kernel, "_cpu_kernel")
    weight = _pruned(40, 128, 2, 4)
    tensors = pack_nm(weight, 2, 4)
    runner = nm_kernel.NMMatmul(tensors["values"], tensors["positions"], 2, 4)
    for tokens in (nm_kernel.MANY_TOKENS + 1, 1000):
        x = torch.randn(tokens, 128)
        torch.testing.assert_close(runner(x), x @ weight.t(), rtol=1e-4, atol=1e-4)
    assert "nm_matmul_kept" in called and "nm_matmul_strips" not in called


#: One rounding of an fp32 sum to bf16 (8 significant bits): what the tile unit's bf16 output may differ by.
BF16_ROUNDING = 2 ** -8


def test_zen4_2_4_prefills_leave_the_gathered_loop_for_the_strips(monkeypatch: pytest.MonkeyPatch,
                                                                   kernel_entries) -> None:
    """Where 2:4 bf16 batches take the gathered loop (AVX512_BF16 + VBMI, no tile unit), batches from
    GATHERED_BELOW_TOKENS tokens decompress strips instead; both roads give the product."""
    real = nm_kernel._cpu_kernel()
    if real is None or not real.gathered_usable(128, 2, 4) or real.amx_usable(128, 2, 4):
        pytest.skip("the gathered loop serves 2:4 batches only on CPUs with AVX512_BF16 and VBMI and no tile unit")
    called = kernel_entries(nm_kernel, "_cpu_kernel")
    weight = _pruned(40, 128, 2, 4).to(torch.bfloat16)
    tensors = pack_nm(weight, 2, 4)
    runner = nm_kernel.NMMatmul(tensors["values"], tensors["positions"], 2, 4)
    x = torch.randn(nm_kernel.DOT_UP_TO_TOKENS + 8, 128).to(torch.bfloat16)  # past the dot loop's batches too
    expected = x.float() @ weight.float().t()
    monkeypatch.setattr(nm_kernel, "GATHERED_BELOW_TOKENS", x.shape[0] + 1)
    torch.testing.assert_close(runner(x).float(), expected, rtol=BF16_ROUNDING, atol=1e-2)
    assert "nm_matmul" in called and "nm_matmul_strips" not in called
    called.clear()
    monkeypatch.setattr(nm_kernel, "GATHERED_BELOW_TOKENS", x.shape[0])
    torch.testing.assert_close(runner(x).float(), expected, rtol=BF16_ROUNDING, atol=1e-2)
    assert "nm_matmul_strips" in called and "nm_matmul" not in called


def _amx_kernel(in_features: int, kept: int, group: int):
    kernel = nm_kernel._cpu_kernel()
    if kernel is None or not kernel.amx_usable(in_features, kept, group):
        pytest.skip("this CPU (or kernel build) has no AMX tile unit")
    return kernel


@pytest.mark.parametrize(("kept", "group"), [(2, 4), (4, 8)])
@pytest.mark.parametrize("tokens", [3, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("in_features", [96, 1120])
def test_bf16_batches_on_the_amx_tile_unit_equal_the_reference(kept: int, group: int, tokens: int,
                                                                in_features: int) -> None:
    # 37 rows: two whole strips of 16 and a partial one; 96 inputs: three tile depths of 32, less than one expanded
    # chunk of 8; 1120 inputs: four whole chunks and one of 3 depths; 3 and 5 tokens: a lone tile narrower than 16;
    # 17 and 40 tokens: a partial second and third token tile; 64: four whole tiles, the most kept in tile registers.
    kernel = _amx_kernel(in_features, kept, group)
    weight = _pruned(37, in_features, kept, group, seed=tokens).to(torch.bfloat16)
    tensors = pack_nm(weight, kept, group)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    got = kernel.nm_matmul(x, tensors["values"], tensors["positions"], kept, group)
    assert got.dtype == torch.bfloat16  # rounded once from the tile unit's fp32 sums
    torch.testing.assert_close(got.float(), x.float() @ weight.float().t(), rtol=BF16_ROUNDING, atol=1e-3)


def test_many_bf16_tokens_on_the_tile_unit_carry_sums_across_input_chunks() -> None:
    # Past four token tiles the tile unit walks the inputs in chunks of 512 and reloads each chunk's sums: 1120
    # inputs are chunks of 512, 512 and 96; 70 tokens are five token tiles, the last partial; 37 rows end in a
    # partial strip.
    kernel = _amx_kernel(1120, 2, 4)
    weight = _pruned(37, 1120, 2, 4, seed=3).to(torch.bfloat16)
    tensors = pack_nm(weight, 2, 4)
    x = torch.randn(70, 1120, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = kernel.nm_matmul(x, tensors["values"], tensors["positions"], 2, 4)
    torch.testing.assert_close(got.float(), x.float() @ weight.float().t(), rtol=BF16_ROUNDING, atol=1e-3)


@pytest.mark.parametrize(("kept", "group"), [(2, 4), (4, 8)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 13, 32])
@pytest.mark.parametrize("inputs", [96, 352])
def test_bf16_batches_on_the_dot_product_loop_equal_the_reference(kept: int, group: int, tokens: int,
                                                                  inputs: int) -> None:
    # 37 rows: a lone last row; 96 inputs: three spans of 32, 352: eleven (2:4 decodes masks 8 spans at a time, then
    # one by one); 2, 3 tokens: a block of 4, whole and partial; 5, 13 tokens: partial blocks of 8.
    kernel = nm_kernel._cpu_kernel()
    if kernel is None or not kernel.dot_usable(96, kept, group):
        pytest.skip("this CPU (or kernel build) has no AVX512_BF16 + VBMI2")
    assert not kernel.dot_usable(80, kept, group)  # inputs must fill whole spans of 32
    weight = _pruned(37, inputs, kept, group, seed=tokens).to(torch.bfloat16)
    tensors = pack_nm(weight, kept, group)
    x = torch.randn(tokens, inputs, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    expected = x.float() @ weight.float().t()
    got = kernel.nm_matmul_dot(x, tensors["values"], tensors["positions"], kept, group)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if not kernel.amx_usable(96, kept, group):  # where the tile unit takes batches, its own test covers nm_matmul
        torch.testing.assert_close(kernel.nm_matmul(x, tensors["values"], tensors["positions"], kept, group), expected,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 2, 4, 5, 13, 40])
@pytest.mark.parametrize(("rows", "inputs"), [(37, 128), (130, 320)])
def test_bf16_2_4_batches_on_the_gathered_loop_equal_the_reference(tokens: int, rows: int, inputs: int) -> None:
    # 37 rows: one group of 64 with quarters of 10 (slots past it repeat a row); 130: three groups, the last of 2 rows;
    # 5, 13, 40 tokens: partial blocks of 4; 320 inputs: five chunks of 64.
    kernel = nm_kernel._cpu_kernel()
    if kernel is None or not kernel.gathered_usable(128, 2, 4):
        pytest.skip("this CPU (or kernel build) has no AVX512_BF16 + VBMI")
    assert not kernel.gathered_usable(96, 2, 4) and not kernel.gathered_usable(128, 4, 8)
    weight = _pruned(rows, inputs, 2, 4, seed=tokens).to(torch.bfloat16)
    tensors = pack_nm(weight, 2, 4)
    x = torch.randn(tokens, inputs, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    expected = x.float() @ weight.float().t()
    got = kernel.nm_matmul_gathered(x, tensors["values"], tensors["positions"], 2, 4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if not kernel.amx_usable(inputs, 2, 4):  # the operator's road for every bf16 count here
        op = nm_kernel.NMMatmul(tensors["values"], tensors["positions"], 2, 4)(x)
        torch.testing.assert_close(op.float(), expected, rtol=BF16_ROUNDING, atol=1e-2)


def test_many_bf16_tokens_stay_on_the_tile_unit_and_others_decompress(monkeypatch: pytest.MonkeyPatch) -> None:
    _amx_kernel(128, 2, 4)
    weight = _pruned(40, 128, 2, 4).to(torch.bfloat16)
    tensors = pack_nm(weight, 2, 4)
    decompressed: list[torch.dtype] = []
    original = nm_kernel.many_tokens_product

    def spy(x: torch.Tensor, values: torch.Tensor, *args: int) -> torch.Tensor:
        decompressed.append(values.dtype)
        return original(x, values, *args)

    monkeypatch.setattr(nm_kernel, "many_tokens_product", spy)
    x = torch.randn(nm_kernel.MANY_TOKENS + 24, 128)
    bf16 = nm_kernel.NMMatmul(tensors["values"], tensors["positions"], 2, 4)(x.to(torch.bfloat16))
    torch.testing.assert_close(bf16.float(), (x.to(torch.bfloat16).float() @ weight.float().t()), rtol=1e-2, atol=1e-2)
    assert decompressed == []
    fp32 = nm_kernel.NMMatmul(tensors["values"].float(), tensors["positions"], 2, 4)(x)
    torch.testing.assert_close(fp32, x @ weight.float().t(), rtol=1e-4, atol=1e-4)
    assert decompressed == [torch.float32]


def test_shards_of_a_fused_layer_run_as_one_nm_product() -> None:
    """q/k/v (or gate/up) of one pattern stack into one N:M weight; another pattern runs shard by shard."""
    from slimserve.plugin.vllm.shards import NMShard

    shards, specs = [], []
    for seed, out in enumerate((64, 32, 32)):
        shards.append(pack_nm(_pruned(out, 96, 2, 4, seed=seed), 2, 4))
        specs.append(_spec(out, 96, 2, 4))
    whole = NMShard.layer(shards, specs)
    assert whole is not None and whole.out_features == 128
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(5))
    expected = torch.cat([NMShard(t, spec).second(x) for t, spec in zip(shards, specs)], dim=1)
    torch.testing.assert_close(whole.second(x), expected)
    other = pack_nm(_pruned(32, 96, 4, 8), 4, 8)
    assert NMShard.layer([shards[0], other], [specs[0], _spec(32, 96, 4, 8)]) is None
