"""Graceful shutdown: SIGTERM lets running requests finish, then the server exits cleanly."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from slimserve.server.engines.tiny_models import build_tiny_diffusion_lm
from slimserve.server.live import ServerProcess, free_port
from tests.test_server_diffusers import SLIMSERVE


@pytest.mark.slow
def test_sigterm_finishes_running_request(tmp_path: Path) -> None:
    model_dir = build_tiny_diffusion_lm(tmp_path / "model")
    port = free_port()
    server = ServerProcess([SLIMSERVE, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
                           port, tmp_path / "server.log")
    with server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        results: list[tuple[object, float]] = []

        def slow_request() -> None:
            # Many denoising steps over a long block keep the request on the engine for seconds.
            result = client.completions.create(model="model", prompt="hello", max_tokens=64,
                                               extra_body={"steps": 200, "block_length": 64})
            results.append((result, time.monotonic()))

        request = threading.Thread(target=slow_request)
        request.start()
        time.sleep(1.0)
        assert not results, "the request finished before shutdown began; make it slower"
        terminated_at = time.monotonic()
        server.terminate()
        request.join(timeout=60)
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is "killed by SIGTERM".
        assert server.process is not None and server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log_tail(), server.log_tail()
        assert len(results) == 1, server.log_tail()
        result, finished_at = results[0]
        assert result.usage.completion_tokens > 0 and finished_at > terminated_at
        try:
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=5).models.list()
            raise AssertionError("server still answers after shutdown")
        except openai.APIConnectionError:
            pass
