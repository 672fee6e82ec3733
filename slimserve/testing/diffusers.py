"""Tiny random-weight DiTs built offline: video transformers with their inputs, and whole pipelines.

Nothing can be downloaded from a model hub, so tests, the load test and the benchmarks build
their own: bare video transformers (``tiny_transformer`` and ``tiny_inputs``) for attention
tests, and saved pipeline folders (``build_tiny_pixart_sigma``, ``build_tiny_wan``) that
``slimserve serve`` and ``slimserve vdit-search`` open exactly like real checkpoints. The
configs follow diffusers' own model tests, widened to several heads so that head fusion has
groups to fuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

from slimserve.testing.models import train_tokenizer

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

# A text encoder's tokenizer needs a pad token for ``padding="max_length"``.
_PAD_TOKEN = "<pad>"


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
    """Save a tiny text-to-video ``WanPipeline`` with random weights: UMT5 encoder, Wan VAE and transformer.

    The transformer is the same tiny Wan the attention tests use (4 heads, so head fusion has
    groups), with the 16 latent channels of the Wan VAE. Its rotary table covers 32 patches
    (512 px) per axis and 32 latent frames.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    tokenizer, text_encoder = _text_encoder(out, UMT5Config, UMT5EncoderModel, seed, d_model=16, d_kv=4, d_ff=32,
                                            num_layers=1, num_heads=4)
    transformer = tiny_transformer("wan", seed=seed, in_channels=16, out_channels=16)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipe.save_pretrained(str(out))
    return out
