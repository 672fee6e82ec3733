"""``slimserve compress --method sparsegpt|wanda --pattern N:M``: post-training N:M pruning to the ``nm`` scheme.

The pruning itself (Wanda's scores, SparseGPT's optimal-brain-surgeon sweep) is in
``pruners.py``, shared with row-sparse pruning (``--ratio``), which goes through ``compress``.
This module turns a dense checkpoint into an ``nm`` one: every decoder linear keeps ``N`` of
every ``M`` consecutive *input* weights of each output row (N counts the weights **kept**).

The Grams come from one pass of the *dense* model (the compressor's cache), not from inputs
re-run through the already-pruned blocks below as both papers do; docs/methods/compression.md
says what that costs. Every other tensor is copied, and the checkpoint is written by the same
writer and per-layer report as ``compress``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from slimserve.errors import CheckpointError, CompressionError
from slimserve.loaders.checkpoint import CheckpointWriter, copy_aux_files, iter_tensors
from slimserve.loaders.compress.calibration import DEFAULT_SEQ_LEN, DEFAULT_WINDOWS, load_or_collect_grams
from slimserve.loaders.compress.pruners import DAMPENING, PRUNE_METHODS, sparsegpt_prune, wanda_prune
from slimserve.loaders.compress.run import LayerReport, achieved_ratios, open_dense_source, write_report
from slimserve.loaders.compress.whitening import Whitening, relative_errors
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.nm import MAX_GROUP, pack_nm

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``: N weights kept of every M consecutive inputs (0 < N < M ≤ 256)."""
    match = _PATTERN.match(text or "")
    if match is None:
        raise CompressionError(f"--pattern {text!r} is not N:M", field="--pattern",
                               expected="N:M with N the weights kept of every M consecutive inputs, e.g. 2:4")
    kept, group = int(match.group(1)), int(match.group(2))
    if not 0 < kept < group <= MAX_GROUP:
        raise CompressionError(f"--pattern {text} keeps {kept} of every {group}", field="--pattern",
                               expected=f"0 < N < M <= {MAX_GROUP} (N counts the weights KEPT, e.g. 2:4 or 4:8)")
    return kept, group


def prune_weight(method: str, weight: torch.Tensor, gram: torch.Tensor, kept: int, group: int) -> torch.Tensor:
    """One linear's weight pruned to kept:group by ``method`` (``wanda`` or ``sparsegpt``)."""
    if method == "wanda":
        return wanda_prune(weight, gram, kept, group)
    if method == "sparsegpt":
        return sparsegpt_prune(weight, gram, kept, group)
    raise CompressionError(f"unknown pruning method {method!r}", field="--method",
                           expected=" or ".join(PRUNE_METHODS))


def prune(src: str | Path, out: str | Path, *, method: str = "sparsegpt", pattern: str = "2:4",
          calib: str | Path | None = None, calib_cache: str | Path | None = None, seed: int = 0,
          calib_samples: int = DEFAULT_WINDOWS, calib_seq_len: int = DEFAULT_SEQ_LEN,
          progress: bool = True) -> Path:
    """Prune every decoder linear of the dense model ``src`` to ``pattern`` and write an ``nm`` checkpoint to ``out``.

    ``calib`` (a text file) is required: both methods weigh inputs by the calibration Grams,
    cached in ``calib_cache`` when given (shared with ``compress``'s other calibrated methods).
    """
    if method not in PRUNE_METHODS:
        raise CompressionError(f"unknown --method {method!r} for N:M pruning", field="--method",
                               expected=" or ".join(PRUNE_METHODS))
    kept, group = parse_pattern(pattern)
    if calib is None:
        raise CompressionError(f"--method {method} weighs weights by calibration activations: give --calib FILE "
                               "(plain text, e.g. a novel)", field="--calib")
    ckpt, modules = open_dense_source(src, "prune")
    for module in modules:
        in_features = ckpt.tensors[f"{module}.weight"].shape[1]
        if in_features % group:
            raise CompressionError(f"{module} has {in_features} inputs, not a multiple of {group}",
                                   tensor=f"{module}.weight", field="--pattern",
                                   expected="a group size M dividing every decoder linear's input width")
    dtype = ckpt.float_dtype or ckpt.tensors[f"{modules[0]}.weight"].dtype
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(calib_cache) if calib_cache is not None else Path(tmp) / "grams.safetensors"
        grams = load_or_collect_grams(src, calib, cache, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                                      progress=progress)
        producer = {"method": method, "pattern": f"{kept}:{group}", "kept": kept, "group": group,
                    "dampening": DAMPENING if method == "sparsegpt" else None, "ratio": None, "budget": "params",
                    "allocation": "uniform", "seed": seed, "source": Path(src).name,
                    "calibration": {"text": grams.spec.text_name, "sha256": grams.spec.text_sha256,
                                    "tokens": grams.tokens}}
        writer = CheckpointWriter(out, ckpt.config, producer=producer)
        linear_weights = {f"{m}.weight" for m in modules}
        for name, tensor in iter_tensors(ckpt):
            if name not in linear_weights:
                writer.add_tensor(name, tensor)
        reports = []
        for module in tqdm(modules, desc=f"prune ({method} {kept}:{group})", disable=not progress):
            weight = ckpt.tensor(f"{module}.weight").float()
            gram = grams[module]
            pruned = prune_weight(method, weight, gram, kept, group).to(dtype)
            try:
                tensors = pack_nm(pruned, kept, group, module=f"{module}.weight")
            except CheckpointError as err:  # a bug here, not bad input: say so instead of blaming a file
                raise CompressionError(f"{method} produced a weight breaking {kept}:{group}: {err}") from None
            fields = {"kept": kept, "group": group}
            shape = {"in_features": weight.shape[1], "out_features": weight.shape[0]}
            writer.add_module(module, "nm", tensors, **shape, **fields)
            weight_error, whitened_error = relative_errors(weight, pruned.float(),
                                                           Whitening(gram, weight.shape[1], module))
            spec = {**shape, **fields}
            reports.append(LayerReport(
                module=module, level=1.0 - kept / group, scheme="nm", fields=fields, dense_params=weight.numel(),
                stored_params=SCHEMES["nm"].stored_params(spec), dense_bytes=weight.numel() * dtype.itemsize,
                stored_bytes=SCHEMES["nm"].stored_bytes(spec, dtype.itemsize), whitened_error=whitened_error,
                weight_error=weight_error))
        writer.producer.update(achieved_ratios(reports))
    copy_aux_files(src, out)
    path = writer.finish()
    write_report(path, producer, reports)
    return path
