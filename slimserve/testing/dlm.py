"""Tiny random-weight LLaDA and Dream checkpoints, written in each model's own tensor naming.

The real checkpoints (GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B) ship remote
code that transformers 5.19 does not run; slimserve loads them by renaming their tensors onto
stock Llama and Qwen2 classes. These folders have the originals' ``config.json`` keys and tensor
names (spelled out here, independently of the loader's mapping), so loading them tests the
mapping, and :class:`TinyDLM` keeps the stock model the weights came from as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from slimserve.testing.models import train_tokenizer

MASK_TOKEN = "<|mdm_mask|>"
_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)


class TinyDLM(NamedTuple):
    path: Path
    source: Any  # the stock transformers model whose weights the folder holds
    mask_token_id: int


def mask_tokenizer(out: Path) -> Any:
    """The shared test tokenizer plus the mask token and a chat template, saved into ``out``."""
    from transformers import AutoTokenizer

    train_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    return tokenizer


def _write_config(out: Path, config: dict[str, Any]) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2))


def build_tiny_llada(out_dir: str | Path, seed: int = 0, weight_std: float = 0.02) -> TinyDLM:
    """A LLaDA folder: ``model_type: llada``, OLMo-style config keys, ``model.transformer.*`` tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = mask_tokenizer(out)
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), head_dim=16, tie_word_embeddings=False,
                         initializer_range=weight_std, **_SHAPE)
    source = LlamaForCausalLM(config).eval()
    weights = {"model.transformer.wte.weight": source.model.embed_tokens.weight,
               "model.transformer.ln_f.weight": source.model.norm.weight,
               "model.transformer.ff_out.weight": source.lm_head.weight}
    for i, layer in enumerate(source.model.layers):
        prefix = f"model.transformer.blocks.{i}."
        weights.update({
            prefix + "q_proj.weight": layer.self_attn.q_proj.weight,
            prefix + "k_proj.weight": layer.self_attn.k_proj.weight,
            prefix + "v_proj.weight": layer.self_attn.v_proj.weight,
            prefix + "attn_out.weight": layer.self_attn.o_proj.weight,
            prefix + "attn_norm.weight": layer.input_layernorm.weight,
            prefix + "ff_norm.weight": layer.post_attention_layernorm.weight,
            prefix + "ff_proj.weight": layer.mlp.gate_proj.weight,  # act(ff_proj(x)) * up_proj(x)
            prefix + "up_proj.weight": layer.mlp.up_proj.weight,
            prefix + "ff_out.weight": layer.mlp.down_proj.weight,
        })
    save_file({name: tensor.detach().contiguous() for name, tensor in weights.items()}, str(out / "model.safetensors"))
    _write_config(out, {
        "model_type": "llada", "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "d_model": _SHAPE["hidden_size"], "n_heads": _SHAPE["num_attention_heads"],
        "n_kv_heads": _SHAPE["num_key_value_heads"], "n_layers": _SHAPE["num_hidden_layers"],
        "mlp_hidden_size": _SHAPE["intermediate_size"], "mlp_ratio": 4, "vocab_size": len(tokenizer),
        "embedding_size": len(tokenizer), "max_sequence_length": _SHAPE["max_position_embeddings"],
        "rope": True, "rope_theta": config.rope_parameters["rope_theta"], "rms_norm_eps": config.rms_norm_eps,
        "layer_norm_type": "rms", "block_type": "llama", "activation_type": "silu", "alibi": False,
        "include_bias": False, "include_qkv_bias": False, "weight_tying": False, "scale_logits": False,
        "attention_layer_norm": False, "input_emb_norm": False, "flash_attention": False,
        "mask_token_id": mask_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id,
    })
    return TinyDLM(out, source, mask_id)


def build_tiny_dream(out_dir: str | Path, seed: int = 0, weight_std: float = 0.02) -> TinyDLM:
    """A Dream folder: ``model_type: Dream``, Qwen2 config keys and tensor names (q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = mask_tokenizer(out)
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, initializer_range=weight_std,
                         **_SHAPE)
    source = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # the biases start at zero; make them count
        for layer in source.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    save_file({name: tensor.detach().contiguous() for name, tensor in source.state_dict().items()},
              str(out / "model.safetensors"))
    _write_config(out, {
        "model_type": "Dream", "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        **_SHAPE, "vocab_size": len(tokenizer), "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_parameters["rope_theta"], "rope_scaling": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2, "attention_dropout": 0.0,
        "use_cache": False, "mask_token_id": mask_id, "pad_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    })
    return TinyDLM(out, source, mask_id)
