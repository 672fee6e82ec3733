"""ROCKET's factorized export (``output_dir_sep/``) to a slimserve checkpoint.

ROCKET writes every compressed projection as two ``nn.Linear`` weights applied in order
``q = q_proj_v(q_proj_u(x))``: ``…q_proj_u.weight [r, in]`` is the dense dictionary and
``…q_proj_v.weight [out, r]`` the column-sparse coefficients stored dense with zeros. Its
config.json gains ``compression_ratio`` and an ``auto_map`` to a copied modeling file; both are
dropped here (the result needs no remote code). Ranks are read from the tensor shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import CONFIG_FILE, CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.config import model_sizes
from slimserve.loaders.converters.factors import add_factor_pair, check_dense_linear, check_pair_shapes
from slimserve.loaders.models import DECODER_LINEAR, check_architecture, linear_shape

_FACTOR = re.compile(
    r"^(?P<module>.*\.layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)_(?P<which>[uv])\.weight$")


def convert_rocket(src: str | Path, out: str | Path) -> Path:
    ckpt = open_checkpoint(src)
    check_architecture(ckpt.config, str(src))
    sizes = model_sizes(ckpt.config, ckpt.path / CONFIG_FILE)
    pairs: dict[str, dict[str, str]] = {}
    writer_config = {k: v for k, v in ckpt.config.items() if k not in ("compression_ratio", "auto_map")}
    producer = {"converted_from": "rocket", "source": Path(src).name,
                "rocket_compression_ratio": ckpt.config.get("compression_ratio")}
    writer = CheckpointWriter(out, writer_config, producer=producer)
    dtype = ckpt.float_dtype
    for name, tensor in iter_tensors(ckpt):
        if m := _FACTOR.match(name):
            pairs.setdefault(m.group("module"), {})[m.group("which")] = name
        elif m := DECODER_LINEAR.match(name):
            check_dense_linear(name, tensor, sizes, file=str(ckpt.tensors[name].file))
            writer.add_module(m.group("module"), "dense", {"weight": tensor},
                              in_features=tensor.shape[1], out_features=tensor.shape[0])
        else:
            writer.add_tensor(name, tensor)
    if not pairs:
        raise CheckpointError("no ROCKET factor tensors found", file=ckpt.path,
                              expected="tensors named like 'model.layers.0.self_attn.q_proj_u.weight' / '_v.weight'")
    for module, names in sorted(pairs.items()):
        for which in "uv":
            if which not in names:
                raise CheckpointError("missing", file=ckpt.path, tensor=f"{module}_{which}.weight",
                                      expected=f"both {module}_u.weight and {module}_v.weight")
        first, second = ckpt.tensor(names["u"]), ckpt.tensor(names["v"])
        check_pair_shapes(module, first, second, linear_shape(sizes, module),
                          file=str(ckpt.tensors[names["v"]].file), first_name=names["u"], second_name=names["v"],
                          layout="ROCKET layout: _u [r, in] applied first, _v [out, r] "
                                 "(is this an SVD-LLM checkpoint?)")
        add_factor_pair(writer, module, first, second, dtype or first.dtype)
    copy_aux_files(src, out)
    return writer.finish()
