"""Tiny random-weight models for every engine kind, built offline from configs.

Nothing can be downloaded from a model hub, so tests, the load test and the overhead
benchmark build their own models here and save them as ordinary folders that
``slimserve serve`` dispatches on exactly like real checkpoints (``model_index.json`` for
diffusers pipelines, a marked ``config.json`` for the diffusion LM). The configurations
follow diffusers' own unit tests (see ``../shared/research/serving.md`` §5.5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from slimserve.testing import train_tokenizer

# A text encoder's tokenizer needs a pad token for ``padding="max_length"``.
_PAD_TOKEN = "<pad>"


def _text_encoder(out: Path, config_class: type, model_class: type, seed: int, **config: int) -> tuple[Any, Any]:
    """Seed, then build the pipeline's tokenizer (shared BPE plus a pad token) and text encoder."""
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tokenizer_dir = out / "tokenizer"
    train_tokenizer(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"pad_token": _PAD_TOKEN})
    encoder = model_class(config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config))
    return tokenizer, encoder


def build_tiny_pixart_sigma(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny text-to-image ``PixArtSigmaPipeline`` (a DiT) with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    out = Path(out_dir)
    tokenizer, text_encoder = _text_encoder(out, T5Config, T5EncoderModel, seed, d_model=32, d_kv=8, d_ff=37,
                                            num_layers=2, num_heads=4)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=8,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    pipe.save_pretrained(str(out))
    return out


def build_tiny_wan(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny text-to-video ``WanPipeline`` with random weights."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    tokenizer, text_encoder = _text_encoder(out, UMT5Config, UMT5EncoderModel, seed, d_model=16, d_kv=4, d_ff=32,
                                            num_layers=1, num_heads=4)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipe.save_pretrained(str(out))
    return out


_MASK_TOKEN = "<|mdm_mask|>"
_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def build_tiny_diffusion_lm(out_dir: str | Path, seed: int = 0, steps: int = 8, block_length: int = 4) -> Path:
    """Save a tiny random-weight masked-diffusion LM in the layout of ``engines.diffusion_lm``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimserve.server.engines.diffusion_lm import ARCHITECTURE, MARKER

    out = Path(out_dir)
    torch.manual_seed(seed)
    train_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.add_special_tokens({"additional_special_tokens": [_MASK_TOKEN]})
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(out))
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["architectures"] = [ARCHITECTURE]
    saved[MARKER] = {"mask_token_id": tokenizer.convert_tokens_to_ids(_MASK_TOKEN), "steps": steps,
                     "block_length": block_length}
    config_path.write_text(json.dumps(saved, indent=2))
    return out
