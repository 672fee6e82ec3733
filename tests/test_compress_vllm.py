"""Every calibrated method and allocation produces a checkpoint vLLM serves exactly as its dense export."""

from __future__ import annotations

import pytest

from slimserve.loaders.checkpoint import densify, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.run import compress
from slimserve.testing.vllm import hf_greedy, vllm_greedy

PROMPTS = ["The logging module", "Return a new", "class Path"]


# Each case is one vLLM launch (~40-80 s on 2 cores): every method and both allocations are
# served, and the knapsack cases mix dense, lowrank and dictsparse modules in one fused layer.
CASES = [("svd-llm", "knapsack"), ("cospadi", "uniform"), ("rocket", "uniform"), ("rocket", "knapsack")]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "allocation"), CASES)
def test_served_greedy_tokens_equal_densified_export(narrow_llama, text_file, tmp_path, method, allocation):
    model, calib = narrow_llama, text_file
    out = compress(model, tmp_path / "ckpt", method=method, ratio=0.3, allocation=allocation, calib=calib,
                   calib_samples=8, calib_seq_len=64, progress=False)
    ckpt = validate_checkpoint(out)
    schemes = {spec["scheme"] for spec in ckpt.modules.values()}
    assert schemes - {"dense"}, "nothing was compressed"
    dense = densify(out, tmp_path / "dense")
    assert open_checkpoint(dense).quantization_config is None
    assert vllm_greedy(out, PROMPTS, max_tokens=12) == hf_greedy(dense, PROMPTS, max_tokens=12)
