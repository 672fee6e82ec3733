"""Every request's cost is bounded before work starts (issue 13, items 1 and 3), probed over real HTTP.

The requests are the ones the issue sent as an attacker and as a careless user would, against
the trivial engine (the HTTP layer's own tests) and the tiny diffusion LM (its real limits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from slimserve.server.app import ServerConfig, create_app
from slimserve.server.engines.base import ChatMessage, ImageRequest, StepCallback, TextRequest
from slimserve.testing.live import app_in_thread
from slimserve.testing.trivial import TrivialEngine

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


class DeclaringEngine(TrivialEngine):
    """The trivial engine plus the limits a real engine declares: positions, forward passes, a slow tokenizer."""

    def __init__(self, positions: int | None = None, tokenize_seconds: float = 0.0,
                 fail_with: BaseException | None = None) -> None:
        super().__init__()
        self.positions = positions
        self.tokenize_seconds = tokenize_seconds
        self.fail_with = fail_with

    def max_positions(self) -> int | None:
        return self.positions

    def forward_passes(self, request: TextRequest) -> int | None:
        return request.max_tokens * (request.steps or 1)

    def count_tokens(self, text: str) -> int:
        time.sleep(self.tokenize_seconds)
        return super().count_tokens(text)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        time.sleep(self.tokenize_seconds)
        return super().render_chat(messages)

    def generate_images(self, request: ImageRequest, on_step: StepCallback) -> list:
        if self.fail_with is not None:
            raise self.fail_with
        return super().generate_images(request, on_step)


@pytest.fixture(scope="module")
def keyed() -> Iterator[str]:
    with app_in_thread(create_app(DeclaringEngine(positions=512), ServerConfig(api_key=KEY))) as base_url:
        yield base_url


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- body size: 413 before parsing and before authentication --------------------------------

def test_oversized_json_without_key_is_413_before_auth(keyed: str) -> None:
    body = b'{"prompt": "' + b"a" * (30 * 1024 * 1024) + b'"}'
    started = time.perf_counter()
    try:
        response = httpx.post(keyed + "/v1/completions", content=body, headers={"content-type": "application/json"},
                              timeout=30)
    except httpx.TransportError:  # the server may close before the client finished writing: never a 401/200
        pytest.skip("server closed the connection before the client read the 413")
    assert_error(response, 413)
    assert response.json()["error"]["code"] == "request_too_large"
    assert time.perf_counter() - started < 10


def test_streamed_body_without_length_is_counted(keyed: str) -> None:
    """A chunked body announces no size; it is counted as it arrives and cut off at the limit."""
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * (64 * 1024)
        yield b'"}'

    response = httpx.post(keyed + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                          timeout=30)
    assert_error(response, 413)


def test_oversized_multipart_part_is_413() -> None:
    config = ServerConfig(api_key=KEY, max_body_bytes=1024 * 1024)
    with app_in_thread(create_app(TrivialEngine(), config)) as base_url:
        def chunks() -> Iterator[bytes]:  # 50 MiB prompt part, streamed
            yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
            for _ in range(50):
                yield b"a" * (1024 * 1024)
            yield b"\r\n--b--\r\n"

        response = httpx.post(base_url + "/v1/videos", content=chunks(), timeout=30,
                              headers={"content-type": "multipart/form-data; boundary=b", **AUTH})
        assert_error(response, 413)
        # A request under the limit still works, and the server is healthy.
        ok = httpx.post(base_url + "/v1/videos", data={"prompt": "grey", "num_frames": "2"}, headers=AUTH)
        assert ok.status_code == 200, ok.text


# ---- prompt tokens against the model's positions ---------------------------------------------

def test_prompt_longer_than_positions_is_400(keyed: str) -> None:
    prompt = "hello " * 9000  # 9,000 prompt tokens on a model with 512 positions
    response = httpx.post(keyed + "/v1/completions", json={"prompt": prompt, "max_tokens": 4}, headers=AUTH)
    error = assert_error(response, 400, "prompt")
    assert error["code"] == "context_length_exceeded" and "512" in error["message"]
    # A prompt that leaves room for max_tokens is served; one that does not is refused.
    fits = httpx.post(keyed + "/v1/completions", json={"prompt": "a " * 500, "max_tokens": 12}, headers=AUTH)
    assert fits.status_code == 200, fits.text
    assert_error(httpx.post(keyed + "/v1/completions", json={"prompt": "a " * 500, "max_tokens": 13}, headers=AUTH),
                 400, "prompt")


def test_server_max_model_len_applies_when_engine_declares_none() -> None:
    with app_in_thread(create_app(TrivialEngine(), ServerConfig(max_model_len=64))) as base_url:
        response = httpx.post(base_url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "w " * 60}], "max_tokens": 8})
        assert_error(response, 400, "prompt")


def test_forward_passes_over_max_steps_is_400(keyed: str) -> None:
    body = {"prompt": "a", "max_tokens": 201, "steps": 1}  # 201 forward passes, max_steps is 200
    assert_error(httpx.post(keyed + "/v1/completions", json=body, headers=AUTH), 400, "steps")
    body = {"prompt": "a", "max_tokens": 100, "steps": 2}
    assert httpx.post(keyed + "/v1/completions", json=body, headers=AUTH).status_code == 200


def test_tokenizing_runs_off_the_event_loop() -> None:
    """While a request's prompt is being tokenized (and templated), /health still answers at once."""
    with app_in_thread(create_app(DeclaringEngine(tokenize_seconds=1.0))) as base_url:
        for route, body in (("/v1/completions", {"prompt": "a", "max_tokens": 1}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                      "max_tokens": 1})):
            worker = threading.Thread(target=httpx.post, args=(base_url + route,), kwargs={"json": body})
            worker.start()
            time.sleep(0.3)
            started = time.perf_counter()
            assert httpx.get(base_url + "/health").status_code == 200
            assert time.perf_counter() - started < 0.3, route
            worker.join()


