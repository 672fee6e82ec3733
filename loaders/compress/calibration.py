"""Calibration statistics: the Gram ``XᵀX`` of every decoder linear's input.

Every calibrated method (SVD-LLM, CoSpaDi, ROCKET) needs only ``G = XᵀX`` per linear, never
X itself: ``‖X(W − Ŵ)ᵀ‖_F = ‖(W − Ŵ)S‖_F`` with ``G = S·Sᵀ``. q/k/v read the same input and
so do gate/up, so one Gram serves each group (as ROCKET's calibration does). Grams are
accumulated in float64 from one forward pass of the dense model per calibration window,
and cached in a safetensors file that later runs (other methods, other ratios) reuse and
read lazily, one module at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from slimserve.errors import CompressionError
from slimserve.loaders.models import shared_input_module
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimserve.loaders.models import DECODER_LINEAR

    text = Path(calib_file).read_text()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = calibration_windows(tokenizer, text, samples=samples, seq_len=seq_len, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and DECODER_LINEAR.match(f"{name}.weight") and gram_key(name) == name:
            widest = module.in_features
            grams[name] = torch.zeros(widest, widest, dtype=torch.float64)
            hooks.append(module.register_forward_pre_hook(_accumulate(grams[name])))
    if not grams:
        raise CompressionError(f"{model_dir}: found no decoder linears to calibrate")
    tokens = samples * (seq_len + 1)
    narrowest_ok = MIN_TOKENS_PER_FEATURE * max(g.shape[0] for g in grams.values())
    if tokens < narrowest_ok:
        raise CompressionError(
            f"too little calibration data: {tokens} tokens for linears with up to "
            f"{narrowest_ok // MIN_TOKENS_PER_FEATURE} "
            f"inputs; the Gram XᵀX is not well posed below {narrowest_ok} tokens "
            f"(raise --calib-samples or --calib-seq-len)")
    try:
        with torch.inference_mode():
            for window in tqdm(windows, desc="calibration", disable=not progress):
                model(torch.tensor([window]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: g / tokens for name, g in grams.items()}, tokens


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
