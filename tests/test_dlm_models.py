"""LLaDA and Dream checkpoints in their own tensor naming, served by the diffusion-LM engine with SparseD.

The tiny folders (``slimserve.testing.dlm``) hold the weights of a stock transformers model
under LLaDA's or Dream's names; the engine must load them back to the same function, decode
Dream one position to the left, and keep SparseD's invariants end to end: ``rho >= 1`` and
``skip >= 1`` reproduce dense tokens, and each layer chooses its tiles once per request.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import openai
import pytest
import torch

import slimserve.plugin.transformers.dlm_attention as dlm_attention
from slimserve.attention.sparsed import SparsedParams
from slimserve.errors import CheckpointError
from slimserve.server.app import create_app
from slimserve.server.engines.base import TextRequest
from slimserve.server.engines.diffusion_lm import (
    DiffusionLMEngine,
    is_diffusion_lm_config,
    llada_to_llama_config,
    load_diffusion_lm_engine,
)
from slimserve.testing.dlm import TinyDLM, build_tiny_dream, build_tiny_llada
from slimserve.testing.live import app_in_thread
from slimserve.testing.metrics import metric_value

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune " * 2


@pytest.fixture(scope="module", params=["llada", "dream"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyDLM:
    build = build_tiny_llada if request.param == "llada" else build_tiny_dream
    return build(tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def engine(tiny: TinyDLM) -> DiffusionLMEngine:
    return load_diffusion_lm_engine(tiny.path, "tiny")


def _tokens(engine: DiffusionLMEngine, request: TextRequest) -> str:
    return "".join(delta.text for delta in engine.generate_text(request, lambda done, total: None))


def test_original_naming_loads_to_the_same_model(tiny: TinyDLM, engine: DiffusionLMEngine) -> None:
    assert is_diffusion_lm_config({"model_type": "llada"}) and is_diffusion_lm_config({"model_type": "Dream"})
    ids = torch.randint(0, tiny.mask_token_id, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny.source(input_ids=ids, attention_mask=torch.ones(1, 1, 37, 37, dtype=torch.bool)).logits
        got = engine.model(input_ids=ids).logits  # no mask: the engine's attention is bidirectional
    assert torch.equal(got, expected)
    assert engine.mask_token_id == tiny.mask_token_id


def test_dream_reads_logits_one_position_left(tiny: TinyDLM, engine: DiffusionLMEngine) -> None:
    ids = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    sequence = torch.cat([ids, torch.tensor([[tiny.mask_token_id]])], dim=1)
    with torch.no_grad():
        logits = tiny.source(input_ids=sequence, attention_mask=torch.ones(1, 1, *sequence.shape[1:] * 2,
                                                                           dtype=torch.bool)).logits[0]
    position = ids.shape[1] - engine.logit_shift  # Dream: the prompt's last position predicts the first mask
    logits[:, tiny.mask_token_id] = float("-inf")
    expected = engine.tokenizer.decode([int(logits[position].argmax())], skip_special_tokens=True)
    assert engine.logit_shift == (1 if "dream" in str(tiny.path) else 0)
    assert _tokens(engine, TextRequest(prompt=PROMPT, max_tokens=1, temperature=0.0, block_length=1)) == expected


@pytest.mark.parametrize("sparsed", [SparsedParams(rho=1.0, block=16), SparsedParams(skip=1.0, rho=0.1, block=16)])
def test_rho_one_and_skip_one_reproduce_dense_tokens(engine: DiffusionLMEngine, sparsed: SparsedParams) -> None:
    request = TextRequest(prompt=PROMPT, max_tokens=12, temperature=0.0, steps=12, block_length=4)
    assert _tokens(engine, dataclasses.replace(request, sparsed=sparsed)) == _tokens(engine, request)


def test_tiles_chosen_once_per_request_and_layer_across_blocks(engine: DiffusionLMEngine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = dlm_attention.select_tiles

    def counted(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(query.shape))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(dlm_attention, "select_tiles", counted)
    request = TextRequest(prompt=PROMPT, max_tokens=12, temperature=0.0, steps=12, block_length=4,
                          sparsed=SparsedParams(skip=0.2, rho=0.2, block=16))
    deltas = list(engine.generate_text(request, lambda done, total: None))
    assert len(deltas) == 3  # three semi-autoregressive blocks
    layers = engine.model.config.num_hidden_layers
    assert len(calls) == layers  # chosen at global step floor(12 * 0.2) + 1 = 3, reused by blocks 2 and 3
    stats = deltas[-1].sparse_attention
    assert stats is not None and stats.layers == layers and 0 < stats.kept_density < 1
    calls.clear()
    list(engine.generate_text(request, lambda done, total: None))
    assert len(calls) == layers  # a new request chooses anew


def test_llada_variants_a_llama_cannot_express_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="field 'alibi'"):
        llada_to_llama_config({"d_model": 8, "n_heads": 2, "n_layers": 1, "vocab_size": 10, "alibi": True},
                              tmp_path / "config.json")


def test_served_with_sparsed_through_the_openai_api(tiny: TinyDLM, engine: DiffusionLMEngine) -> None:
    with app_in_thread(create_app(engine)) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        dense = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                          extra_body={"steps": 8, "block_length": 4})
        exact = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                          extra_body={"steps": 8, "block_length": 4,
                                                      "sparsed": {"rho": 1.0, "block": 16}})
        assert exact.choices[0].text == dense.choices[0].text
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0, stream=True,
            extra_body={"steps": 8, "block_length": 4, "sparsed": {"skip": 0.2, "rho": 0.2, "block": 16}}))
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 1
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"sparsed": {"block": 24}})
        import httpx

        text = httpx.get(base_url + "/metrics").text
    assert metric_value(text, "slimserve:sparsed_kept_density_count", model_name="tiny") == 2
    assert metric_value(text, "slimserve:sparsed_mask_selection_seconds_sum", model_name="tiny") > 0


@pytest.mark.parametrize("kernel", ["gather", "flex_eager"])
def test_sparse_kernel_with_every_tile_kept_equals_dense_in_the_model(engine: DiffusionLMEngine,
                                                                      kernel: str) -> None:
    """The sparse kernels really run inside the decoder (threshold lifted) and match dense attention."""
    ids = torch.randint(0, engine.mask_token_id, (1, 70), generator=torch.Generator().manual_seed(1))
    state = dlm_attention.SparsedRequest(SparsedParams(skip=0.0, rho=1.0, block=16), prompt_length=50,
                                         total_steps=4, kernel=kernel, dense_above=1.0)
    with torch.no_grad():
        dense = engine.model.base_model(input_ids=ids).last_hidden_state
        for step in range(state.select_step + 2):  # dense steps, the selecting step, then one sparse step
            state.step = step
            hidden = engine.model.base_model(input_ids=ids, sparsed=state).last_hidden_state
    assert all(tiles.plan is not None for tiles in state.layers.values())
    torch.testing.assert_close(hidden, dense, atol=1e-5, rtol=1e-5)
