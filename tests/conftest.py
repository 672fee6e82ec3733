"""Shared fixtures: tiny models and local text built once per test session (no hub).

Each folder here is read-only for the tests that share it: a test that writes into a model
folder (``slimserve vdit-search`` saves its schedule next to the pipeline) builds its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.plugin.kernels import cpp
from slimserve.testing.models import build_tiny_causal_lm, local_text

# The narrow models (hidden size 128, one KV head) keep calibrated compression and perplexity fast.
NARROW = dict(hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1, head_dim=64, num_layers=2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama (GQA 4/2 heads, head_dim 64) with a trained tokenizer, float32."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Qwen3 (q/k norms, tied embeddings) with a trained tokenizer, float32."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", seed=1)


@pytest.fixture(scope="session")
def narrow_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama of hidden size 128 (2 heads, 1 KV head), float32."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("narrow_llama") / "model", "llama", **NARROW)


@pytest.fixture(scope="session")
def narrow_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Qwen3 of hidden size 128 (2 heads, 1 KV head), float32."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("narrow_qwen3") / "model", "qwen3", **NARROW)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``calib.txt``: local English text (standard-library docstrings) for calibration and perplexity."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(local_text())
    return path


@pytest.fixture(scope="session")
def tiny_diffusion_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny masked-diffusion LM folder (8 denoising steps, blocks of 4 tokens) that ``slimserve serve`` runs."""
    from slimserve.testing.diffusion_lm import build_tiny_diffusion_lm

    return build_tiny_diffusion_lm(tmp_path_factory.mktemp("dllm") / "model", steps=8, block_length=4)


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-to-image PixArt-Sigma pipeline folder."""
    from slimserve.testing.diffusers import build_tiny_pixart_sigma

    return build_tiny_pixart_sigma(tmp_path_factory.mktemp("pixart") / "model")


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-to-video Wan pipeline folder without a sparse-attention schedule (served dense)."""
    from slimserve.testing.diffusers import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "model")


@pytest.fixture(params=list(cpp.ISA_FLAGS))
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a kernel test once per variant (AVX-512, AVX2 + FMA, scalar) this CPU can execute."""
    if request.param not in cpp.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    monkeypatch.setenv(cpp.ISA_ENV, request.param)
    return request.param


@pytest.fixture
def kernel_entries(monkeypatch: pytest.MonkeyPatch):
    """``record(module, loader)``: replace ``module.loader`` (a kernel module's ``_cpu_kernel``-style loader) by one
    whose extension records each entry point the op layer calls; returns the list of recorded names."""

    def record(module: object, loader: str) -> list[str]:
        real = getattr(module, loader)()
        called: list[str] = []

        class Recorder:
            def __getattr__(self, name: str) -> object:
                called.append(name)
                return getattr(real, name)

        monkeypatch.setattr(module, loader, Recorder)
        return called

    return record
