"""`make demo` as a user runs it: `slimserve demo` builds (or reuses) its checkpoint, serves it with vLLM, and the
`openai` client's plain question, with no sampling settings, gets a right answer."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from slimserve.testing.live import SLIMSERVE, ServerProcess, free_port
from slimserve.testing.vllm import vllm_child_env


@pytest.mark.slow
def test_demo_server_answers_the_question_it_prints(tmp_path: Path):
    # The machine's asset cache (model, novels, Grams, a demo folder built by this same code) is reused when present;
    # otherwise the demo builds its checkpoint first, as on a fresh machine.
    port = free_port()
    server = ServerProcess([SLIMSERVE, "demo", "--host", "127.0.0.1", "--port", str(port)], port,
                           tmp_path / "demo.log", env=vllm_child_env(), start_timeout=900)
    with server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=120)
        model = client.models.list().data[0].id
        assert model.startswith("smollm2-135m-sparsegpt-uniform-0.2-bytes"), model
        reply = client.chat.completions.create(model=model, max_tokens=32, messages=[
            {"role": "user", "content": "What is the capital of France?"}])  # the question the demo prints
        answer = reply.choices[0].message.content
        assert "Paris" in answer, f"{answer!r}\n{server.log_tail()}"
