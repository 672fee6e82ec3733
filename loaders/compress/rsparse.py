"""R-Sparse compression: calibrated thresholds, budgeted ranks, and the model-level reference.

Per decoder linear at sparsity s and sparse share α (../shared/research/rsparse.md §2-3):
``c = max(⌊in·(1−s)·α⌋, 1)`` exact channels expected, rank ``r`` from the remaining budget,
and the threshold t = the ``q = 1 − (1−s)·α`` quantile of the scores ``|x_i|·‖W[:, i]‖₂``
over every (token, channel) element of the calibration input, as the official code does
(one 512-token window, seed 42, by default). The low-rank factors are the top-r singular
triplets of the full W (float64 SVD), stored as ``u = U_r`` and ``vs = S_r V_rᵀ``.

``RSparseLinear`` / ``rsparse_model`` run the same product inside a transformers model (the
reference for vLLM's greedy output, the perplexity of a checkpoint, and the search's
fitness), with prefill dense and single-token steps sparse, or every token sparse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slimserve.loaders.checkpoint import CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.compress.calibration import calibration_windows, gram_key
from slimserve.errors import CompressionError
from slimserve.loaders.models import check_architecture, decoder_linear_modules
from slimserve.loaders.schemes.rsparse import RSparseScheme, budget, scores

SCHEME = RSparseScheme()
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
        raise CompressionError(f"{src}: found no decoder linear weights named like 'model.layers.N.self_attn.q_proj.weight'")
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


class RSparseLinear(torch.nn.Module):
    """A transformers linear replaced by the R-Sparse reference product.

    ``sparse_prefill=False`` is the serving protocol: a forward over several positions of a
    sequence (prefill, perplexity windows) is dense, a single-position forward (decode) is sparse.
    """

    def __init__(self, spec: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 sparse_prefill: bool) -> None:
        super().__init__()
        self.spec = spec
        self.tensors = tensors
        self.bias = bias
        self.sparse_prefill = sparse_prefill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse_prefill or x.shape[-2] == 1:
            y = SCHEME.forward(self.spec, self.tensors, x)
        else:
            y = x @ self.tensors["weight_t"].to(x.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def replace_linears(model: torch.nn.Module, modules: Mapping[str, tuple[dict, dict[str, torch.Tensor]]],
                    sparse_prefill: bool) -> torch.nn.Module:
    """Swap each named linear of ``model`` for an ``RSparseLinear`` with the given spec and tensors."""
    named = dict(model.named_modules())
    for name, (spec, tensors) in modules.items():
        parent, _, leaf = name.rpartition(".")
        old = named[name]
        setattr(named[parent], leaf, RSparseLinear(spec, tensors, old.bias, sparse_prefill))
    return model


def rsparse_model(model_dir: str | Path, *, sparse_prefill: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers model of an rsparse checkpoint running the reference R-Sparse forward."""
    from slimserve.loaders.eval import load_dense_model

    ckpt = open_checkpoint(model_dir)
    model = load_dense_model(model_dir, dtype)
    modules = {m: (spec, {k: v.to(dtype) for k, v in ckpt.module_tensors(m).items()})
               for m, spec in ckpt.modules.items() if spec["scheme"] == "rsparse"}
    return replace_linears(model, modules, sparse_prefill)


def window_ids(tokenizer, text: str, *, windows: int, seq_len: int) -> list[list[int]]:
    """Consecutive windows of BOS + ``seq_len`` tokens from the text's start (as loaders/eval.py counts them)."""
    ids = tokenizer(text[: windows * seq_len * 12], add_special_tokens=False).input_ids
    if len(ids) < windows * seq_len:
        raise CompressionError(f"text has {len(ids)} tokens, need {windows * seq_len} ({windows} windows of {seq_len})")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [[bos] + ids[w * seq_len:(w + 1) * seq_len] for w in range(windows)]


def model_perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    """Token perplexity of ``model`` over the windows (every text token scored, BOS first)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            chunk = torch.tensor([window])
            logits = model(chunk).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += len(window) - 1
    return math.exp(total / count)
