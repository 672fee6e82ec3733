"""R-Sparse compression: calibrated thresholds, budgeted ranks, and the model-level reference.

Per decoder linear at sparsity s and sparse share α (docs/methods/rsparse.md, "Budget per layer"):
``c = max(⌊in·(1−s)·α⌋, 1)`` exact channels expected, rank ``r`` from the remaining budget,
and the threshold t = the ``q = 1 − (1−s)·α`` quantile of the scores ``|x_i|·‖W[:, i]‖₂``
over every (token, channel) element of the calibration input, as the official code does
(one 512-token window, seed 42, by default). The low-rank factors are the top-r singular
triplets of the full W (float64 SVD), stored as ``u = U_r`` and ``vs = S_r V_rᵀ``.

The product itself is the scheme's reference forward (``loaders/schemes/rsparse.py``); a
whole checkpoint runs it through ``loaders/reference.py``, which ``eval ppl``, the search's
fitness and the vLLM tests share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.compress.calibration import gram_key
from slimserve.loaders.models import check_architecture, decoder_linear_modules
from slimserve.loaders.schemes.rsparse import budget, scores
from slimserve.loaders.windows import calibration_windows

# The official calibration: one 512-token train window, seed 42.
CALIB_SAMPLES, CALIB_SEQ_LEN, CALIB_SEED = 1, 512, 42
# The paper's uniform baseline (chosen there by grid search).
UNIFORM_ALPHA = 0.95
RECIPE_FILE = "rsparse_recipe.json"


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise CompressionError(f"--sparsity {sparsity}: expected a fraction of MACs removed in [0, 1)")
    return sparsity


def calibration_threshold(score: torch.Tensor, quantile: float) -> float:
    """The ``⌊numel·q⌋``-th smallest score (official code); −∞ when q = 0 keeps every channel exact.

    With continuous scores, exactly ``⌊numel·q⌋`` elements are ≤ t, so the calibration data
    reproduces the target input sparsity q to 1/numel.
    """
    flat = score.reshape(-1)
    k = math.floor(flat.numel() * quantile)
    if k <= 0:
        return -math.inf
    return float(flat.kthvalue(min(k, flat.numel())).values)


class LayerFactors:
    """One linear's weight, column norms and (lazily) its SVD, reused across recipes in a search."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.weight = weight.float()
        # Rounded to the checkpoint dtype it is stored in, so calibration and serving test the same norms.
        self.col_norm = self.weight.norm(dim=0).to(dtype).float()
        self._svd: tuple[torch.Tensor, torch.Tensor] | None = None

    def svd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, S·Vᵀ)`` of the full W in float32, computed once in float64."""
        if self._svd is None:
            u, s, vh = torch.linalg.svd(self.weight.double(), full_matrices=False)
            self._svd = (u.float().contiguous(), (s[:, None] * vh).float().contiguous())
        return self._svd

    def module(self, sparsity: float, alpha: float, calib_input: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
        """The rsparse tensors and fields of this layer at ``(s, α)``, thresholded on ``calib_input``."""
        out_features, in_features = self.weight.shape
        if sparsity == 0.0:
            alpha = 1.0  # the whole budget is exact channels: the layer is dense
        _, rank, quantile = budget(in_features, out_features, sparsity, alpha)
        threshold = calibration_threshold(scores(calib_input, self.col_norm), quantile)
        tensors = {"weight_t": self.weight.t().contiguous(), "col_norm": self.col_norm}
        if rank > 0:
            u, vs = self.svd()
            tensors.update(u=u[:, :rank].contiguous(), vs=vs[:rank].contiguous())
        fields = {"rank": rank, "sparsity": float(sparsity), "alpha": float(alpha), "threshold": threshold}
        return tensors, fields


def collect_inputs(model, tokenizer, text: str, *, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN,
                   seed: int = CALIB_SEED) -> dict[str, torch.Tensor]:
    """Every decoder linear's input activations ``[tokens, in]`` (float32) on the calibration windows.

    q/k/v (and gate/up) read the same input, so it is kept once under ``gram_key``.
    """
    from slimserve.loaders.models import DECODER_LINEAR

    windows = calibration_windows(tokenizer, text, samples=samples, seq_len=seq_len, seed=seed)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and DECODER_LINEAR.match(f"{name}.weight") and gram_key(name) == name:
            store = inputs.setdefault(name, [])
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, store=store: store.append(args[0].reshape(-1, args[0].shape[-1]).float())))
    try:
        with torch.inference_mode():
            for window in windows:
                model(torch.tensor([window]))
    finally:
        for hook in hooks:
            hook.remove()
    if not inputs:
        raise CompressionError("found no decoder linears to calibrate")
    return {name: torch.cat(chunks) for name, chunks in inputs.items()}


@dataclass
class Calibrated:
    """A dense model's decoder linears with their calibration inputs: what compress and search need."""

    modules: list[str]
    factors: dict[str, LayerFactors]
    inputs: dict[str, torch.Tensor]
    text_name: str
    tokens: int

    def module(self, name: str, sparsity: float, alpha: float) -> tuple[dict[str, torch.Tensor], dict]:
        return self.factors[name].module(sparsity, alpha, self.inputs[gram_key(name)])


