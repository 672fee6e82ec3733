"""Graceful shutdown: SIGTERM lets running requests finish, then the server exits cleanly."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import openai
import pytest

from slimserve.testing.live import serve_process


@pytest.mark.slow
def test_sigterm_finishes_running_request(tiny_diffusion_lm: Path, tmp_path: Path) -> None:
    server = serve_process(tiny_diffusion_lm, tmp_path / "server.log")
    with server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        # 16 blocks of 8 tokens, 12 denoising steps each (192 forward passes, within the server's
        # 200-pass cap): the engine streams one chunk per finished block, so when the first chunk
        # arrives the other 15 blocks are still to be computed.
        stream = iter(client.completions.create(model="model", prompt="hello", max_tokens=128, stream=True,
                                                extra_body={"steps": 192, "block_length": 8}))
        first = next(stream)
        server.terminate()
        terminated_at = time.monotonic()
        rest = list(stream)
        finished_at = time.monotonic()
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is "killed by SIGTERM".
        assert server.process is not None and server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log_tail(), server.log_tail()
        chunks = [first, *rest]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length", server.log_tail()
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) == 16  # every block arrived
        assert finished_at > terminated_at
        try:
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=5).models.list()
            raise AssertionError("server still answers after shutdown")
        except openai.APIConnectionError:
            pass
