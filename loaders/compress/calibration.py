"""Calibration statistics: the Gram ``XᵀX`` of every decoder linear's input.

Every calibrated method (SVD-LLM, CoSpaDi, ROCKET) needs only ``G = XᵀX`` per linear, never
X itself: ``‖X(W − Ŵ)ᵀ‖_F = ‖(W − Ŵ)S‖_F`` with ``G = S·Sᵀ``. q/k/v read the same input and
so do gate/up, so one Gram serves each group (as ROCKET's calibration does). Grams are
accumulated in float64 from one forward pass of the dense model per calibration window,
and cached in a safetensors file that later runs (other methods, other ratios) reuse and
read lazily, one module at a time.

``SequentialGrams`` is the block-sequential alternative (``compress --sequential``, as
SparseGPT, Wanda and OATS calibrate): decoder layer l's Grams come from the inputs that the
already-compressed layers < l produce, so each layer is fitted to the activations it will
really see. The calibration activations are streamed layer by layer (the hidden states entering
layer l for every window are kept, layer l runs dense with hooks to collect its Grams, then runs
again compressed to produce layer l+1's inputs): two block forwards per layer, never a whole-model
forward per layer, and only one layer's Grams in memory. These Grams depend on what was
compressed, so they are never cached.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from slimserve.errors import CompressionError
from slimserve.loaders.models import DECODER_LINEAR, layer_index, shared_input_module
from slimserve.loaders.reference import replace_linears
from slimserve.loaders.windows import calibration_windows

# Fewer tokens than this multiple of a linear's input width is refused: the Gram would be
# rank-deficient or too noisy to whiten with.
MIN_TOKENS_PER_FEATURE = 2
# Calibration windows by default (the papers use 256 of 1024-2048 tokens; bench/README.md shows
# what 128 bought on SmolLM2-135M).
DEFAULT_WINDOWS, DEFAULT_SEQ_LEN = 32, 512


def gram_key(module: str) -> str:
    """The module whose input Gram ``module`` uses: projections reading one input share one Gram."""
    return shared_input_module(module)


@dataclass(frozen=True)
class CalibrationSpec:
    """What a Gram cache was computed from; a cache is reused only when all of it matches."""

    model: str
    text_sha256: str
    text_name: str
    samples: int
    seq_len: int
    seed: int

    def as_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


class Grams:
    """Lazy read access to a Gram cache file: ``grams[module]`` loads one float64 Gram."""

    def __init__(self, path: Path, spec: CalibrationSpec, tokens: int) -> None:
        self.path = path
        self.spec = spec
        self.tokens = tokens

    def __getitem__(self, module: str) -> torch.Tensor:
        key = gram_key(module)
        with safe_open(str(self.path), framework="pt") as f:
            if key not in f.keys():
                raise CompressionError(f"{self.path}: no calibration Gram for {key} (needed by {module})")
            return f.get_tensor(key)


def calibration_spec(model_dir: str | Path, calib_file: str | Path, *, samples: int, seq_len: int,
                     seed: int) -> CalibrationSpec:
    path = Path(calib_file)
    if not path.is_file():
        raise CompressionError(f"--calib {calib_file}: calibration text file not found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return CalibrationSpec(model=str(Path(model_dir).resolve()), text_sha256=digest, text_name=path.name,
                           samples=samples, seq_len=seq_len, seed=seed)


def load_or_collect_grams(model_dir: str | Path, calib_file: str | Path, cache: str | Path, *,
                          samples: int = DEFAULT_WINDOWS, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0,
                          progress: bool = True) -> Grams:
    """Grams from ``cache`` when it was computed from the same model, text and settings; else compute and save."""
    spec = calibration_spec(model_dir, calib_file, samples=samples, seq_len=seq_len, seed=seed)
    cache = Path(cache)
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta.get("spec", "{}")) == spec.as_metadata():
            return Grams(cache, spec, int(meta["tokens"]))
    grams, tokens = collect_grams(model_dir, calib_file, samples=samples, seq_len=seq_len, seed=seed,
                                  progress=progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file(grams, str(tmp), metadata={"spec": json.dumps(spec.as_metadata()), "tokens": str(tokens)})
    tmp.replace(cache)
    return Grams(cache, spec, tokens)


def collect_grams(model_dir: str | Path, calib_file: str | Path, *, samples: int = DEFAULT_WINDOWS,
                  seq_len: int = DEFAULT_SEQ_LEN,
                  seed: int = 0, progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """Run the dense model over the calibration windows and sum ``XᵀX`` per input group (float64).

    Each window's contribution is formed in float32 (one GEMM) and added to a float64
    accumulator, so rounding does not grow with the number of tokens. Returns the Grams
    (divided by the token count: a mean, which leaves every relative error unchanged) and the count.
    """
    model, windows = _model_and_windows(model_dir, calib_file, samples=samples, seq_len=seq_len, seed=seed)
    grams, hooks = _gram_hooks(model)
    if not grams:
        raise CompressionError(f"{model_dir}: found no decoder linears to calibrate")
    tokens = samples * (seq_len + 1)
    _check_enough_tokens(tokens, grams)
    try:
        with torch.inference_mode():
            for window in tqdm(windows, desc="calibration", disable=not progress):
                model(torch.tensor([window]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: g / tokens for name, g in grams.items()}, tokens


def _model_and_windows(model_dir: str | Path, calib_file: str | Path, *, samples: int, seq_len: int,
                       seed: int) -> tuple[torch.nn.Module, list[list[int]]]:
    """The dense model in float32 (eval mode) and the calibration windows cut from the text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = calibration_windows(tokenizer, Path(calib_file).read_text(), samples=samples, seq_len=seq_len,
                                  seed=seed)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(), windows


