"""The compressor's checkpoints are served by vLLM exactly as their dense exports."""

from __future__ import annotations

import pytest

from slimserve.loaders.checkpoint import densify, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.run import compress
from slimserve.testing.vllm import hf_greedy, vllm_greedy

PROMPTS = ["The logging module", "Return a new", "class Path"]


# Each case is one vLLM launch (~40-80 s on 2 cores). The knapsack cases mix dense, lowrank and
# dictsparse modules in one fused layer, so between them they serve every scheme the compressor writes;
# CoSpaDi's and uniform ROCKET's checkpoints hold the same schemes and encodings (their files are
# checked in tests/test_compress_methods.py and test_byte_budget.py, their serving by these two).
CASES = [("svd-llm", "knapsack"), ("rocket", "knapsack")]


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
