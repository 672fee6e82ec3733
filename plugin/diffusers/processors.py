"""Sparse-vDiT attention processors for diffusers' Wan, HunyuanVideo and CogVideoX transformers.

Each processor subclasses the model's stock processor and replaces only the main
self-attention call: q, k and v are computed exactly as the stock code does, then handed as
``(batch, heads, seq, dim)`` to the shared :class:`Controller`, which runs the scheduled (or
searched) per-head modes. Where the current (step, layer) keeps every head dense, the stock
processor runs unchanged, so a dense schedule is bit-exact with the unpatched model.

Token layouts differ (docs/methods/sparse_vdit.md, "Token layout"): Wan's self-attention sees video only (text enters
through cross-attention, left stock); HunyuanVideo puts text after the video and pads it with
an attention mask; CogVideoX puts text first and calls SDPA directly, so diffusers' backend
switch never reaches it and only a processor can.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, _get_qkv_projections

from slimserve.attention.patterns import VideoLayout


class Controller(ABC):
    """State shared by one transformer's processors: the current step and token layout.

    The runtime (``plugin.diffusers.runtime``) calls ``begin`` before each transformer forward;
    the processors ask ``dense`` and ``attend`` per layer. A schedule runs through one subclass,
    the search through another.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.step = 0
        self.layout: VideoLayout | None = None

    @abstractmethod
    def begin(self, timestep: float, layout: VideoLayout) -> None:
        """Called before each transformer forward with its timestep and token layout."""

    @abstractmethod
    def dense(self, layer: int) -> bool:
        """True when every head of ``layer`` is FULL at the current step (stock path)."""

    @abstractmethod
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of ``layer`` at the current step, ``(batch, heads, seq, dim)`` in and out."""


class _SparseVDiTProcessor:
    """The layer index and controller every Sparse-vDiT processor carries."""

    def __init__(self, layer: int, controller: Controller) -> None:
        super().__init__()
        self.layer = layer
        self.controller = controller


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (defined inline in the stock processor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseVDiTProcessor(_SparseVDiTProcessor, WanAttnProcessor):
    """For ``WanTransformer3DModel`` blocks' ``attn1`` (video-only self-attention)."""

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or self.controller.dense(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        out = self.controller.attend(
            self.layer, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanVideoSparseVDiTProcessor(_SparseVDiTProcessor, HunyuanVideoAttnProcessor2_0):
    """For HunyuanVideo's dual- and single-stream blocks: sequence ``[video, text]``."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or self.controller.dense(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        dual_stream = attn.add_q_proj is not None
        if not dual_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (
            proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            video = slice(None, -text_len) if not dual_stream else slice(None)
            rotated = [apply_rotary_emb(x[:, video], image_rotary_emb, sequence_dim=1) for x in (query, key)]
            if dual_stream:
                query, key = rotated
            else:
                query = torch.cat([rotated[0], query[:, -text_len:]], dim=1)
                key = torch.cat([rotated[1], key[:, -text_len:]], dim=1)
        if dual_stream:
            added = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            enc_q, enc_k, enc_v = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)) for proj in added)
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, enc_q), (key, enc_k), (value, enc_v)))

        key_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask.reshape(attention_mask.shape[0], -1).sum(-1)
        out = self.controller.attend(
            self.layer, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_valid
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class CogVideoXSparseVDiTProcessor(_SparseVDiTProcessor, CogVideoXAttnProcessor2_0):
    """For CogVideoX blocks' ``attn1``: sequence ``[text, video]``, RoPE on the video part."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or self.controller.dense(self.layer):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query, key, value = (
            proj(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = self.controller.attend(self.layer, query, key, value, None)
        out = out.transpose(1, 2).reshape(batch_size, -1, out.shape[1] * out.shape[3])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_len, out.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states
