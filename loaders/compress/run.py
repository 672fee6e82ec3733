"""``slimserve compress``: stream a dense HF model folder into a slimserve checkpoint, layer by layer."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from slimserve.loaders.checkpoint import CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.compress.budget import check_ratio, lowrank_rank
from slimserve.loaders.compress.svd import truncated_svd
from slimserve.loaders.errors import CompressionError
from slimserve.loaders.models import check_architecture, decoder_linear_modules

METHODS = ("svd",)


def compress(src: str | Path, out: str | Path, *, method: str = "svd", ratio: float | None = None,
             rank: int | None = None, progress: bool = True) -> Path:
    """Compress every decoder linear of ``src`` into ``out``.

    ``ratio`` is the fraction of each decoder linear's parameters removed (papers' count);
    ``rank`` instead fixes one rank for every layer (capped at min(out, in)). A layer whose
    factors would not be smaller than its dense weight is kept dense, so ratio 0 reproduces
    the dense model exactly.
    """
    if method not in METHODS:
        raise CompressionError(f"unknown --method {method!r}; expected one of {', '.join(METHODS)}")
    if (ratio is None) == (rank is None):
        raise CompressionError("give exactly one of --ratio or --rank")
    if ratio is not None:
        check_ratio(ratio)
    if rank is not None and rank <= 0:
        raise CompressionError(f"--rank {rank} must be a positive integer")
    ckpt = open_checkpoint(src)
    if ckpt.quantization_config is not None:
        raise CompressionError(f"{src} is already a slimserve checkpoint; compress its dense original or `slimserve densify` it first")
    check_architecture(ckpt.config, str(src))
    modules = decoder_linear_modules(ckpt.tensors)
    if not modules:
        raise CompressionError(f"{src}: found no decoder linear weights named like 'model.layers.N.self_attn.q_proj.weight'")
    dtype = ckpt.float_dtype or ckpt.tensors[f"{modules[0]}.weight"].dtype
    producer = {"method": method, "ratio": ratio, "rank": rank, "source": Path(src).name}
    writer = CheckpointWriter(out, ckpt.config, producer=producer)
    linear_weights = {f"{m}.weight" for m in modules}
    for name, tensor in iter_tensors(ckpt):
        if name not in linear_weights:
            writer.add_tensor(name, tensor)
    for module in tqdm(modules, desc=f"compress ({method})", disable=not progress):
        weight = ckpt.tensor(f"{module}.weight")
        out_features, in_features = weight.shape
        r = rank if rank is not None else lowrank_rank(out_features, in_features, ratio)
        r = min(r, out_features, in_features)
        keep_dense = ratio == 0.0 or (ratio is not None and r * (out_features + in_features) >= out_features * in_features)
        if keep_dense:
            writer.add_module(module, "dense", {"weight": weight}, in_features=in_features, out_features=out_features)
            continue
        factors = {k: v.to(dtype) for k, v in truncated_svd(weight, r).items()}
        writer.add_module(module, "lowrank", factors, in_features=in_features, out_features=out_features, rank=r)
    copy_aux_files(src, out)
    return writer.finish()