# ---- image and video sizes: max_side per field, a pixel budget, encoder failures ---------------

def test_video_width_and_height_get_the_max_side_check(keyed: str) -> None:
    response = httpx.post(keyed + "/v1/videos", data={"prompt": "p", "width": "4000", "height": "2112"},
                          headers=AUTH)
    assert "2048" in assert_error(response, 400, "width")["message"]
    response = httpx.post(keyed + "/v1/videos/sync", data={"prompt": "p", "width": "8192", "height": "16"},
                          headers=AUTH)
    assert_error(response, 400, "width")


def test_pixel_budget_over_frames_and_outputs(keyed: str) -> None:
    response = httpx.post(keyed + "/v1/images/generations", json={"prompt": "p", "size": "2048x2048", "n": 10},
                          headers=AUTH)
    assert "budget" in assert_error(response, 400, "n")["message"]
    response = httpx.post(keyed + "/v1/videos", data={"prompt": "p", "size": "2048x2048", "num_frames": "9"},
                          headers=AUTH)
    assert_error(response, 400, "num_frames")


def test_video_encoder_refusal_is_a_clear_400_without_temp_paths() -> None:
    config = ServerConfig(max_side=10000, max_pixels=10**9)
    with app_in_thread(create_app(TrivialEngine(), config)) as base_url:
        for width, height in (("8192", "16"), ("1", "1")):
            response = httpx.post(base_url + "/v1/videos/sync",
                                  data={"prompt": "p", "width": width, "height": height, "num_frames": "1"})
            error = assert_error(response, 400, "size")
            assert error["code"] == "unsupported_size" and f"{width}x{height}" in error["message"]
            assert "/tmp" not in response.text and "video.mp4" not in response.text
        # The job API records the same failure on the job.
        job = httpx.post(base_url + "/v1/videos", data={"prompt": "p", "size": "1x1", "num_frames": "1"}).json()
        for _ in range(100):
            job = httpx.get(f"{base_url}/v1/videos/{job['id']}").json()
            if job["status"] == "failed":
                break
            time.sleep(0.05)
        assert job["status"] == "failed" and job["error"]["code"] == "unsupported_size"


# ---- errors: generic 500 with a request id, any bearer token --------------------------------

def test_unexpected_error_is_a_generic_500_with_request_id(caplog: pytest.LogCaptureFixture) -> None:
    engine = DeclaringEngine(fail_with=RuntimeError("secret detail /tmp/slimserve-xyz/frame.png"))
    with app_in_thread(create_app(engine)) as base_url:
        response = httpx.post(base_url + "/v1/images/generations", json={"prompt": "p"})
        error = assert_error(response, 500)
        request_id = response.headers["x-request-id"]
        assert request_id in error["message"] and error["code"] == "internal_error"
        assert "secret" not in response.text and "/tmp" not in response.text and "RuntimeError" not in response.text
        # A client's own request id is echoed (and used in the log); every response carries one.
        echoed = httpx.get(base_url + "/v1/models", headers={"x-request-id": "trace-42"})
        assert echoed.headers["x-request-id"] == "trace-42"
        injected = httpx.get(base_url + "/health", headers={"x-request-id": "bad id\twith tab"})
        assert injected.headers["x-request-id"] != "bad id\twith tab" and len(injected.headers["x-request-id"]) == 32


def test_non_ascii_bearer_token_is_401(keyed: str) -> None:
    for token in ("ключ".encode(), "sekrét".encode("latin-1"), b"\xff\xfe"):
        response = httpx.get(keyed + "/v1/models", headers={"Authorization": b"Bearer " + token})
        assert_error(response, 401)
    assert httpx.get(keyed + "/v1/models", headers=AUTH).status_code == 200


# ---- the diffusion LM's real limits ----------------------------------------------------------

@pytest.fixture(scope="module")
def dllm(tiny_diffusion_lm: Path) -> Iterator[str]:
    from slimserve.server.engines.diffusion_lm import load_diffusion_lm_engine

    with app_in_thread(create_app(load_diffusion_lm_engine(tiny_diffusion_lm, "tiny"))) as base_url:
        yield base_url


def test_diffusion_lm_prompt_past_its_positions_is_400(dllm: str) -> None:
    response = httpx.post(dllm + "/v1/completions", json={"prompt": "hello " * 9000, "max_tokens": 4})
    assert_error(response, 400, "prompt")


def test_diffusion_lm_real_step_count_over_max_steps_is_400(dllm: str) -> None:
    response = httpx.post(dllm + "/v1/completions", json={"prompt": "a", "max_tokens": 300, "block_length": 1,
                                                          "steps": 1})
    assert_error(response, 400, "steps")