def calibrate(src: str | Path, calib: str | Path, *, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN,
              seed: int = CALIB_SEED) -> tuple[Calibrated, torch.nn.Module]:
    """Load the dense model once, record its decoder-linear inputs on the calibration text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = open_checkpoint(src)
    if ckpt.quantization_config is not None:
        raise CompressionError(f"{src} is already a slimserve checkpoint; R-Sparse needs the dense original")
    check_architecture(ckpt.config, str(src))
    calib_path = Path(calib)
    if not calib_path.is_file():
        raise CompressionError(f"--calib {calib}: calibration text file not found")
    modules = decoder_linear_modules(ckpt.tensors)
    if not modules:
        raise CompressionError(
            f"{src}: found no decoder linear weights named like 'model.layers.N.self_attn.q_proj.weight'")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    inputs = collect_inputs(model, tokenizer, calib_path.read_text(), samples=samples, seq_len=seq_len, seed=seed)
    named = dict(model.named_modules())
    dtype = ckpt.float_dtype or ckpt.tensors[f"{modules[0]}.weight"].dtype
    factors = {m: LayerFactors(named[m].weight.detach(), dtype) for m in modules}
    tokens = next(iter(inputs.values())).shape[0]
    return Calibrated(modules, factors, inputs, calib_path.name, tokens), model


def compress_rsparse(src: str | Path, out: str | Path, *, sparsity: float, calib: str | Path,
                     alpha: float = UNIFORM_ALPHA, recipe: Mapping[str, float] | str | Path | None = None,
                     search: bool = False, search_text: str | Path | None = None, samples: int = CALIB_SAMPLES,
                     seq_len: int = CALIB_SEQ_LEN, seed: int = CALIB_SEED, progress: bool = True,
                     log: Callable[[str], None] = print, **search_options) -> Path:
    """Write an rsparse checkpoint of ``src``: every decoder linear at sparsity s, α uniform or per module.

    α comes from, in order: ``search`` (group-wise differential evolution on the calibration
    text's perplexity, saved as ``rsparse_recipe.json`` in ``out``), ``recipe`` (a mapping or a
    saved recipe file), or the uniform ``alpha``.
    """
    check_sparsity(sparsity)
    calibrated, model = calibrate(src, calib, samples=samples, seq_len=seq_len, seed=seed)
    alphas = {m: alpha for m in calibrated.modules}
    search_report = None
    if search:
        from slimserve.loaders.compress.rsparse_search import search_recipe

        result = search_recipe(model, calibrated, sparsity, text=search_text or calib, log=log, **search_options)
        alphas, search_report = result.alphas, result.report()
    elif recipe is not None:
        alphas = load_recipe(recipe, calibrated.modules)
    del model
    ckpt = open_checkpoint(src)
    dtype = ckpt.float_dtype or ckpt.tensors[f"{calibrated.modules[0]}.weight"].dtype
    producer = {"method": "rsparse", "sparsity": sparsity, "alpha": "searched" if search else
                ("recipe" if recipe is not None else alpha), "source": Path(src).name,
                "calibration": {"text": calibrated.text_name, "tokens": calibrated.tokens, "samples": samples,
                                "seq_len": seq_len, "seed": seed}}
    writer = CheckpointWriter(out, ckpt.config, producer=producer)
    linear_weights = {f"{m}.weight" for m in calibrated.modules}
    for name, tensor in iter_tensors(ckpt):
        if name not in linear_weights:
            writer.add_tensor(name, tensor)
    for module in tqdm(calibrated.modules, desc="rsparse", disable=not progress):
        tensors, fields = calibrated.module(module, sparsity, alphas[module])
        out_features, in_features = calibrated.factors[module].weight.shape
        writer.add_module(module, "rsparse", {k: v.to(dtype) for k, v in tensors.items()},
                          in_features=in_features, out_features=out_features, **fields)
    copy_aux_files(src, out)
    path = writer.finish()
    if search_report is not None:
        (path / RECIPE_FILE).write_text(json.dumps({"sparsity": sparsity, "alpha": alphas, "search": search_report},
                                                   indent=1) + "\n")
    return path


def load_recipe(recipe: Mapping[str, float] | str | Path, modules: list[str]) -> dict[str, float]:
    """Per-module α from a mapping or a saved ``rsparse_recipe.json``; every module must be listed."""
    where = "recipe"
    if not isinstance(recipe, Mapping):
        where = str(recipe)
        try:
            recipe = json.loads(Path(recipe).read_text())["alpha"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise CompressionError(f"--recipe {where}: unreadable R-Sparse recipe ({err}); expected JSON with "
                                   "an 'alpha' mapping from module name to α") from None
    missing = [m for m in modules if m not in recipe]
    if missing:
        raise CompressionError(f"{where}: no α for {missing[:3]} ({len(missing)} modules missing)")
    bad = {m: recipe[m] for m in modules if not 0.0 <= float(recipe[m]) <= 1.0}
    if bad:
        raise CompressionError(f"{where}: α outside [0, 1]: {dict(list(bad.items())[:3])}")
    return {m: float(recipe[m]) for m in modules}
