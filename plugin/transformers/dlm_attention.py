"""Bidirectional attention for diffusion LMs, with SparseD, through transformers' ``AttentionInterface``.

Stock transformers decoders (Llama, Qwen2, ...) become diffusion LMs by attending
bidirectionally. Registering an attention implementation named :data:`IMPLEMENTATION` does
that for any of them without touching their code:

- transformers builds no mask for an implementation it has no mask function for, so each
  layer gets ``attention_mask=None`` and runs unmasked SDPA with ``is_causal=False`` (an all-True
  4-D boolean mask, the usual way to get bidirectional attention, makes SDPA slower);
- a :class:`SparsedRequest` passed as the ``sparsed=`` keyword of the model's forward reaches
  every attention call (transformers threads extra keywords down to the attention function),
  and carries the request's step counter and each layer's chosen tiles. At the selection step
  each layer chooses its tiles once (``attention.sparsed.select_tiles``) while running dense;
  after it, the layer runs the block-sparse kernel on them.

State lives in the request object, not in the modules, so concurrent requests on one model
never see each other's masks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from slimserve.attention.sparsed import DENSE_ABOVE_DENSITY, LayerTiles, SparsedParams, SparseKernel, select_tiles

IMPLEMENTATION = "slimserve_dlm"


@dataclass
class SparsedRequest:
    """One generation's SparseD state: knobs, global step, and the tiles each layer chose."""

    params: SparsedParams
    prompt_length: int
    total_steps: int
    kernel: SparseKernel = "auto"
    dense_above: float = DENSE_ABOVE_DENSITY
    step: int = 0
    layers: dict[int, LayerTiles] = field(default_factory=dict)
    selection_seconds: float = 0.0
    selections: int = 0

    @property
    def select_step(self) -> int:
        return self.params.select_step(self.total_steps)

    def density(self) -> float:
        """Mean kept-tile fraction over the layers that chose tiles (1.0 while none has: dense)."""
        if not self.layers:
            return 1.0
        return sum(tiles.density for tiles in self.layers.values()) / len(self.layers)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor | None:
        """This layer's sparse output, or None when the step runs dense (choosing tiles if it is time)."""
        tiles = self.layers.get(layer)
        if tiles is not None:
            if self.step <= self.select_step:
                return None
            return tiles.attend(query, key, value, scale)
        if self.step >= self.select_step:
            start = time.perf_counter()
            keep = select_tiles(query, key, self.prompt_length, self.params, scale)
            self.layers[layer] = LayerTiles.build(keep, self.params.block, query.shape[2], key.shape[1],
                                                  self.dense_above, self.kernel)
            self.selection_seconds += time.perf_counter() - start
            self.selections += 1
        return None


def dlm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  sparsed: SparsedRequest | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function: ``[B, H, L, D]`` in, ``[B, L, H, D]`` out, as transformers expects.

    An explicit ``attention_mask`` (a caller's 4-D mask) is honoured densely and disables SparseD
    for the call.
    """
    output = None
    if sparsed is not None and attention_mask is None:
        output = sparsed.attend(module.layer_idx, query, key, value, scaling)
    if output is None:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False,
            enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None


_registered = False


def register() -> None:
    """Make :data:`IMPLEMENTATION` a valid ``attn_implementation`` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, dlm_attention)
    _registered = True


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded transformers model to :data:`IMPLEMENTATION` (unmasked, bidirectional attention)."""
    register()
    model.set_attn_implementation(IMPLEMENTATION)
    return model
