"""A tiny random-weight masked-diffusion LM, saved in the folder layout ``slimserve serve`` dispatches on.

The folder is an ordinary Llama checkpoint whose ``config.json`` carries the diffusion-LM
architecture and marker of ``slimserve.server.engines.diffusion_lm``, a tokenizer with a mask
token and a chat template, so the server's text routes can be tested without vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimserve.testing.dlm import MASK_TOKEN, mask_tokenizer


def build_tiny_diffusion_lm(out_dir: str | Path, seed: int = 0, steps: int = 8, block_length: int = 4) -> Path:
    """Save a tiny random-weight masked-diffusion LM in the layout of ``engines.diffusion_lm``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimserve.server.engines.diffusion_lm import ARCHITECTURE, MARKER

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = mask_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(out))
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["architectures"] = [ARCHITECTURE]
    saved[MARKER] = {"mask_token_id": tokenizer.convert_tokens_to_ids(MASK_TOKEN), "steps": steps,
                     "block_length": block_length}
    config_path.write_text(json.dumps(saved, indent=2))
    return out
