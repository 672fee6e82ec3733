"""A transformers model whose compressed linears run their scheme's reference forward.

This is the plain-PyTorch ground truth at model level: ``eval ppl`` scores it, the R-Sparse
search uses it as fitness, and the vLLM tests compare greedy output with it. Each listed
module becomes a ``SchemeLinear`` calling ``Scheme.forward`` on the stored tensors, so a
scheme whose product is not ``x Wᵀ`` for one dense W (rsparse masks each token's input)
is measured as it computes, never through a dense reconstruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import iter_tensors, open_checkpoint
from slimserve.loaders.schemes import SCHEMES


class SchemeLinear(torch.nn.Module):
    """A linear layer computing ``spec``'s scheme forward on ``tensors`` (plus the layer's bias).

    ``dense_prefill`` is R-Sparse's serving protocol: a forward over several positions of a
    sequence (prefill, a perplexity window) uses the dense reconstruction, a single-position
    forward (a decode step) the scheme's forward. ``spec`` and ``tensors`` may be swapped
    between forwards (the R-Sparse search re-thresholds layers in place).
    """

    def __init__(self, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None,
                 *, dense_prefill: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.tensors = tensors
        self.bias = bias
        self.dense_prefill = dense_prefill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scheme = SCHEMES[self.spec["scheme"]]
        if self.dense_prefill and x.dim() > 1 and x.shape[-2] > 1:
            y = x @ scheme.reconstruct(self.spec, self.tensors).to(x.dtype).t()
        else:
            # Scheme forwards take a 2-D batch of tokens [N, in] (dictsparse gathers along dim 1).
            y = scheme.forward(self.spec, self.tensors, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def replace_linears(model: torch.nn.Module, modules: Mapping[str, tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]],
                    *, dense_prefill: bool = False) -> torch.nn.Module:
    """Swap each named linear of ``model`` for a ``SchemeLinear`` with its ``(spec, tensors)``, keeping its bias."""
    named = dict(model.named_modules())
    for name, (spec, tensors) in modules.items():
        parent, _, leaf = name.rpartition(".")
        setattr(named[parent], leaf, SchemeLinear(spec, tensors, named[name].bias, dense_prefill=dense_prefill))
    return model


def reference_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, *,
                    dense_prefill: bool = False) -> torch.nn.Module:
    """A transformers causal LM of a dense folder or a slimserve checkpoint, in eval mode.

    A dense folder loads as usual. A checkpoint's ordinary tensors (embeddings, norms, biases)
    load into a model built from its config, and each listed module runs its scheme's forward
    on its stored tensors (float tensors cast to ``dtype``, index tensors kept).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = open_checkpoint(model_dir)
    if ckpt.quantization_config is None:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    config = AutoConfig.for_model(**{k: v for k, v in ckpt.config.items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    module_tensors: dict[str, dict[str, torch.Tensor]] = {m: {} for m in ckpt.modules}
    for name, tensor in iter_tensors(ckpt):
        module = ckpt.module_of(name)
        value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if module is None:
            state[name] = value
        else:
            module_tensors[module][name[len(module) + 1:]] = value
    missing = set(model.state_dict()) - set(state) - {f"{m}.weight" for m in ckpt.modules}
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise CompressionError(f"no stored tensors for {sorted(missing)[:3]}", file=model_dir,
                               expected="every parameter of the model, or a listed module's tensors in its place")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    replace_linears(model, {m: (spec, module_tensors[m]) for m, spec in ckpt.modules.items()},
                    dense_prefill=dense_prefill)
    return model.eval()
