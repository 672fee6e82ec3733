"""Tiny causal LMs and their tokenizer, built locally for tests and benchmarks.

Nothing can be downloaded from a model hub here, so tests build their own models: a
byte-level BPE tokenizer trained with the ``tokenizers`` library on local text, and a
transformers causal LM with random weights, saved as an ordinary Hugging Face folder
that both transformers and vLLM load. The tokenizer is shared by every other tiny model
in this package (the pipelines' text encoders, the diffusion LM).
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
