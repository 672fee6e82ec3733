"""The R-Sparse kernels equal the masked product for every token, and the serving runner picks its path."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.rsparse import exact_mask
from slimserve.plugin.kernels.rsparse import cpu_extension, segmented_sparse_mm, sparse_mm


def case(tokens: int, inp: int, out: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight_t = torch.randn(inp, out, generator=gen).to(dtype)
    x = (torch.randn(tokens, inp, generator=gen) * torch.exp(torch.randn(inp, generator=gen))).to(dtype)
    norm = weight_t.float().norm(dim=1)
    score = (x.float().abs() * norm).flatten()
    return x, weight_t, norm, float(score.kthvalue(score.numel() // 2).values)


def test_the_cpu_extension_builds(isa: str) -> None:
    ext = cpu_extension()
    assert ext is not None, "the C++ kernel did not build; see the warning for the compiler error"
    assert ext.isa() == isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, inp, out", [(1, 576, 192), (1, 300, 1500), (3, 256, 96), (8, 1536, 576),
                                              (16, 130, 1030), (5, 64, 7), (2, 77, 45), (1, 33, 23)])
def test_sparse_mm_equals_the_per_token_masked_product(tokens: int, inp: int, out: int, dtype: torch.dtype,
                                                       isa: str) -> None:
    x, weight_t, norm, t = case(tokens, inp, out, dtype)
    y, rest = sparse_mm(x, weight_t, norm, t, with_rest=True)
    mask = exact_mask(x, norm, t)
    assert 0.3 < mask.float().mean() < 0.7
    expected = (x.float() * mask) @ weight_t.float()
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: the output is rounded once
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert y.dtype == dtype and torch.equal(rest, x * ~mask)


def test_sparse_mm_edge_thresholds(isa: str) -> None:
    x, weight_t, norm, _ = case(2, 200, 100, torch.float32)
    y, _ = sparse_mm(x, weight_t, norm, -math.inf)
    torch.testing.assert_close(y, x @ weight_t, rtol=1e-5, atol=1e-4)
    y, rest = sparse_mm(x, weight_t, norm, math.inf, with_rest=True)
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(rest, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 8])
def test_segments_each_use_their_own_norms_and_thresholds(tokens: int, dtype: torch.dtype, isa: str) -> None:
    """q | k | v side by side in one call equals three separate masked products (one segment reads nothing)."""
    splits = [576, 192, 192]
    cases = [case(tokens, 576, out, dtype, seed=s) for s, out in enumerate(splits)]
    x = cases[0][0]
    thresholds = [cases[0][3], 0.3 * cases[1][3], math.inf]
    weight_t = torch.cat([c[1] for c in cases], dim=1)
    norms = torch.stack([c[2] for c in cases])
    y, rest = segmented_sparse_mm(x, weight_t, norms, thresholds, splits, with_rest=True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for s, (w, norm, t) in enumerate(zip(weight_t.split(splits, dim=1), norms, thresholds)):
        mask = exact_mask(x, norm, t)
        expected = (x.float() * mask) @ w.float()
        o0 = sum(splits[:s])
        torch.testing.assert_close(y[:, o0:o0 + splits[s]].float(), expected, rtol=tol,
                                   atol=tol * max(float(expected.abs().max()), 1.0))
        assert torch.equal(rest[s], x * ~mask)
    assert torch.equal(y[:, -192:], torch.zeros_like(y[:, -192:])) and torch.equal(rest[2], x)


def test_segments_reject_widths_that_do_not_add_up() -> None:
    x, weight_t, norm, t = case(1, 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="sum to 40"):
        segmented_sparse_mm(x, weight_t, torch.stack([norm, norm]), [t, t], [20, 20])


def test_sparse_mm_rejects_mismatched_shapes() -> None:
    x, weight_t, norm, t = case(1, 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="does not match"):
        sparse_mm(x[:, :10], weight_t, norm, t)


def test_triton_kernel_in_the_interpreter() -> None:
    """The CUDA kernel, run by triton's CPU interpreter (no GPU here), against the masked product."""
    pytest.importorskip("triton")
    script = (
        "import torch\n"
        "from slimserve.plugin.kernels import rsparse\n"
        "from slimserve.plugin.kernels.rsparse import TritonBlocks, _triton_sparse_mm\n"
        "from slimserve.loaders.schemes.rsparse import exact_mask\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for n, blocks in ((1, TritonBlocks()), (3, TritonBlocks(32, 64, 1)), (3, TritonBlocks(16, 128, 2))):\n"
        "    rsparse.TRITON_BLOCKS = blocks  # one program over all 70 inputs, then 3 and 3 programs\n"
        "    x = torch.randn(n, 70, generator=g); norm = (wt := torch.randn(70, 200, generator=g)).norm(dim=1)\n"
        "    if n == 3:  # a segment of a fused Wᵀ: a column slice whose rows stride by the fused width\n"
        "        wt = torch.cat([torch.randn(70, 50, generator=g), wt], dim=1)[:, 50:]\n"
        "    y, rest = _triton_sparse_mm(x, wt, norm, 6.0, True)\n"
        "    m = exact_mask(x, norm, 6.0)\n"
        "    assert 0.2 < m.float().mean() < 0.8\n"
        "    torch.testing.assert_close(y, (x * m) @ wt, rtol=1e-4, atol=1e-4)\n"
        "    assert torch.equal(rest, x * ~m)\n"
        "print('TRITON_OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert "TRITON_OK" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture
def vllm_config():
    """A vLLM config set as current, as while vLLM loads a model: R-Sparse layers enter its forward context."""
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    with set_current_vllm_config(config):
        yield config


def in_step(config, attn_metadata=None):
    """The forward context of one vLLM step (``None`` metadata: a profiling or warm-up run)."""
    from vllm.forward_context import create_forward_context, override_forward_context

    meta = attn_metadata if attn_metadata is None else {"model.layers.0.self_attn.attn": attn_metadata}
    return override_forward_context(create_forward_context(meta, config))


def runner(alpha: float, dtype: torch.dtype = torch.float32):
    from slimserve.loaders.compress.rsparse import LayerFactors
    from slimserve.plugin.vllm.rsparse import RSparseLayer

    gen = torch.Generator().manual_seed(1)
    factors = LayerFactors(torch.randn(96, 160, generator=gen), dtype)
    calib = torch.randn(256, 160, generator=gen) * torch.exp(torch.randn(160, generator=gen))
    tensors, fields = factors.module(0.5, alpha, calib)
    spec = {"scheme": "rsparse", "in_features": 160, "out_features": 96, **fields}
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return RSparseLayer.shard(tensors, spec), spec, tensors, calib[:20].to(dtype)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("tokens", [1, 8, 20])
def test_runner_sparse_path_equals_the_reference(alpha: float, tokens: int, vllm_config, isa: str) -> None:
    shard, spec, tensors, x = runner(alpha)
    torch.testing.assert_close(shard.sparse(x[:tokens]), SCHEMES["rsparse"].forward(spec, tensors, x[:tokens]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 8, 20])
def test_a_fused_layer_runs_its_shards_side_by_side(tokens: int, dtype: torch.dtype, vllm_config, isa: str) -> None:
    """gate | up | another shard with α = 0, 0.6, 1: each output slice equals that shard's own R-Sparse forward.

    With at most 16 tokens the kernel adds the low-rank terms itself; 20 tokens take the PyTorch path.
    """
    from slimserve.plugin.vllm.rsparse import RSparseLayer

    shards = [runner(alpha, dtype) for alpha in (0.0, 0.6, 1.0)]
    layer = RSparseLayer([t for _, _, t, _ in shards], [spec for _, spec, _, _ in shards])
    x = shards[0][3][:tokens]
    expected = torch.cat([SCHEMES["rsparse"].forward(spec, {k: v.float() for k, v in t.items()}, x.float())
                          for _, spec, t, _ in shards], dim=1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    got = layer.sparse(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    with in_step(vllm_config):  # a profiling run: dense
        torch.testing.assert_close(layer.second(x), torch.cat([x @ t["weight_t"] for _, _, t, _ in shards], dim=1),
                                   rtol=1e-4, atol=1e-4)


def test_runner_is_dense_outside_decode_and_sparse_in_decode_steps(monkeypatch: pytest.MonkeyPatch,
                                                                    vllm_config) -> None:
    from slimserve.plugin.vllm import rsparse

    shard, spec, tensors, x = runner(0.6)
    dense = x @ tensors["weight_t"]
    sparse = SCHEMES["rsparse"].forward(spec, tensors, x)
    assert not torch.allclose(dense, sparse, rtol=1e-3, atol=1e-3)
    # vLLM's CPU attention metadata carries the step's max_query_len and query_start_loc
    decode = SimpleNamespace(max_query_len=1, query_start_loc=torch.arange(21))
    prefill = SimpleNamespace(max_query_len=20, query_start_loc=torch.tensor([0, 20]))
    mixed = SimpleNamespace(max_query_len=17, query_start_loc=torch.tensor([0, 1, 18, 19, 20]))  # rows 0, 18, 19
    for meta, rows in ((decode, list(range(20))), (prefill, []), (mixed, [0, 18, 19]), (None, [])):
        with in_step(vllm_config, meta):  # None: a profiling run, which has no attention metadata
            expected = dense.clone()
            expected[rows] = sparse[rows]
            torch.testing.assert_close(shard.second(x), expected, rtol=1e-4, atol=1e-4)
    assert shard.rows == {"sparse": 23, "dense": 57}
    monkeypatch.setenv(rsparse.SPARSE_PREFILL_ENV, "1")
    everywhere, *_ = runner(0.6)
    with in_step(vllm_config, prefill):
        torch.testing.assert_close(everywhere.second(x), sparse, rtol=1e-4, atol=1e-4)


def test_explicit_modes_override_the_token_kinds(vllm_config) -> None:
    """Sirius's modes: ``dense`` keeps a decode step dense (a verification pass), ``sparse`` makes a prefill sparse."""
    from slimserve.plugin.vllm import rsparse

    shard, spec, tensors, x = runner(0.6)
    dense = x @ tensors["weight_t"]
    sparse = SCHEMES["rsparse"].forward(spec, tensors, x)
    decode = SimpleNamespace(max_query_len=1, query_start_loc=torch.arange(21))
    prefill = SimpleNamespace(max_query_len=20, query_start_loc=torch.tensor([0, 20]))
    layers = rsparse.context_layers(vllm_config.compilation_config.static_forward_context)
    assert layers == [shard]
    for mode, meta, expected in (("dense", decode, dense), ("sparse", prefill, sparse)):
        rsparse.set_mode(layers, mode)
        with in_step(vllm_config, meta):
            torch.testing.assert_close(shard.second(x), expected, rtol=1e-4, atol=1e-4)


def test_layers_live_in_their_engines_forward_context(vllm_config) -> None:
    """Each engine's layers are found by name in its own context; a layer outside a forward pass is an error."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from slimserve.plugin.vllm import rsparse

    first, *_ = runner(0.0)
    second, *_ = runner(1.0)
    assert (first.name, second.name) == ("slimserve_rsparse.0", "slimserve_rsparse.1")
    other = VllmConfig()
    with set_current_vllm_config(other):
        third, *_ = runner(0.6)
    assert third.name == "slimserve_rsparse.0"
    assert rsparse.context_layers(other.compilation_config.static_forward_context) == [third]
    with pytest.raises(RuntimeError, match="forward context"):
        first.second(torch.zeros(1, 160))
