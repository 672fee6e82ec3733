"""``lowrank_sparse`` (W ≈ U·V + S): scheme, OATS producer, B/A/S converter, and real vLLM serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimserve.errors import CheckpointError, CompressionError
from slimserve.loaders.checkpoint import compression_summary, densify, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.budget import Budget
from slimserve.loaders.compress.oats import Oats, alternate, oats_sizes
from slimserve.loaders.compress.run import compress
from slimserve.loaders.compress.whitening import SvdLlm, Whitening
from slimserve.loaders.converters import convert_lowrank_sparse
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.lowrank_sparse import decode_sparse, encode_sparse, sparse_encoding, sparse_product
from slimserve.plugin.kernels.bitmask import DENSE_FROM_TOKENS, BitmaskMatmul
from slimserve.plugin.kernels.cpp import loop_isa
from slimserve.plugin.kernels.lowrank_sparse import LowRankSparseFolded, LowRankSparsePanels, fold_low_rank
from slimserve.plugin.kernels.precision import NARROWING_ISAS
from slimserve.plugin.vllm.lowrank_sparse import LowRankSparseShard, local_sparse
from slimserve.server.cli import main

SCHEME = SCHEMES["lowrank_sparse"]


def _layer_with_outliers(out: int = 96, inn: int = 80, rank: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, rank, generator=g) @ torch.randn(rank, inn, generator=g) / rank**0.5
    outliers = (torch.rand(out, inn, generator=g) < 0.04) * torch.randn(out, inn, generator=g) * 8
    return weight + outliers + 0.01 * torch.randn(out, inn, generator=g)


def _module(out: int, inn: int, rank: int, nnz: int, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.randn(out, inn, generator=g) * (torch.rand(out, inn, generator=g) < nnz / inn)
    tensors = {"u": torch.randn(out, rank, generator=g), "v": torch.randn(rank, inn, generator=g),
               **encode_sparse(sparse, nnz)}
    spec = {"scheme": "lowrank_sparse", "in_features": inn, "out_features": out, "rank": rank, "nnz": nnz,
            "encoding": sparse_encoding(out, inn, nnz)}
    return spec, tensors


# (in, nnz): ELL with uint8 columns, ELL with int16 columns, and a bitmask (at 25 % density a row's mask, in/8
# bytes, is smaller than its int16 columns)
@pytest.mark.parametrize(("inn", "nnz", "positions"), [(200, 17, "s_indices"), (300, 17, "s_indices"),
                                                       (300, 75, "s_mask")])
def test_reference_forward_equals_densified_product_in_each_encoding(inn: int, nnz: int, positions: str) -> None:
    spec, tensors = _module(48, inn, 5, nnz)
    assert set(tensors) == {"u", "v", "s_values", positions}
    assert spec["encoding"] == ("bitmask" if positions == "s_mask" else "ell")
    x = torch.randn(7, inn)
    dense = SCHEME.reconstruct(spec, tensors)
    torch.testing.assert_close(SCHEME.forward(spec, tensors, x), x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert dense.shape == (48, inn)
    expected_dtype = torch.uint8 if positions == "s_mask" or inn <= 256 else torch.int16
    assert tensors[positions].dtype == expected_dtype
    stored = SCHEME.stored_bytes(spec, 4)
    other = "ell" if spec["encoding"] == "bitmask" else "bitmask"
    assert stored < SCHEME.stored_bytes({**spec, "encoding": other}, 4)  # the writer's pick is the smaller one


def test_oats_beats_plain_svd_at_equal_bytes_on_outliers() -> None:
    weight = _layer_with_outliers()
    budget = Budget("bytes", 2)
    identity = Whitening(None, weight.shape[1])
    oats, _ = Oats(weight, identity, None, budget).at_ratio(0.5)
    svd, _ = SvdLlm(weight, identity, budget).at_ratio(0.5)
    allowed = budget.allowed(*weight.shape, 0.5)
    assert oats.scheme == "lowrank_sparse" and svd.scheme == "lowrank"
    assert oats.stored_bytes(2) <= allowed and svd.stored_bytes(2) <= allowed
    oats_error = float((weight - oats.reconstruct()).norm() / weight.norm())
    svd_error = float((weight - svd.reconstruct()).norm() / weight.norm())
    assert oats_error < 0.6 * svd_error, (oats_error, svd_error)


def test_oats_alternation_never_increases_the_error_and_sizes_fill_the_budget() -> None:
    weight = _layer_with_outliers(seed=1)
    history: list[float] = []
    alternate(weight / weight.norm(), rank=4, nnz=9, iterations=12, history=history)
    assert all(later <= earlier + 1e-5 for earlier, later in zip(history, history[1:]))
    assert history[-1] < history[0]
    budget = Budget("bytes", 2)
    rank, nnz = oats_sizes(1536, 576, 0.3, budget)
    spec = {"in_features": 576, "out_features": 1536, "rank": rank, "nnz": nnz,
            "encoding": sparse_encoding(1536, 576, nnz)}
    limit = budget.allowed(1536, 576, 0.3)
    assert budget.cost("lowrank_sparse", spec) <= limit < budget.cost("lowrank_sparse", {**spec, "nnz": nnz + 1})
    # the factors get the 30 % share of the allowance (the paper's rank ratio)
    assert abs(rank * (1536 + 576) * 2 / limit - 0.3) < 0.01


def test_compress_oats_writes_a_valid_checkpoint_within_budget(narrow_llama: Path, text_file: Path,
                                                               tmp_path: Path) -> None:
    out = compress(narrow_llama, tmp_path / "oats", method="oats", ratio=0.4, calib=text_file,
                   calib_samples=8, calib_seq_len=64, progress=False)
    ckpt = validate_checkpoint(out)
    assert {spec["scheme"] for spec in ckpt.modules.values()} == {"lowrank_sparse"}
    summary = compression_summary(out)
    assert 0.4 <= summary["bytes_ratio"] < 0.45
    dense = open_checkpoint(narrow_llama)
    module = "model.layers.0.mlp.down_proj"
    weight = dense.tensor(f"{module}.weight").float()
    error = float((ckpt.reconstruct(module) - weight).norm() / weight.norm())
    assert 0.0 < error < 1.0


def test_compress_oats_rank_share_moves_bytes_from_s_to_the_factors(narrow_llama: Path, text_file: Path,
                                                                    tmp_path: Path) -> None:
    settings = {"method": "oats", "ratio": 0.4, "calib": text_file, "calib_cache": tmp_path / "grams.safetensors",
                "calib_samples": 8, "calib_seq_len": 64, "progress": False}
    default = validate_checkpoint(compress(narrow_llama, tmp_path / "default", **settings))
    ranked = validate_checkpoint(compress(narrow_llama, tmp_path / "ranked", rank_share=0.6, **settings))
    for module, spec in ranked.modules.items():
        before = default.modules[module]
        assert spec["rank"] > before["rank"] and spec["nnz"] < before["nnz"], (module, spec, before)
    assert 0.4 <= compression_summary(tmp_path / "ranked")["bytes_ratio"] < 0.45
    producer = json.loads((tmp_path / "ranked" / "config.json").read_text())["quantization_config"]["producer"]
    assert producer["rank_share"] == 0.6


@pytest.mark.parametrize(("method", "share", "expected"), [("svd", 0.5, "--method svd has no such split"),
                                                           ("oats", 1.0, "strictly between 0 and 1"),
                                                           ("oats", 0.0, "strictly between 0 and 1")])
def test_rank_share_is_refused_off_oats_or_out_of_range(narrow_llama: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], method: str, share: float,
                                                        expected: str) -> None:
    with pytest.raises(CompressionError, match=expected):
        compress(narrow_llama, tmp_path / "out", method=method, ratio=0.3, rank_share=share, progress=False)
    argv = ["compress", str(narrow_llama), str(tmp_path / "cli"), "--method", method, "--ratio", "0.3",
            "--rank-share", str(share)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "field '--rank-share'" in err and expected in err
    assert not (tmp_path / "cli").exists()


def _factor_state(base: Path, modules: list[str], sltrain: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """B/A/S factors for ``modules`` of ``base`` with ragged sparse rows, and the weights they stand for."""
    ckpt = open_checkpoint(base)
    g = torch.Generator().manual_seed(3)
    state, expected = {}, {}
    for module in modules:
        out, inn = ckpt.tensors[f"{module}.weight"].shape
        b, a = torch.randn(out, 4, generator=g), torch.randn(4, inn, generator=g)
        mask = torch.rand(out, inn, generator=g) < torch.linspace(0.01, 0.2, out)[:, None]  # ragged rows
        s = torch.randn(out, inn, generator=g) * mask
        if sltrain:
            index = s.flatten().nonzero().squeeze(1)
            state |= {f"wrapped.{module}.lora_B": b, f"wrapped.{module}.lora_A": a,
                      f"wrapped.{module}.sparse_index": index, f"wrapped.{module}.sparse_value": s.flatten()[index]}
            expected[module] = (b @ a * 2.0 + s, s)  # lora_alpha / r = 8 / 4
        else:
            state |= {f"{module}.B": b, f"{module}.A": a, f"{module}.S": s}
            expected[module] = (b @ a + s, s)
    return state, expected


@pytest.mark.parametrize("sltrain", [False, True])
def test_converter_round_trip(tiny_llama: Path, tmp_path: Path, sltrain: bool) -> None:
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    state, expected = _factor_state(tiny_llama, modules, sltrain)
    src = tmp_path / "src"
    src.mkdir()
    if sltrain:
        torch.save(state, src / "pytorch_model.bin")
        (src / "splora_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    else:
        save_file(state, str(src / "model.safetensors"))
    out = convert_lowrank_sparse(src, tmp_path / "slim", base=tiny_llama)
    ckpt, dense = validate_checkpoint(out), open_checkpoint(tiny_llama)
    for module, (weight, sparse) in expected.items():
        spec = ckpt.modules[module]
        assert spec["scheme"] == "lowrank_sparse" and spec["rank"] == 4
        assert spec["nnz"] == int(sparse.ne(0).sum(dim=1).max())
        torch.testing.assert_close(ckpt.reconstruct(module), weight, rtol=1e-5, atol=1e-5)
    other = "model.layers.0.mlp.up_proj"
    assert ckpt.modules[other]["scheme"] == "dense"
    assert torch.equal(ckpt.reconstruct(other), dense.tensor(f"{other}.weight").float())
    assert ckpt.quantization_config["producer"]["s_padding"] > 1.0  # ragged rows were padded


def test_converter_names_what_it_cannot_read(tiny_llama: Path, tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.q_proj"
    state, _ = _factor_state(tiny_llama, [module])
    save_file({**state, f"{module}.lora_C": state[f"{module}.A"].clone()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_C"):
        convert_lowrank_sparse(tmp_path / "odd.safetensors", tmp_path / "a", base=tiny_llama)
    save_file({k: v for k, v in state.items() if not k.endswith(".S")}, str(tmp_path / "no_s.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj\.S"):
        convert_lowrank_sparse(tmp_path / "no_s.safetensors", tmp_path / "b", base=tiny_llama)
    sltrain = {f"{module}.lora_A": state[f"{module}.A"], f"{module}.lora_B": state[f"{module}.B"],
               f"{module}.S": state[f"{module}.S"]}
    save_file(sltrain, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="splora_config.json"):
        convert_lowrank_sparse(tmp_path / "lora.safetensors", tmp_path / "c", base=tiny_llama)


def test_validate_names_bad_sparse_columns(tiny_llama: Path, tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.q_proj"
    state, _ = _factor_state(tiny_llama, [module])
    dense_s = state[f"{module}.S"]
    state[f"{module}.S"] = dense_s * (torch.rand(dense_s.shape, generator=torch.Generator().manual_seed(1)) < 0.25)
    save_file(state, str(tmp_path / "f.safetensors"))  # S at <= 5 % density: stored ELL
    out = convert_lowrank_sparse(tmp_path / "f.safetensors", tmp_path / "slim", base=tiny_llama)
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(str(shard))
    indices = tensors[f"{module}.s_indices"]
    indices[3, :2] = indices[3, :2].flip(0)  # unsorted row 3
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj\.s_indices.*row 3 has repeated or unsorted columns"):
        validate_checkpoint(out)


def test_validate_names_a_bad_sparse_mask(tiny_llama: Path, tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.q_proj"
    state, _ = _factor_state(tiny_llama, [module])
    dense_s = state[f"{module}.S"]
    state[f"{module}.S"] = dense_s + (torch.rand(dense_s.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
    save_file(state, str(tmp_path / "f.safetensors"))  # S at ~40 % density: stored as a bitmask
    out = convert_lowrank_sparse(tmp_path / "f.safetensors", tmp_path / "slim", base=tiny_llama)
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(str(shard))
    mask = tensors[f"{module}.s_mask"]
    mask[3, 0] ^= 1  # row 3 gains or loses one stored column
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj\.s_mask.*row 3 has \d+ bits set"):
        validate_checkpoint(out)


def test_row_parallel_slice_matches_the_column_range() -> None:
    spec, tensors = _module(40, 300, 3, 30)
    dense = SCHEME.reconstruct(spec, tensors)
    for rank in range(2):
        local = local_sparse(tensors, 300, rank * 150, 150)
        x = torch.randn(5, 150)
        torch.testing.assert_close(sparse_product(x, local, 150), x @ (dense - tensors["u"] @ tensors["v"])
                                   [:, rank * 150:(rank + 1) * 150].t(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "ratio", "rank_zero"), [("oats", 0.3, False), ("sparsegpt", 0.5, True)])
def test_vllm_serves_checkpoint_like_its_densified_export(tiny_llama: Path, text_file: Path, tmp_path: Path,
                                                          method: str, ratio: float, rank_zero: bool) -> None:
    """OATS (U·V + S) and a row-sparse pruned checkpoint (rank 0: S alone), compiled TP 1 and eager TP 2
    (row-parallel S re-sliced per rank): greedy == the densified export's."""
    from slimserve.testing.vllm import hf_greedy, vllm_greedy

    prompts = ["The quick brown fox", "Return a new list of", "import json"]
    ckpt = compress(tiny_llama, tmp_path / method, method=method, ratio=ratio, calib=text_file,
                    calib_samples=8, calib_seq_len=160, progress=False)
    assert all((spec["rank"] == 0) == rank_zero for spec in open_checkpoint(ckpt).modules.values())
    reference = hf_greedy(densify(ckpt, tmp_path / "dense"), prompts)
    assert hf_greedy(tiny_llama, prompts) != reference  # the compression changed the model
    assert vllm_greedy(ckpt, prompts, enforce_eager=False) == reference
    assert vllm_greedy(ckpt, prompts, tp=2) == reference


