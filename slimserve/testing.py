"""Tiny, locally built models for tests and benchmarks.

Nothing can be downloaded from a model hub here, so tests build their own models: a
byte-level BPE tokenizer trained with the ``tokenizers`` library on local text, and a
transformers causal LM with random weights, saved as an ordinary Hugging Face folder
that both transformers and vLLM load.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

# Head dims that vLLM's CPU attention backend supports; tiny configs must use one of them.
CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def local_text(min_chars: int = 200_000) -> str:
    """Return English text available offline: docstrings of the Python standard library."""
    import argparse
    import collections
    import email
    import json as json_module
    import logging
    import pathlib
    import subprocess
    import unittest

    chunks: list[str] = []
    for module in (collections, logging, argparse, subprocess, pathlib, unittest, email, json_module):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                chunks.append(doc)
    text = "\n\n".join(dict.fromkeys(chunks))
    while len(text) < min_chars:
        text = text + "\n\n" + text
    return text


def train_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE on local text and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(local_text().split("\n\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out_dir))


def build_tiny_causal_lm(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    weight_std: float = 0.05,
) -> Path:
    """Build a random-weight Llama or Qwen3 model with a trained tokenizer in ``out_dir``.

    ``weight_std`` is larger than transformers' default init (0.02) so that greedy
    decoding of the random model is not dominated by ties and tokens differ per prompt.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    if head_dim not in CPU_ATTENTION_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported by vLLM's CPU attention: {CPU_ATTENTION_HEAD_DIMS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=weight_std,
    )
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **common)
    elif arch == "qwen3":
        config = Qwen3Config(tie_word_embeddings=True, **common)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected 'llama' or 'qwen3'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    train_tokenizer(out, vocab_size=vocab_size)
    # transformers may write its own generation defaults; greedy tests need none.
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


_GREEDY_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype=args["dtype"], enforce_eager=args["enforce_eager"], max_model_len=256,
              max_num_seqs=4, tensor_parallel_size=args["tp"], seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True)
    outs = llm.generate(args["prompts"], params, use_tqdm=False)
    print("GREEDY_TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
"""


def vllm_greedy(model_dir: str | Path, prompts: list[str], *, max_tokens: int = 16, tp: int = 1,
                dtype: str = "float32", enforce_eager: bool = True, timeout: float = 600) -> list[list[int]]:
    """Greedy token ids from real vLLM (with the slimserve plugin) in a fresh process.

    ``enforce_eager=False`` runs vLLM's default CPU mode (torch.compile with inductor).
    """
    return _run_vllm(_GREEDY_SCRIPT, "GREEDY_TOKENS=", {
        "model": str(model_dir), "prompts": prompts, "max_tokens": max_tokens, "tp": tp, "dtype": dtype,
        "enforce_eager": enforce_eager}, tp=tp, timeout=timeout)


_CHAT_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype=args["dtype"], enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"])
    outs = llm.chat([[{"role": "user", "content": q}] for q in args["questions"]], params, use_tqdm=False)
    print("CHAT_ANSWERS=" + json.dumps([o.outputs[0].text for o in outs]), flush=True)
"""


def vllm_chat(model_dir: str | Path, questions: list[str], *, max_tokens: int = 48, dtype: str = "bfloat16",
              timeout: float = 600) -> list[str]:
    """Greedy single-turn chat answers from real vLLM (the model's chat template applied), one per question."""
    return _run_vllm(_CHAT_SCRIPT, "CHAT_ANSWERS=", {"model": str(model_dir), "questions": questions,
                                                     "max_tokens": max_tokens, "dtype": dtype}, timeout=timeout)


def _run_vllm(script: str, marker: str, args: dict, *, tp: int = 1, timeout: float = 600):
    """Run a vLLM ``script`` in a fresh process and return the JSON it prints after ``marker``.

    A subprocess keeps each engine's spawned workers and global state away from the test
    process, and gives vLLM the ``__main__`` guard it needs on CPU.
    """
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
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
