"""The FastAPI layer with a trivial engine: streaming, errors, auth, queueing, disconnects.

These tests isolate the HTTP layer; each real engine is proven separately over HTTP in
``test_server_diffusers.py``, ``test_server_diffusion_lm.py`` and ``test_serve_vllm.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import httpx
import openai
import pytest

from slimserve.server.app import ServerConfig, create_app
from slimserve.testing.live import app_in_thread
from slimserve.testing.metrics import metric_value
from slimserve.testing.trivial import TrivialEngine


@pytest.fixture(scope="module")
def server() -> str:
    with app_in_thread(create_app(TrivialEngine(step_seconds=0.01))) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_lists_served_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["trivial"]


def test_completion_usage_and_token_budget(client: openai.OpenAI) -> None:
    result = client.completions.create(model="trivial", prompt="a b c", max_tokens=4)
    assert result.choices[0].text == "a b c a"
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (3, 4, 7)
    # The newer name wins, as in OpenAI's API.
    chat = client.chat.completions.create(model="trivial", messages=[{"role": "user", "content": "x y"}],
                                          max_tokens=9, max_completion_tokens=2)
    assert chat.choices[0].message.content == "x y" and chat.usage.completion_tokens == 2


def test_chat_stream_with_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="trivial", messages=[{"role": "user", "content": "hello there"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content) == "hello there hello"
    assert [c.choices[0].finish_reason for c in content] == [None, None, "length"]
    assert all(c.usage is None for c in content)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_stream_without_usage_sends_no_usage_chunk(server: str) -> None:
    body = {"prompt": "a", "max_tokens": 2, "stream": True}
    lines = httpx.post(server + "/v1/completions", json=body).text.split("\n\n")
    events = [line.removeprefix("data: ") for line in lines if line]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_unknown_fields_are_accepted(client: openai.OpenAI) -> None:
    result = client.completions.create(model="trivial", prompt="a", max_tokens=1, extra_body={"frobnicate": 1},
                                       user="someone")
    assert result.choices[0].text == "a"


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 1}, "prompt"),
    ({"prompt": "a", "max_tokens": 10**5}, "max_tokens"),
])
def test_invalid_requests_are_400_with_openai_body(server: str, body: dict, param: str) -> None:
    response = httpx.post(server + "/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="a")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="trivial", messages=[])
    with pytest.raises(openai.BadRequestError):  # a stream request that fails validation is not a 200
        client.chat.completions.create(model="trivial", messages=[], stream=True)


def test_unknown_route_and_malformed_json(server: str) -> None:
    missing = httpx.get(server + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    json_header = {"content-type": "application/json"}
    malformed = httpx.post(server + "/v1/completions", content=b"{not json", headers=json_header)
    assert malformed.status_code == 400 and "error" in malformed.json()


def test_images_b64(client: openai.OpenAI) -> None:
    result = client.images.generate(model="trivial", prompt="grey", n=2, size="32x16")
    assert len(result.data) == 2
    assert base64.b64decode(result.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="trivial", prompt="grey", response_format="url")


def test_metrics_expose_latency_histograms(client: openai.OpenAI, server: str) -> None:
    client.completions.create(model="trivial", prompt="a b", max_tokens=3)
    text = httpx.get(server + "/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_time_per_output_token_seconds"):
        assert metric_value(text, f"slimserve:{name}_count", model_name="trivial") >= 1, name
    assert 'slimserve:time_to_first_token_seconds_bucket{le="0.001",model_name="trivial"}' in text
    assert metric_value(text, "slimserve:request_success_total", finished_reason="length") >= 1
    assert metric_value(text, "slimserve:attention_density", model_name="trivial") == 1.0


def test_api_key_is_required_when_configured() -> None:
    with app_in_thread(create_app(TrivialEngine(), ServerConfig(api_key="sekret"))) as base_url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base_url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="trivial", prompt="a", max_tokens=1).choices[0].text == "a"
        assert httpx.get(base_url + "/health").status_code == 200  # probes need no key
        assert httpx.get(base_url + "/v1/models").status_code == 401


def test_full_queue_answers_429_and_recovers() -> None:
    config = ServerConfig(max_running=1, max_waiting=1)
    with app_in_thread(create_app(TrivialEngine(step_seconds=0.2), config)) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        results: list[object] = []

        def occupy() -> None:
            results.append(client.completions.create(model="trivial", prompt="a", max_tokens=5))

        threads = [threading.Thread(target=occupy) for _ in range(2)]  # one running, one waiting
        for thread in threads:
            thread.start()
            time.sleep(0.15)
        with pytest.raises(openai.RateLimitError) as raised:
            client.completions.create(model="trivial", prompt="a", max_tokens=1)
        assert raised.value.body["code"] == "queue_full"
        for thread in threads:
            thread.join()
        assert len(results) == 2
        assert client.completions.create(model="trivial", prompt="a", max_tokens=1).choices[0].text == "a"
        text = httpx.get(base_url + "/metrics").text
        assert metric_value(text, "slimserve:admission_rejections_total", reason="queue_full") == 1


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_engine_work(stream: bool) -> None:
    engine = TrivialEngine(step_seconds=0.05)
    with app_in_thread(create_app(engine)) as base_url:
        async def leave_early() -> None:
            async with httpx.AsyncClient(base_url=base_url) as http:
                body = {"prompt": "a", "max_tokens": 200, "stream": stream}
                if stream:
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        async for _ in response.aiter_lines():
                            break
                else:
                    with pytest.raises(httpx.ReadTimeout):
                        await http.post("/v1/completions", json=body, timeout=0.3)

        asyncio.run(leave_early())
        # 200 tokens take 10 s; a cancelled request frees the engine within a step or two.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            text = httpx.get(base_url + "/metrics").text
            if metric_value(text, "slimserve:num_requests_running", model_name="trivial") == 0:
                break
            time.sleep(0.05)
        assert metric_value(text, "slimserve:num_requests_running", model_name="trivial") == 0
        assert metric_value(text, "slimserve:request_success_total", finished_reason="abort") == 1
        assert metric_value(text, "slimserve:generation_tokens_total", model_name="trivial") < 100
