"""Sirius in real vLLM (fp32 tiny Llama): the invariants of docs/methods/sirius.md, each in a fresh engine.

Every run is one vLLM engine in a child process (``run_sirius``) that returns the greedy tokens,
vLLM's spec-decode counters and what the worker holds: each R-Sparse layer's dense/sparse row
counts, the tokens the drafter pushed through the model, and the KV cache it allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from slimserve.loaders.checkpoint import open_checkpoint
from slimserve.loaders.compress.rsparse import compress_rsparse
from slimserve.testing.models import local_text
from slimserve.testing.vllm import hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Return a new list of", "import json", "Create a logger with"]

_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams


def probe(worker):
    runner = worker.model_runner
    context = runner.compilation_config.static_forward_context
    drafter = getattr(runner, "drafter", None)
    kv = runner.kv_cache_config
    return {"rows": [dict(layer.rows) for name, layer in context.items() if name.startswith("slimserve_rsparse.")],
            "drafted": getattr(drafter, "drafted_rows", None),
            "drafter": type(drafter).__name__ if drafter is not None else None,
            "sampler": type(getattr(runner, "rejection_sampler", None)).__name__,
            "kv_layers": sorted(n for g in kv.kv_cache_groups for n in g.layer_names),
            "kv_bytes": sum(t.size for t in kv.kv_cache_tensors)}


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    engine = {}
    if args["sirius"] is not None:
        from slimserve.plugin.vllm.sirius import SiriusSettings
        engine = SiriusSettings(**args["sirius"]).engine_args(args["model"])
    llm = LLM(model=args["model"], dtype="float32", enforce_eager=args["enforce_eager"], max_model_len=256,
              max_num_seqs=4, seed=0, disable_log_stats=False, enable_prefix_caching=args["prefix_caching"], **engine)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True)
    outs = llm.generate(args["prompts"], params, use_tqdm=False)
    counters = {m.name: m.value for m in llm.get_metrics() if "spec_decode" in m.name and hasattr(m, "value")}
    print("SIRIUS_RUN=" + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "counters": counters,
                                      "worker": llm.collective_rpc(probe)[0]}), flush=True)
"""


def run_sirius(model: Path, sirius: dict[str, Any] | None, *, prefix_caching: bool = True, enforce_eager: bool = True,
               max_tokens: int = 24) -> dict[str, Any]:
    """Greedy tokens, spec-decode counters and the worker's state of one vLLM engine (Sirius off if None)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # collective_rpc ships the probe function by value
    args = {"model": str(model), "sirius": sirius, "prompts": PROMPTS, "prefix_caching": prefix_caching,
            "enforce_eager": enforce_eager, "max_tokens": max_tokens}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("SIRIUS_RUN="):
            return json.loads(line.removeprefix("SIRIUS_RUN="))
    raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")


def advance_length(run: dict[str, Any]) -> float:
    """Tokens each check committed on average: its accepted drafts plus the full model's own token."""
    counters = run["counters"]
    drafts = counters["vllm:spec_decode_num_drafts"]
    return (counters["vllm:spec_decode_num_accepted_tokens"] + drafts) / drafts


@pytest.fixture(scope="module")
def rsparse_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llama at s = 0.5 with α = 0 (low rank), 0.6 and 1 (sparse) layers, as in the R-Sparse vLLM tests."""
    tmp = tmp_path_factory.mktemp("sirius_rsparse")
    (tmp / "calib.txt").write_text(local_text())
    modules = [m for m in open_checkpoint(tiny_llama).tensors if m.endswith("_proj.weight")]
    recipe = {m.removesuffix(".weight"): (0.0, 0.6, 1.0)[i % 3] for i, m in enumerate(sorted(modules))}
    return compress_rsparse(tiny_llama, tmp / "rs", sparsity=0.5, calib=tmp / "calib.txt", recipe=recipe,
                            progress=False)


@pytest.fixture(scope="module")
def plain_greedy(tiny_llama: Path) -> list[list[int]]:
    """The dense model's greedy tokens: what lossless Sirius must produce (its full model is the dense W)."""
    return hf_greedy(tiny_llama, PROMPTS, max_tokens=24)


def test_dense_drafter_equals_plain_greedy_with_no_extra_kv_cache(tiny_llama: Path,
                                                                 plain_greedy: list[list[int]]) -> None:
    plain = run_sirius(tiny_llama, None)
    sirius = run_sirius(tiny_llama, {"period": 4, "lossless": True})
    assert plain["tokens"] == plain_greedy
    assert sirius["tokens"] == plain_greedy
    assert sirius["worker"]["drafter"] == "SiriusProposer" and plain["worker"]["drafter"] is None
    # the drafter attends with the target's layers: the same cache layers and bytes as without Sirius
    assert sirius["worker"]["kv_layers"] == plain["worker"]["kv_layers"]
    assert sirius["worker"]["kv_bytes"] == plain["worker"]["kv_bytes"]
    # a dense drafter is the full model: nearly every draft is accepted (see the test below for why not all)
    assert advance_length(sirius) > 3.5


@pytest.mark.parametrize("period", [2, 4, 16])
def test_rsparse_drafter_with_lossless_acceptance_equals_plain_greedy(rsparse_llama: Path, period: int,
                                                                      plain_greedy: list[list[int]]) -> None:
    run = run_sirius(rsparse_llama, {"period": period, "lossless": True})
    assert run["tokens"] == plain_greedy
    assert run["worker"]["sampler"] == "RejectionSampler"
    drafted = run["worker"]["drafted"]
    assert drafted > 0 and run["worker"]["rows"]
    for rows in run["worker"]["rows"]:
        # sparse rows come only from the drafter; prefill and verification passes are dense
        assert rows["sparse"] == drafted and rows["dense"] > 0
    # the sparse drafter really differs from the full model: some drafts are refused
    assert advance_length(run) < period


def test_prefix_caching_on_and_off_give_identical_tokens(rsparse_llama: Path) -> None:
    settings = {"period": 4, "threshold": 0.1}
    cached = run_sirius(rsparse_llama, settings, prefix_caching=True)
    uncached = run_sirius(rsparse_llama, settings, prefix_caching=False)
    assert cached["tokens"] == uncached["tokens"]
    assert cached["worker"]["sampler"] == "ThresholdRejectionSampler"


def test_threshold_above_one_is_plain_greedy_and_zero_keeps_every_draft(rsparse_llama: Path,
                                                                      plain_greedy: list[list[int]]) -> None:
    strict = run_sirius(rsparse_llama, {"period": 4, "threshold": 1.5})
    assert strict["tokens"] == plain_greedy
    assert strict["counters"]["vllm:spec_decode_num_accepted_tokens"] == 0  # AAL 1
    lenient = run_sirius(rsparse_llama, {"period": 4, "threshold": 0.0})
    counters = lenient["counters"]
    assert counters["vllm:spec_decode_num_accepted_tokens"] == counters["vllm:spec_decode_num_draft_tokens"]
    assert lenient["tokens"] != plain_greedy  # the sparse model's own text, checked every 4 tokens
