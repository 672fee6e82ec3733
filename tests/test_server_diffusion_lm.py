"""`slimserve serve` on a tiny masked-diffusion LM, called with the real `openai` client.

The server runs as a child process with an API key, as a user would start it; the tests
cover completions, chat streaming with usage, stop strings, the diffusion knobs passed
through ``extra_body``, errors, authentication and the latency histograms.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch

from slimserve.server.engines.base import TextRequest
from slimserve.server.engines.diffusion_lm import load_diffusion_lm_engine
from slimserve.testing.live import ServerProcess, serve_process
from slimserve.testing.metrics import metric_value

API_KEY = "test-key"


@pytest.fixture
def model_dir(tiny_diffusion_lm: Path) -> Path:
    """Built with 8 denoising steps in blocks of 4 tokens, which the sampler test counts on."""
    return tiny_diffusion_lm


@pytest.fixture(scope="module")
def server(tiny_diffusion_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("dllm_log") / "server.log"
    # Limits set by flags, as an operator would: they must reach the app (tested below).
    with serve_process(tiny_diffusion_lm, log, served_model_name="tiny-dllm", api_key=API_KEY,
                       options=["--max-tokens", "64", "--max-steps", "100"]) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_sampler_is_bidirectional_and_blockwise(model_dir: Path) -> None:
    engine = load_diffusion_lm_engine(model_dir, "tiny-dllm")
    steps: list[tuple[int, int]] = []
    deltas = list(engine.generate_text(TextRequest(prompt="hello", max_tokens=10, temperature=0.0),
                                       lambda done, total: steps.append((done, total))))
    # 10 tokens in blocks of 4 -> 3 blocks; 8 steps rounded up to a multiple of the block count.
    assert len(deltas) == 3 and steps[-1] == (9, 9)
    assert [d.num_tokens for d in deltas] == [4, 4, 2] and deltas[-1].finish_reason == "length"
    # Position 0 sees the whole sequence: changing only the last prompt token changes its logits.
    ids = engine.tokenizer("one two three", return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % engine.mask_token_id
    full = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=bool)
    first = engine.model(input_ids=ids, attention_mask=full).logits[0, 0]
    second = engine.model(input_ids=changed, attention_mask=full).logits[0, 0]
    assert (first - second).abs().max() > 0


def test_completion_is_deterministic_at_temperature_zero(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny-dllm"]
    args = dict(model="tiny-dllm", prompt="The quick brown fox", max_tokens=8, temperature=0)
    first = client.completions.create(**args)
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.usage.prompt_tokens > 0 and 0 < first.usage.completion_tokens <= 8
    assert client.completions.create(**args).choices[0].text == first.choices[0].text


def test_chat_stream_blocks_and_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny-dllm", messages=[{"role": "user", "content": "Say something"}], max_tokens=12,
        temperature=0.7, seed=1, stream=True, stream_options={"include_usage": True},
        extra_body={"steps": 6, "block_length": 4}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.usage is None for c in content)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if content[-1].choices[0].finish_reason == "length":
        assert len(content) == 3 and usage.completion_tokens == 12  # one chunk per block of 4


def test_errors_and_auth(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-dllm", prompt="x", max_tokens=1, extra_body={"steps": 0})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_metrics_after_streaming(client: openai.OpenAI, server: ServerProcess) -> None:
    list(client.completions.create(model="tiny-dllm", prompt="a", max_tokens=8, stream=True))
    text = httpx.get(server.base_url + "/metrics").text
    labels = {"model_name": "tiny-dllm"}
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "denoise_step_seconds"):
        assert metric_value(text, f"slimserve:{name}_count", **labels) >= 1, name
    assert metric_value(text, "slimserve:generation_tokens_total", **labels) >= 8
    assert metric_value(text, "slimserve:prompt_tokens_total", **labels) >= 1


def test_forward_passes_and_positions_follow_the_sampler(model_dir: Path) -> None:
    engine = load_diffusion_lm_engine(model_dir, "tiny-dllm")
    # The issue-13 probe: one step asked, but 300 one-token blocks need one pass each.
    assert engine.forward_passes(TextRequest(prompt="a", max_tokens=300, block_length=1, steps=1)) == 300
    # The folder's defaults (8 steps, blocks of 4): 10 tokens -> 3 blocks -> 8 rounded up to 9, as the sampler runs.
    steps: list[tuple[int, int]] = []
    request = TextRequest(prompt="hello", max_tokens=10, temperature=0.0)
    list(engine.generate_text(request, lambda done, total: steps.append((done, total))))
    assert engine.forward_passes(request) == len(steps) == 9
    assert engine.max_positions() == engine.model.config.max_position_embeddings


def test_serve_flags_set_the_app_limits(client: openai.OpenAI) -> None:
    """``slimserve serve --max-tokens 64 --max-steps 100`` (the fixture's command line) bounds requests."""
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny-dllm", prompt="a", max_tokens=65)
    assert too_long.value.body["param"] == "max_tokens" and "at most 64" in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_many_steps:
        client.completions.create(model="tiny-dllm", prompt="a", max_tokens=8, extra_body={"steps": 101})
    assert too_many_steps.value.body["param"] == "steps"


def test_probe_over_max_steps_is_400_before_running(model_dir: Path) -> None:
    from slimserve.server.app import ServerConfig, create_app
    from slimserve.testing.live import app_in_thread

    engine = load_diffusion_lm_engine(model_dir, "tiny-dllm")
    with app_in_thread(create_app(engine, ServerConfig(max_steps=200))) as base_url:
        probe = httpx.post(base_url + "/v1/completions",
                           json={"prompt": "a", "max_tokens": 300, "block_length": 1, "steps": 1})
        within = httpx.post(base_url + "/v1/completions",
                            json={"prompt": "a", "max_tokens": 8, "block_length": 4, "steps": 2})
    assert probe.status_code == 400 and probe.json()["error"]["param"] == "steps"
    assert "300 forward passes" in probe.json()["error"]["message"]
    assert within.status_code == 200