def _gram_hooks(model: torch.nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[Any]]:
    """A zero float64 Gram and an accumulating pre-hook for every input group of ``model``'s decoder linears.

    ``prefix`` is prepended to the module names (``model.layers.3.`` when ``model`` is one decoder layer).
    """
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for local, module in model.named_modules():
        name = f"{prefix}{local}"
        if isinstance(module, torch.nn.Linear) and DECODER_LINEAR.match(f"{name}.weight") and gram_key(name) == name:
            grams[name] = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
            hooks.append(module.register_forward_pre_hook(_accumulate(grams[name])))
    return grams, hooks


def _check_enough_tokens(tokens: int, grams: Mapping[str, torch.Tensor]) -> None:
    narrowest_ok = MIN_TOKENS_PER_FEATURE * max(g.shape[0] for g in grams.values())
    if tokens < narrowest_ok:
        raise CompressionError(
            f"too little calibration data: {tokens} tokens for linears with up to "
            f"{narrowest_ok // MIN_TOKENS_PER_FEATURE} "
            f"inputs; the Gram XᵀX is not well posed below {narrowest_ok} tokens "
            f"(raise --calib-samples or --calib-seq-len)")


class _LayerInputs(Exception):
    """Raised by the hook on decoder layer 0 once it has seen that layer's inputs: the rest need not run."""


