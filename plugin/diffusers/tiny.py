"""Tiny random-weight video transformers and their inputs, built from configs (no hub access).

Shared by the tests and ``bench/vdit_attention.py``. The configs follow diffusers' own model
tests (serving.md §5.5), widened to several heads so that head fusion has groups to fuse.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

TINY_CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "wan": (
        WanTransformer3DModel,
        dict(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
    ),
    "hunyuan": (
        HunyuanVideoTransformer3DModel,
        dict(
            in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        ),
    ),
    "cogvideox": (
        CogVideoXTransformer3DModel,
        dict(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=8,
        ),
    ),
}


def tiny_transformer(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-weight transformer of ``kind`` (wan, hunyuan, cogvideox), in eval mode."""
    cls, config = TINY_CONFIGS[kind]
    torch.manual_seed(seed)
    return cls(**{**config, **overrides}).eval()


def tiny_inputs(
    kind: str, model: torch.nn.Module, frames: int = 4, height: int = 16, width: int = 16,
    text_len: int = 8, batch: int = 1, timestep: float = 500.0, seed: int = 0, text_valid: int | None = None,
) -> dict[str, torch.Tensor]:
    """Forward kwargs for ``model`` (latent frames x height x width, random text embeddings).

    ``text_valid`` pads HunyuanVideo's text: only the first ``text_valid`` tokens are real.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text_dim = cfg.text_dim if kind == "wan" else cfg.text_embed_dim
    inputs: dict[str, torch.Tensor] = {
        "encoder_hidden_states": torch.randn(batch, text_len, text_dim, generator=g),
        "timestep": torch.full((batch,), timestep),
    }
    if kind == "cogvideox":
        inputs["hidden_states"] = torch.randn(batch, frames, cfg.in_channels, height, width, generator=g)
        inputs["timestep"] = inputs["timestep"].long()
    else:
        inputs["hidden_states"] = torch.randn(batch, cfg.in_channels, frames, height, width, generator=g)
    if kind == "hunyuan":
        mask = torch.zeros(batch, text_len, dtype=torch.long)
        mask[:, : text_len if text_valid is None else text_valid] = 1
        inputs["encoder_attention_mask"] = mask
        inputs["pooled_projections"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
        inputs["guidance"] = torch.full((batch,), 3500.0)
    return inputs


def tiny_wan_pipeline(tokenizer_dir: str, seed: int = 0):
    """A complete random-weight ``WanPipeline``: tiny UMT5 encoder, Wan VAE and transformer.

    ``tokenizer_dir`` holds any local fast tokenizer (e.g. from ``slimserve.testing.train_tokenizer``).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8)
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    transformer = tiny_transformer("wan", seed=seed, in_channels=16, out_channels=16)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
