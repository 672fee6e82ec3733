"""Checkpoints laid out as ROCKET writes them (``output_dir_sep``), made from a dense tiny model.

The converter tests and the vLLM plugin tests need the same foreign layout; it is written here
once so neither test module imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Set
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimserve.loaders.models import decoder_linear_modules


def rocket_like_factors(weight: torch.Tensor, rank: int, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An (uncalibrated) ROCKET-shaped pair: dictionary [r, in] from the SVD basis, coefficients
    [out, r] with the smallest entries of each row zeroed, stored dense as ROCKET does, in the weight's dtype
    (computed in float32: there is no bf16 SVD on CPU)."""
    _, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    dictionary = vh[:rank]
    coef = weight.float() @ dictionary.t()
    drop = coef.abs().argsort(dim=1)[:, : rank - nnz]
    return dictionary.to(weight.dtype), coef.scatter(1, drop, 0.0).to(weight.dtype)


def write_rocket_sep(dense_dir: Path, out: Path, *, keep_dense: Set[str] = frozenset(),
                     nnz_of: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Write ROCKET's ``output_dir_sep`` layout from a dense model; returns each module's ``_v @ _u``.

    Every decoder linear not in ``keep_dense`` is factored at half its smaller side with
    ``nnz_of[module]`` (default a third of the rank) non-zeros per coefficient row; the config
    carries ROCKET's extra keys and remote-code pointer, which the converter must drop.
    """
    out.mkdir(parents=True)
    state = load_file(str(dense_dir / "model.safetensors"))
    modules = decoder_linear_modules(state)
    reconstructions = {}
    sep: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if module in modules and module not in keep_dense:
            rank = min(tensor.shape) // 2
            nnz = (nnz_of or {}).get(module, rank // 3)
            u, v = rocket_like_factors(tensor, rank, nnz)
            sep[f"{module}_u.weight"], sep[f"{module}_v.weight"] = u.contiguous(), v.contiguous()
            reconstructions[module] = v @ u
        else:
            sep[name] = tensor
    save_file(sep, str(out / "model.safetensors"))
    config = json.loads((dense_dir / "config.json").read_text())
    config["compression_ratio"] = {"self_attn.q_proj": {"0": {"cr": 0.3, "ks": 2.0}}}
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_llama_svd.LlamaForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    (out / "modeling_llama_svd.py").write_text("# ROCKET's remote code; slimserve does not need it\n")
    for f in dense_dir.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return reconstructions