class SequentialGrams:
    """Block-sequential Grams: layer l's from the outputs of the already-compressed layers below it.

    Drive it layer by layer, in order: ``collect(l)`` runs layer l (still dense) over the kept
    hidden states of every window and stores its Grams (``grams[module]`` reads them); ``replace``
    swaps each compressed module of layer l for its scheme's reference forward (the tensors as
    written, so the next layer sees what the checkpoint computes); the next ``collect(l + 1)``
    first re-runs layer l, now compressed, to produce layer l+1's inputs. With nothing replaced
    the Grams equal ``collect_grams``'s one-pass Grams (the same layer forwards, in the same order).
    """

    def __init__(self, model_dir: str | Path, calib_file: str | Path, *, samples: int = DEFAULT_WINDOWS,
                 seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, progress: bool = True) -> None:
        self.spec = calibration_spec(model_dir, calib_file, samples=samples, seq_len=seq_len, seed=seed)
        self.tokens = samples * (seq_len + 1)
        self.progress = progress
        self.model, windows = _model_and_windows(model_dir, calib_file, samples=samples, seq_len=seq_len, seed=seed)
        self.layers = _decoder_layers(self.model, model_dir)
        self.current: int | None = None
        self.grams: dict[str, torch.Tensor] = {}
        # Per window: the hidden states entering the current layer, and the layer call's keyword arguments
        # (rotary embeddings, causal mask), which are the same at every depth.
        self.hidden: list[torch.Tensor] = []
        self.layer_kwargs: list[dict[str, Any]] = []

        def capture(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            self.layer_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _LayerInputs

        hook = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.inference_mode():
                for window in windows:
                    try:
                        self.model(torch.tensor([window]), use_cache=False)
                    except _LayerInputs:
                        pass
        finally:
            hook.remove()

    def collect(self, layer: int) -> None:
        """Advance to decoder layer ``layer`` (the next one) and collect its Grams from the current inputs."""
        if self.current is not None and layer == self.current:
            return
        expected = 0 if self.current is None else self.current + 1
        if layer != expected:
            raise CompressionError(f"sequential calibration runs the layers in order: asked for layer {layer}, "
                                   f"expected {expected}")
        if self.current is not None:
            self.hidden = self._run_layer(self.current)  # the compressed layer feeds the next one
        self.current = layer
        prefix = f"{_layer_prefix(self.model, self.layers)}.{layer}."
        grams, hooks = _gram_hooks(self.layers[layer], prefix)
        if not grams:
            raise CompressionError(f"sequential calibration: decoder layer {layer} has no decoder linears")
        _check_enough_tokens(self.tokens, grams)
        try:
            self._run_layer(layer)
        finally:
            for hook in hooks:
                hook.remove()
        self.grams = {name: g / self.tokens for name, g in grams.items()}

    def __getitem__(self, module: str) -> torch.Tensor:
        key = gram_key(module)
        if layer_index(module) != self.current or key not in self.grams:
            raise CompressionError(f"sequential calibration: no Gram for {key} (needed by {module}); the current "
                                   f"layer is {self.current}")
        return self.grams[key]

    def replace(self, module: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Make ``module`` (of the current layer) compute its scheme's forward on ``tensors`` from now on."""
        if layer_index(module) != self.current:
            raise CompressionError(f"sequential calibration: {module} is not in the current layer {self.current}")
        if spec["scheme"] != "dense":  # a kept-dense module already computes exactly its stored weight
            replace_linears(self.model, {module: (spec, tensors)})

    def _run_layer(self, layer: int) -> list[torch.Tensor]:
        outputs = []
        with torch.inference_mode():
            for hidden, kwargs in tqdm(list(zip(self.hidden, self.layer_kwargs)), desc=f"sequential layer {layer}",
                                       disable=not self.progress, leave=False):
                out = self.layers[layer](hidden, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs


def _decoder_layers(model: torch.nn.Module, model_dir: str | Path) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise CompressionError(f"{model_dir}: sequential calibration needs the decoder layers at model.layers")
    return layers


def _layer_prefix(model: torch.nn.Module, layers: torch.nn.ModuleList) -> str:
    """The module name of the decoder layer list (``model.layers``)."""
    return next(name for name, module in model.named_modules() if module is layers)


def _accumulate(gram: torch.Tensor):
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        # XᵀX of x / max|x| in float32, rescaled in float64: no under- or overflow for tiny or huge activations.
        peak = float(x.abs().max())
        if not math.isfinite(peak):
            gram.fill_(math.inf)  # reported by the whitening, by layer name
            return
        if peak > 0:
            x = x / peak
            gram.add_((x.t() @ x).double() * peak**2)
    return hook