@pytest.mark.slow
def test_vllm_serves_bf16_factors_through_the_one_operator_layer(tiny_llama: Path, text_file: Path,
                                                                 tmp_path: Path) -> None:
    """U, V and S's values that are bf16 numbers (as a bf16 checkpoint served as float32 has them): on AVX2 hosts the
    factors are kept as bf16 panels and each layer is one ``lowrank_sparse_panels`` call (compiled mode traces it
    through its fake); greedy == the densified export's."""
    from slimserve.testing.vllm import hf_greedy, vllm_greedy

    ckpt = compress(tiny_llama, tmp_path / "oats", method="oats", ratio=0.3, calib=text_file, calib_samples=8,
                    calib_seq_len=160, progress=False)
    for file in ckpt.glob("*.safetensors"):  # the values rounded to bf16 numbers, still float32 tensors
        tensors = load_file(file)
        save_file({name: t.bfloat16().float() if name.endswith((".u", ".v", ".s_values")) else t
                   for name, t in tensors.items()}, file, metadata={"format": "pt"})
    prompts = ["The quick brown fox", "import json"]
    reference = hf_greedy(densify(ckpt, tmp_path / "dense"), prompts)
    assert vllm_greedy(ckpt, prompts, enforce_eager=False) == reference


@pytest.mark.slow
def test_vllm_serves_a_bf16_checkpoint_in_bf16_like_its_densified_export(tmp_path: Path, text_file: Path) -> None:
    """A bf16 OATS checkpoint served as bf16, compiled at TP 1 and eager at TP 2 (row-parallel S re-sliced per rank;
    on hosts with the bitmask kernel's bf16 dot loop U folded into S's rows, ``LowRankSparseFolded``): every greedy
    token's log-probability within bf16's rounding of what the float32 densified export gives that token after the
    same prefix."""
    from slimserve.testing.models import build_tiny_causal_lm
    from slimserve.testing.vllm import bf16_logprob_gaps

    dense = build_tiny_causal_lm(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    ckpt = compress(dense, tmp_path / "oats", method="oats", ratio=0.3, calib=text_file, calib_samples=8,
                    calib_seq_len=160, progress=False)
    assert {spec["encoding"] for spec in open_checkpoint(ckpt).modules.values()} == {"bitmask"}
    exported = densify(ckpt, tmp_path / "dense")
    gaps = bf16_logprob_gaps(ckpt, exported, ["The quick brown fox", "import json"])
    assert max(gaps.values()) < 0.1, gaps


def test_rank_zero_shards_of_a_fused_layer_run_as_one_sparse_product() -> None:
    """q/k/v (or gate/up) pruned row-sparse at one nnz stack into one S; anything else runs shard by shard."""
    generator = torch.Generator().manual_seed(0)
    inn, nnz = 96, 60
    shards, specs = [], []
    for out in (64, 32, 32):
        weight = torch.randn(out, inn, generator=generator)
        kept = weight * (weight.abs() >= weight.abs().topk(nnz, dim=1).values[:, -1:])
        shards.append({"u": torch.zeros(out, 0), "v": torch.zeros(0, inn), **encode_sparse(kept, nnz)})
        specs.append({"in_features": inn, "out_features": out, "rank": 0, "nnz": nnz,
                      "encoding": sparse_encoding(out, inn, nnz)})
    whole = LowRankSparseShard.layer(shards, specs)
    assert whole is not None and whole.out_features == 128
    x = torch.randn(3, inn, generator=generator)
    expected = torch.cat([LowRankSparseShard(t, spec).second(x) for t, spec in zip(shards, specs)], dim=1)
    torch.testing.assert_close(whole.second(x), expected)
    # a mix of rank 0 and low-rank shards, or another nnz, keeps the per-shard runners
    assert LowRankSparseShard.layer(shards, [specs[0], {**specs[1], "rank": 2}, specs[2]]) is None
    assert LowRankSparseShard.layer(shards, [specs[0], {**specs[1], "nnz": nnz - 1}, specs[2]]) is None


def _qkv_shards(generator: torch.Generator, inn: int, nnz: int,
                bf16_numbers: bool) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """q/k/v shards of different ranks and one nnz; ``bf16_numbers``: every value a bf16 number (a bf16 checkpoint)."""
    cast = (lambda t: t.bfloat16().float()) if bf16_numbers else (lambda t: t)
    shards, specs = [], []
    for out, rank in ((64, 6), (32, 3), (32, 5)):
        sparse = torch.randn(out, inn, generator=generator)
        sparse = sparse * (sparse.abs() >= sparse.abs().topk(nnz, dim=1).values[:, -1:])
        shards.append({"u": cast(torch.randn(out, rank, generator=generator)),
                       "v": cast(torch.randn(rank, inn, generator=generator)), **encode_sparse(cast(sparse), nnz)})
        specs.append({"in_features": inn, "out_features": out, "rank": rank, "nnz": nnz,
                      "encoding": sparse_encoding(out, inn, nnz)})
    return shards, specs


def test_low_rank_shards_of_a_fused_layer_stack_v_and_s_and_keep_each_u() -> None:
    """q/k/v of different ranks: one GEMM over the stacked V, each U on its own slice, one stacked S."""
    generator = torch.Generator().manual_seed(1)
    inn = 96
    shards, specs = _qkv_shards(generator, inn, 40, bf16_numbers=False)
    whole = LowRankSparseShard.layer(shards, specs)
    assert whole is not None and whole.out_features == 128 and whole.ranks == [6, 3, 5]
    x = torch.randn(3, inn, generator=generator)
    expected = torch.cat([LowRankSparseShard(t, spec).second(x) for t, spec in zip(shards, specs)], dim=1)
    torch.testing.assert_close(whole.second(x), expected)


def test_factors_kept_as_bf16_panels_run_the_layer_as_one_operator() -> None:
    """A bf16 checkpoint's factors on a host that serves float32 (AVX2) are bf16 panels; the layer then makes one
    ``lowrank_sparse_panels`` call, equal to its three products summed."""
    generator = torch.Generator().manual_seed(2)
    inn = 96
    shards, specs = _qkv_shards(generator, inn, 40, bf16_numbers=True)
    whole = LowRankSparseShard.layer(shards, specs)
    assert whole is not None
    assert isinstance(whole.second, LowRankSparsePanels) == (loop_isa() in NARROWING_ISAS)
    x = torch.randn(5, inn, generator=generator)
    torch.testing.assert_close(whole.second(x), whole.forward(x))
    torch.testing.assert_close(whole.second(x).double(), _qkv_reference(shards, x, inn), rtol=1e-4, atol=1e-3)


def _qkv_reference(shards: list[dict[str, torch.Tensor]], x: torch.Tensor, inn: int) -> torch.Tensor:
    """The stacked shards' ``(x Vᵀ) Uᵀ + x Sᵀ`` in float64."""
    expected = torch.cat([t["u"].double() @ (t["v"].double() @ x.double().t()) for t in shards]).t()
    return expected + x.double() @ torch.cat([decode_sparse(t, inn).double() for t in shards]).t()


@pytest.mark.parametrize("tokens", [1, 8, DENSE_FROM_TOKENS - 1, DENSE_FROM_TOKENS, 300])
def test_u_folded_into_s_rows_gives_the_layer_at_every_token_count(tokens: int) -> None:
    """q/k/v of ranks 6, 3, 5 folded into one bitmask layout: few tokens as x Vᵀ and one product of ``[x | x Vᵀ]`` in
    one kernel call, many as S's strips on the rows' leading part plus each U on its view; both equal the three
    products summed."""
    generator = torch.Generator().manual_seed(3)
    inn = 96
    shards, _ = _qkv_shards(generator, inn, 40, bf16_numbers=True)
    shards = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()} for t in shards]
    sparse = BitmaskMatmul(torch.cat([t["s_values"] for t in shards]), torch.cat([t["s_mask"] for t in shards]), inn)
    if sparse.ext is None or not hasattr(sparse.ext, "bitmask_matmul_lowrank"):
        pytest.skip("the fold runs on the bitmask kernel's bf16 dot loops (AVX512_BF16, VBMI2): not in this build")
    folded = LowRankSparseFolded(torch.cat([t["v"] for t in shards]), [t["u"] for t in shards], sparse)
    assert folded.values.shape == (128, 40 + 6) and folded.mask.shape == (128, inn // 8 + 2)  # 6 + 3 + 6 bits of z
    x = torch.randn(tokens, inn, generator=generator).bfloat16()
    torch.testing.assert_close(folded(x).double(), _qkv_reference(shards, x, inn), rtol=2e-2, atol=0.3)


def test_fold_refuses_what_its_layout_cannot_hold() -> None:
    values, mask = torch.zeros(8, 3), torch.zeros(8, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="in_features 13 is no multiple of 8"):
        fold_low_rank(values, mask, 13, [torch.zeros(8, 2)])
    with pytest.raises(ValueError, match="the U's have 6 rows, S has 8"):
        fold_low_rank(values, mask, 16, [torch.zeros(6, 2)])


def test_bf16_shards_fold_u_into_s_where_the_dot_loop_serves_bitmask_batches() -> None:
    """bf16 shards (a bf16 checkpoint served as bf16): on hosts with the bitmask kernel's bf16 dot loop and no tile
    unit the layer runs folded, else apart; either way it is the layer's product."""
    generator = torch.Generator().manual_seed(4)
    inn = 96
    shards, specs = _qkv_shards(generator, inn, 40, bf16_numbers=True)
    shards = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()} for t in shards]
    whole = LowRankSparseShard.layer(shards, specs)
    ext = BitmaskMatmul(shards[0]["s_values"], shards[0]["s_mask"], inn).ext
    dot_loop = ext is not None and hasattr(ext, "bitmask_matmul_lowrank") and not ext.amx_usable()
    assert whole is not None and isinstance(whole.second, LowRankSparseFolded) == dot_loop
    x = torch.randn(4, inn, generator=generator).bfloat16()
    torch.testing.assert_close(whole.second(x).double(), _qkv_reference(shards, x, inn), rtol=2e-2, atol=0.3)
