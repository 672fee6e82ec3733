"""`make demo`'s checkpoint (server/demo.py's method, ratio, allocation) still answers sensibly in real vLLM."""

from __future__ import annotations

import pytest

from slimserve.loaders.assets import ARTIFACTS
from slimserve.server.demo import build_demo_checkpoint
from slimserve.testing.vllm import vllm_chat


@pytest.mark.slow
def test_demo_checkpoint_knows_the_capital_of_france():
    # The machine's asset cache (model, novels, Grams, a demo folder built by this same code) is reused when present.
    ckpt = build_demo_checkpoint(ARTIFACTS)
    (answer,) = vllm_chat(ckpt, ["What is the capital of France?"], max_tokens=32)
    assert "Paris" in answer, answer
