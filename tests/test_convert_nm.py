"""``convert --from nm`` and ``--from compressed-tensors``: N:M weights written elsewhere convert bit-exactly."""

from __future__ import annotations

from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file

from slimserve.errors import CheckpointError, CompressionError
from slimserve.loaders.checkpoint import open_checkpoint, validate_checkpoint
from slimserve.loaders.converters import convert_compressed_tensors, convert_nm
from slimserve.loaders.converters.compressed_tensors import unpack_bitmask
from slimserve.loaders.models import decoder_linear_modules
from slimserve.loaders.schemes.nm import nm_mask
from slimserve.server.cli import main
from slimserve.testing.edit import edited_copy
from slimserve.testing.nm import write_compressed_tensors

FOUR_EIGHT = "model.layers.1.mlp.down_proj"  # pruned 4:8 instead of 2:4
UNPRUNED = "model.layers.0.self_attn.o_proj"  # left dense
UNTARGETED = (UNPRUNED, FOUR_EIGHT)  # not 2:4, so the compressed-tensors copies leave them dense


@pytest.fixture
def pruned_dense(narrow_llama: Path, tmp_path: Path) -> Path:
    """A dense HF copy whose decoder linears are magnitude-pruned to 2:4 (one 4:8, one untouched), zeros stored."""
    def prune(state: dict) -> None:
        for module in decoder_linear_modules(state):
            weight = state[f"{module}.weight"]
            if module == UNPRUNED:
                continue
            kept, group = (4, 8) if module == FOUR_EIGHT else (2, 4)
            state[f"{module}.weight"] = weight * nm_mask(weight, kept, group)
        # A kept weight that is exactly -0.0: still at most 2 nonzeros in its group.
        state["model.layers.0.mlp.up_proj.weight"][0, 0] = -0.0
    return edited_copy(narrow_llama, tmp_path / "pruned", tensors=prune)


def test_convert_nm_detects_each_pattern(pruned_dense, tmp_path, capsys):
    out = tmp_path / "nm"
    assert main(["convert", "--from", "nm", str(pruned_dense), str(out)]) == 0
    assert f"kept dense (no N:M pattern): {UNPRUNED}" in capsys.readouterr().out
    ckpt, dense = validate_checkpoint(out), load_file(str(pruned_dense / "model.safetensors"))
    for module, spec in ckpt.modules.items():
        expected = {UNPRUNED: ("dense", None), FOUR_EIGHT: ("nm", (4, 8))}.get(module, ("nm", (2, 4)))
        assert (spec["scheme"], (spec["kept"], spec["group"]) if spec["scheme"] == "nm" else None) == expected
        assert torch.equal(ckpt.reconstruct(module), dense[f"{module}.weight"].float()), module
    assert torch.equal(ckpt.tensor("model.norm.weight"), dense["model.norm.weight"])


def test_convert_nm_with_a_fixed_pattern_keeps_the_rest_dense(pruned_dense, tmp_path):
    ckpt = validate_checkpoint(convert_nm(pruned_dense, tmp_path / "nm", "2:4"))
    producer = ckpt.quantization_config["producer"]
    assert sorted(producer["dense_modules"]) == sorted([UNPRUNED, FOUR_EIGHT])
    assert ckpt.modules[FOUR_EIGHT]["scheme"] == "dense"
    with pytest.raises(CompressionError, match="--pattern"):
        convert_nm(pruned_dense, tmp_path / "bad", "3:2")


def test_convert_nm_refuses_a_model_without_any_pattern(narrow_llama, tmp_path):
    with pytest.raises(CheckpointError, match="no decoder linear follows any N:M pattern"):
        convert_nm(narrow_llama, tmp_path / "nm")


@pytest.mark.parametrize(("fmt", "suffix", "structure"), [("sparse-24-bitmask", False, "2:4"),
                                                          ("sparse-bitmask", False, "unstructured"),
                                                          ("sparse-bitmask", True, "2:4")])
