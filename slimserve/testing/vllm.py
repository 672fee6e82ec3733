"""Greedy outputs of real vLLM (in a fresh process) and of transformers, the reference they are compared to.

vLLM is imported only inside the child process, so importing this module costs no engine start
and works where vLLM is not installed (``hf_greedy`` needs only transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from slimserve.server.chat_eval import vllm_chat_answers, vllm_child_env

_GREEDY_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype=args["dtype"], enforce_eager=args["enforce_eager"], max_model_len=256,
              max_num_seqs=4, tensor_parallel_size=args["tp"], pipeline_parallel_size=args["pp"],
              distributed_executor_backend=args["executor"], seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True,
                            logprobs=1 if args.get("logprobs") else None)
    outs = [o.outputs[0] for o in llm.generate(args["prompts"], params, use_tqdm=False)]
    print("GREEDY_TOKENS=" + json.dumps([list(o.token_ids) for o in outs]), flush=True)
    if args.get("logprobs"):
        print("GREEDY_LOGPROBS=" + json.dumps([[list(o.token_ids), [step[token].logprob for step, token in
                                                                     zip(o.logprobs, o.token_ids)]] for o in outs]),
              flush=True)
"""


def vllm_greedy(model_dir: str | Path, prompts: list[str], *, max_tokens: int = 16, tp: int = 1, pp: int = 1,
                executor: str | None = None, dtype: str = "float32", enforce_eager: bool = True,
                timeout: float = 600) -> list[list[int]]:
    """Greedy token ids from real vLLM (with the slimserve plugin) in a fresh process.

    ``enforce_eager=False`` runs vLLM's default CPU mode (torch.compile with inductor). ``pp`` is
    the pipeline-parallel size and ``executor`` vLLM's ``distributed_executor_backend`` ("mp",
    "ray"; None lets vLLM choose).
    """
    return _run_vllm(_GREEDY_SCRIPT, "GREEDY_TOKENS=", {
        "model": str(model_dir), "prompts": prompts, "max_tokens": max_tokens, "tp": tp, "pp": pp,
        "executor": executor, "dtype": dtype, "enforce_eager": enforce_eager}, tp=tp * pp, timeout=timeout)


def vllm_greedy_logprobs(model_dir: str | Path, prompts: list[str], *, max_tokens: int = 16, tp: int = 1,
                         dtype: str = "float32", enforce_eager: bool = True,
                         timeout: float = 600) -> list[tuple[list[int], list[float]]]:
    """Per prompt, vLLM's greedy tokens and the log-probability it gave each: for dtypes whose rounding makes exact
    token equality with a reference too strict a test (bf16), compared with ``hf_chosen_logprobs``."""
    return _run_vllm(_GREEDY_SCRIPT, "GREEDY_LOGPROBS=", {
        "model": str(model_dir), "prompts": prompts, "max_tokens": max_tokens, "tp": tp, "pp": 1, "executor": None,
        "dtype": dtype, "enforce_eager": enforce_eager, "logprobs": True}, tp=tp, timeout=timeout)


def vllm_chat(model_dir: str | Path, questions: list[str], *, max_tokens: int = 48, dtype: str = "bfloat16",
              timeout: float = 600) -> list[str]:
    """Greedy single-turn chat answers from real vLLM (the model's chat template applied), one per question."""
    return [answer["text"] for answer in vllm_chat_answers(model_dir, questions, max_tokens=max_tokens, dtype=dtype,
                                                            timeout=timeout)]


def _run_vllm(script: str, marker: str, args: dict[str, Any], *, tp: int = 1, timeout: float = 600) -> Any:
    """Run a vLLM ``script`` in a fresh process and return the JSON it prints after ``marker``.

    A subprocess keeps each engine's spawned workers and global state away from the test
    process, and gives vLLM the ``__main__`` guard it needs on CPU.
    """
    import os
    import subprocess
    import sys

    env = vllm_child_env()
    if tp > 1:
        # one core per worker; more workers than cores (TP 2 x PP 2 on 2 cores) share them round-robin
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cores[i % len(cores)]) for i in range(tp))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")


def hf_greedy(model_dir: str | Path, prompts: list[str], *, max_tokens: int = 16) -> list[list[int]]:
    """Greedy token ids from transformers in float32, the reference for vLLM outputs.

    A plain argmax loop: like vLLM with ``ignore_eos`` it neither stops at nor suppresses the
    end-of-sequence token (``generate(min_new_tokens=...)`` would mask it out).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            start = ids.shape[1]
            for _ in range(max_tokens):
                next_id = model(ids).logits[:, -1].argmax(dim=-1, keepdim=True)
                ids = torch.cat([ids, next_id], dim=1)
            results.append(ids[0, start:].tolist())
    return results


def scheme_reference_greedy(model_dir: str | Path, prompts: list[str], *, max_tokens: int = 16,
                            dense_prefill: bool = True) -> list[list[int]]:
    """Greedy token ids of ``loaders/reference.py``'s model, where each module runs its scheme's own forward.

    The reference for checkpoints no dense export stands for (rsparse masks each decode token's
    input): one prefill forward, dense by default as vLLM serves it, then one forward per decoded
    token with the KV cache, float32.
    """
    from transformers import AutoTokenizer

    from slimserve.loaders.reference import reference_model

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = reference_model(model_dir, dense_prefill=dense_prefill)
    results = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(tok(prompt, return_tensors="pt").input_ids, use_cache=True)
            tokens = []
            for _ in range(max_tokens):
                tokens.append(int(out.logits[0, -1].argmax()))
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            results.append(tokens)
    return results


def hf_chosen_logprobs(model_dir: str | Path, prompt: str | list[int], continuation: list[int]) -> list[float]:
    """Log-probabilities transformers' float32 model gives each token of ``continuation`` after ``prompt``.

    One forward over prompt + continuation: the reference for the logprobs a vLLM engine reports
    for tokens it generated, which equal it only if every cached K/V the engine attended to is the
    full model's (what Sirius's rewrite of the drafter's K/V must guarantee).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir))(prompt)["input_ids"] if isinstance(prompt, str) else prompt
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens = torch.tensor([ids + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens).logits[0, len(ids) - 1:-1].float(), dim=-1)
    return logprobs.gather(1, torch.tensor(continuation)[:, None])[:, 0].tolist()


def bf16_logprob_gaps(model_dir: str | Path, reference_dir: str | Path, prompts: list[str]) -> dict[str, float]:
    """``model_dir`` served as bf16 compiled at TP 1 and eager at TP 2: per run and prompt, the largest gap between
    the log-probability vLLM gave a greedy token and the one ``reference_dir``'s float32 model gives it after the same
    prefix (``hf_chosen_logprobs``). bf16 rounding keeps these under about 0.1 on the tiny test models."""
    gaps = {}
    for tp, eager in ((1, False), (2, True)):
        served = vllm_greedy_logprobs(model_dir, prompts, tp=tp, dtype="bfloat16", enforce_eager=eager)
        for prompt, (tokens, logprobs) in zip(prompts, served):
            reference = hf_chosen_logprobs(reference_dir, prompt, tokens)
            gaps[f"tp {tp} {'eager' if eager else 'compiled'}: {prompt!r}"] = max(
                abs(a - b) for a, b in zip(logprobs, reference))
    return gaps
