"""SVD-LLM factors to a slimserve checkpoint, without unpickling any code.

SVD-LLM saves a pickled whole model (``torch.save({'model': model, 'tokenizer': ...})``)
whose projections are pairs ``…q_v_proj.weight [r, in]`` (applied first) and
``…q_u_proj.weight [out, r]`` — the opposite naming of ROCKET. slimserve never unpickles
code, so it reads that model's **state dict**: a ``.pt`` file loadable with
``torch.load(weights_only=True)`` or a ``.safetensors`` file. Export it once, where SVD-LLM's
classes are importable::

    torch.save(torch.load(PATH, weights_only=False)["model"].state_dict(), "svdllm_state.pt")

``base`` is the original dense HF model folder: its config.json and tokenizer are reused,
and tensors the state dict lacks (if any) are taken from it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CONFIG_FILE, CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.config import model_sizes
from slimserve.loaders.converters.factors import add_factor_pair, check_dense_linear, check_pair_shapes
from slimserve.loaders.models import DECODER_LINEAR, check_architecture, linear_shape

_FACTOR = re.compile(
    r"^(?P<parent>.*\.layers\.\d+\.(?:self_attn|mlp))\.(?P<proj>q|k|v|o|gate|up|down)_(?P<which>[uv])_proj\.weight$")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensors-only state dict; a pickled module is refused with instructions, a damaged file by name."""
    if not path.is_file():
        raise CheckpointError("missing", file=path, expected="an SVD-LLM state dict (.pt or .safetensors)")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for empty or truncated files
            raise CheckpointError(f"unreadable safetensors file: {err}", file=path,
                                  expected="a complete SVD-LLM state dict") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # weights_only refuses pickled classes (a whole model)
            raise CheckpointError(
                f"not a tensors-only state dict ({type(err).__name__}); export it with "
                "torch.save(torch.load(PATH, weights_only=False)['model'].state_dict(), 'state.pt') "
                "where SVD-LLM's classes are importable", file=path) from None
        except Exception as err:  # EOFError (empty), RuntimeError (truncated zip), ...: a damaged file
            detail = str(err).splitlines()[0] if str(err) else "empty file"
            raise CheckpointError(f"unreadable ({type(err).__name__}: {detail})", file=path,
                                  expected="a complete file written by torch.save(state_dict)") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError("does not hold a mapping of tensor names to tensors", file=path,
                              expected="a model state_dict")
    if not state:
        raise CheckpointError("holds no tensors", file=path, expected="a model state_dict with the SVD-LLM factors")
    return state


def convert_svdllm(src: str | Path, out: str | Path, base: str | Path) -> Path:
    src = Path(src)
    state = load_state_dict(src)
    base_ckpt = open_checkpoint(base)
    check_architecture(base_ckpt.config, str(base))
    sizes = model_sizes(base_ckpt.config, base_ckpt.path / CONFIG_FILE)
    dtype = base_ckpt.float_dtype or next(iter(state.values())).dtype
    writer = CheckpointWriter(out, base_ckpt.config, producer={"converted_from": "svd-llm", "source": src.name})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    written: set[str] = set()
    for name, tensor in state.items():
        if m := _FACTOR.match(name):
            module = f"{m.group('parent')}.{m.group('proj')}_proj"
            pairs.setdefault(module, {})[m.group("which")] = tensor
        elif m := DECODER_LINEAR.match(name):
            check_dense_linear(name, tensor, sizes, file=str(src))
            writer.add_module(m.group("module"), "dense", {"weight": tensor.to(dtype)},
                              in_features=tensor.shape[1], out_features=tensor.shape[0])
            written.add(name)
        else:
            writer.add_tensor(name, tensor)
            written.add(name)
    if not pairs:
        raise CheckpointError("no SVD-LLM factor tensors found", file=src,
                              expected="tensors named like 'model.layers.0.self_attn.q_u_proj.weight' / "
                                       "'q_v_proj.weight'")
    for module, factors in sorted(pairs.items()):
        stem = module.rsplit("_proj", 1)[0]
        for which in "uv":
            if which not in factors:
                raise CheckpointError("missing", file=src, tensor=f"{stem}_{which}_proj.weight",
                                      expected="both the _u_proj [out, r] and _v_proj [r, in] factors")
        u, v = factors["u"], factors["v"]
        check_pair_shapes(module, v, u, linear_shape(sizes, module), file=str(src),
                          first_name=f"{stem}_v_proj.weight", second_name=f"{stem}_u_proj.weight",
                          layout="SVD-LLM layout: _u_proj [out, r], _v_proj [r, in] (is this a ROCKET checkpoint?)")
        add_factor_pair(writer, module, v, u, dtype)
        written.add(f"{module}.weight")
    for name, tensor in iter_tensors(base_ckpt):
        if name not in written:
            writer.add_tensor(name, tensor)
    copy_aux_files(base, out)
    return writer.finish()
