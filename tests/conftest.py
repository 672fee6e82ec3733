"""Shared fixtures: tiny models built locally (no hub), once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.testing import build_tiny_causal_lm


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama (GQA 4/2 heads, head_dim 64) with a trained tokenizer, float32."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Qwen3 (q/k norms, tied embeddings) with a trained tokenizer, float32."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", seed=1)