def test_compressed_tensors_converts_to_the_same_weights(pruned_dense, tmp_path, fmt, suffix, structure):
    dense = write_compressed_tensors(pruned_dense, tmp_path / "ct", fmt, keep_weight_suffix=suffix,
                                     structure=structure, untargeted=UNTARGETED)
    ckpt = validate_checkpoint(convert_compressed_tensors(tmp_path / "ct", tmp_path / "nm"))
    assert ckpt.quantization_config is not None  # a slimserve checkpoint now, not a compressed-tensors one
    for module, spec in ckpt.modules.items():
        expected = "dense" if module in UNTARGETED else "nm"
        assert spec["scheme"] == expected, module
        if expected == "nm":
            assert (spec["kept"], spec["group"]) == (2, 4)
        assert torch.equal(ckpt.reconstruct(module), dense[f"{module}.weight"].float()), module
    assert torch.equal(ckpt.tensor("lm_head.weight"), dense["lm_head.weight"])
    assert ckpt.quantization_config["producer"]["format"] == fmt


def test_bitmask_bit_order_is_numpys_little_endian():
    mask = torch.rand(5, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bitmask(packed, 21), mask)


MODULE = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(("fmt", "edit", "match"), [
    ("sparse-24-bitmask", lambda s: s.pop(f"{MODULE}.bitmask"), rf"tensor '{MODULE}\.bitmask': missing"),
    ("sparse-bitmask", lambda s: s.pop(f"{MODULE}.row_offsets"), rf"tensor '{MODULE}\.row_offsets': missing"),
    # three columns flagged in the first group of row 0
    ("sparse-24-bitmask", lambda s: s[f"{MODULE}.bitmask"].__setitem__((0, 0), 0b0111),
     rf"tensor '{MODULE}\.bitmask'.*row 0, group 0"),
    ("sparse-24-bitmask",
     lambda s: s.__setitem__(f"{MODULE}.compressed", s[f"{MODULE}.compressed"][:, :-2].contiguous()),
     rf"tensor '{MODULE}\.compressed'.*has shape"),
    ("sparse-bitmask", lambda s: s.__setitem__(f"{MODULE}.shape", torch.tensor([7, 7])),
     rf"tensor '{MODULE}\.shape'"),
])
def test_malformed_compressed_tensors_are_named(pruned_dense, tmp_path, fmt, edit, match):
    write_compressed_tensors(pruned_dense, tmp_path / "ct", fmt, edit=edit, untargeted=UNTARGETED)
    with pytest.raises(CheckpointError, match=match):
        convert_compressed_tensors(tmp_path / "ct", tmp_path / "nm")


def test_a_weight_breaking_the_declared_pattern_is_named(narrow_llama, tmp_path):
    """sparse-bitmask of an unpruned model: declared 2:4 it names the first group; undeclared, the tensor."""
    write_compressed_tensors(narrow_llama, tmp_path / "ct", "sparse-bitmask", untargeted=UNTARGETED)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.\w+\.\w+_proj\.compressed'.*row 0, group 0"):
        convert_compressed_tensors(tmp_path / "ct", tmp_path / "nm")
    write_compressed_tensors(narrow_llama, tmp_path / "ct2", "sparse-bitmask", structure="unstructured",
                             untargeted=UNTARGETED)
    with pytest.raises(CheckpointError, match=r"compressed'.*follow no N:M pattern"):
        convert_compressed_tensors(tmp_path / "ct2", tmp_path / "nm2")


def test_quantized_or_unknown_formats_are_refused(pruned_dense, tmp_path):
    write_compressed_tensors(pruned_dense, tmp_path / "ct", "sparse-24-bitmask", untargeted=UNTARGETED)
    quantized = edited_copy(tmp_path / "ct", tmp_path / "q", config=lambda c: c["quantization_config"].update(
        config_groups={"group_0": {"weights": {"num_bits": 4}}}))
    with pytest.raises(CheckpointError, match="config_groups.*quantized"):
        convert_compressed_tensors(quantized, tmp_path / "nm")
    marlin = edited_copy(tmp_path / "ct", tmp_path / "m", config=lambda c: c["quantization_config"][
        "sparsity_config"].update(format="marlin-24"))
    with pytest.raises(CheckpointError, match="sparsity_config.format.*marlin-24"):
        convert_compressed_tensors(marlin, tmp_path / "nm2")
    assert open_checkpoint(tmp_path / "ct").quantization_config is None  # not mistaken for a slimserve checkpoint
