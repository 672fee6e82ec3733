"""Real vLLM serves rsparse checkpoints token for token like the plain PyTorch R-Sparse reference.

The reference is transformers with every decoder linear replaced by the scheme's reference
forward (``loaders/reference.py``), greedy, one prompt at a time: its prefill is one multi-token
forward (dense in the serving protocol) and each decode step one single-token forward (sparse).
vLLM batches the four prompts' decode steps together, so this also checks per-token masks in
a batch and the prefill/decode detection from the forward context.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.loaders.checkpoint import open_checkpoint
from slimserve.loaders.compress.rsparse import compress_rsparse
from slimserve.plugin.vllm.rsparse import SPARSE_PREFILL_ENV
from slimserve.testing.vllm import hf_greedy, scheme_reference_greedy, vllm_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Return a new list of", "import json", "Create a logger with"]


@pytest.fixture(scope="module")
def rsparse_llama(tiny_llama: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llama at s = 0.5 with every mode present: α = 0 (low rank), 0.6 (both) and 1 (sparse)."""
    tmp = tmp_path_factory.mktemp("rsparse_llama")
    modules = [m for m in open_checkpoint(tiny_llama).tensors if m.endswith("_proj.weight")]
    recipe = {m.removesuffix(".weight"): (0.0, 0.6, 1.0)[i % 3] for i, m in enumerate(sorted(modules))}
    out = compress_rsparse(tiny_llama, tmp / "rs", sparsity=0.5, calib=text_file, recipe=recipe,
                           progress=False)
    ranks = {s["rank"] for s in open_checkpoint(out).modules.values()}
    assert 0 in ranks and len(ranks) > 2
    return out


def test_vllm_greedy_equals_the_reference_at_tp1_and_tp2(rsparse_llama: Path, tiny_llama: Path) -> None:
    reference = scheme_reference_greedy(rsparse_llama, PROMPTS)
    # sparse decode really changes the output, so the equality below is not vacuous
    assert reference != hf_greedy(tiny_llama, PROMPTS)
    # vLLM's default CPU mode (torch.compile) at TP 1, eager at TP 2
    assert vllm_greedy(rsparse_llama, PROMPTS, enforce_eager=False) == reference
    assert vllm_greedy(rsparse_llama, PROMPTS, tp=2) == reference


def test_sparse_prefill_flag_makes_every_token_sparse(rsparse_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = scheme_reference_greedy(rsparse_llama, PROMPTS, dense_prefill=False)
    assert reference != scheme_reference_greedy(rsparse_llama, PROMPTS)
    monkeypatch.setenv(SPARSE_PREFILL_ENV, "1")
    assert vllm_greedy(rsparse_llama, PROMPTS) == reference
