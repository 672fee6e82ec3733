"""Row-sparse encodings (ELL, BITMASK): layouts, byte counts, validation, and dictsparse stored either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import FORMAT_VERSION, CheckpointWriter, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.budget import Budget
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes import sparse_rows as sr
from slimserve.loaders.schemes.base import smallest_index_dtype

# (out, k, s): s = 1 and s = k, k below one byte, k not a multiple of 8, k past uint8 indices
SHAPES = [(7, 13, 1), (5, 13, 13), (3, 5, 2), (9, 40, 17), (4, 300, 100)]
MODULE = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_and_reference_products_equal_the_dense_product(shape: tuple[int, int, int]) -> None:
    out, k, s = shape
    torch.manual_seed(0)
    dense = torch.randn(out, k)
    values, indices = sr.dense_to_ell(dense, s)
    kept = sr.ell_to_dense(values, indices, k)
    # the s largest magnitudes of each row are kept, the rest dropped
    assert ((kept != 0).sum(dim=1) == s).all()
    assert torch.equal(kept[kept != 0], dense[kept != 0])
    assert indices.dtype == smallest_index_dtype(k)

    bm_values, mask = sr.ell_to_bitmask(values, indices, k)
    assert mask.dtype == torch.uint8 and mask.shape == (out, (k + 7) // 8)
    assert torch.equal(sr.bitmask_to_dense(bm_values, mask, k), kept)
    assert torch.equal(sr.unpack_mask(mask, k), kept != 0)
    back_values, back_indices = sr.bitmask_to_ell(bm_values, mask, k)
    assert torch.equal(back_values, values) and torch.equal(back_indices, indices)
    assert sr.bitmask_problem(mask, k, s) is None and sr.ell_problem(indices, k) is None

    z = torch.randn(4, k, dtype=torch.float64)
    expected = z @ kept.double().t()
    torch.testing.assert_close(sr.ell_product(z, values, indices), expected)
    torch.testing.assert_close(sr.bitmask_product(z, bm_values, mask), expected)


def test_mask_bit_order_is_little_endian_within_a_byte() -> None:
    stored = torch.zeros(1, 11, dtype=torch.bool)
    stored[0, [0, 3, 8, 10]] = True
    assert sr.pack_mask(stored).tolist() == [[0b0000_1001, 0b0000_0101]]


def test_byte_counts_and_the_smallest_encoding() -> None:
    # k = 128, s = 42 (ROCKET at 3:1): 16 mask bytes a row against 42 uint8 indices
    assert sr.encoding_bytes("bitmask", 256, 128, 42, 2) == 256 * (42 * 2 + 16)
    assert sr.encoding_bytes("ell", 256, 128, 42, 2) == 256 * 42 * 3
    assert sr.smallest_encoding(256, 128, 42) == "bitmask"
    assert sr.smallest_encoding(256, 1024, 64) == "ell"  # a tie: 64 int16 indices = 128 mask bytes
    assert sr.smallest_encoding(256, 256, 31) == "ell"  # 31 uint8 indices < 32 mask bytes
    assert sr.smallest_encoding(256, 256, 33) == "bitmask"
    with pytest.raises(ValueError, match="unknown row-sparse encoding"):
        sr.position_bytes("csr", 1, 8, 1)


def test_mask_problems_name_the_row_and_what_was_expected() -> None:
    _, mask = sr.dense_to_bitmask(torch.randn(4, 13), 5)
    extra = mask.clone()
    extra[2, 1] |= 0b0010_0000  # column 13: past k
    assert sr.bitmask_problem(extra, 13, 5)[:2] == (2, "row 2 sets bits past column 12 (last byte " +
                                                     f"{int(extra[2, 1]):#04x})")
    missing = mask.clone()
    missing[3] = 0
    missing[3, 0] = 0b11
    row, what, expected = sr.bitmask_problem(missing, 13, 5)
    assert (row, what, expected) == (3, "row 3 has 2 bits set", "exactly 5 bits per row (one per stored value)")


def _write(out: Path, encoding: str | None, k: int = 37, s: int = 17) -> Path:
    """A one-module dictsparse checkpoint; k = 37 leaves 3 unused bits in each mask row's last byte."""
    torch.manual_seed(1)
    config = {"architectures": ["LlamaForCausalLM"], "dtype": "float32", "hidden_size": 16, "intermediate_size": 8,
              "vocab_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    writer = CheckpointWriter(out, config)
    values, indices = sr.dense_to_ell(torch.randn(16, k), s)
    fields = {} if encoding is None else {"encoding": encoding}
    writer.add_module(MODULE, "dictsparse",
                      {"dictionary": torch.randn(k, 8), "coef_values": values, "coef_indices": indices},
                      in_features=8, out_features=16, atoms=k, nnz=s, **fields)
    return writer.finish()


def test_the_writer_stores_the_smallest_encoding_and_the_budget_counts_it(tmp_path: Path) -> None:
    ckpt = validate_checkpoint(_write(tmp_path / "auto", None))
    spec = ckpt.modules[MODULE]
    assert spec["encoding"] == "bitmask"  # 5 mask bytes a row against 17 uint8 indices
    tensors = ckpt.module_tensors(MODULE)
    assert set(tensors) == {"dictionary", "coef_values", "coef_mask"}
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert SCHEMES["dictsparse"].stored_bytes(spec, 4) == stored == 37 * 8 * 4 + 16 * (17 * 4 + 5)
    plain = {"in_features": 8, "out_features": 16, "atoms": 37, "nnz": 17}
    assert Budget("bytes", 4).cost("dictsparse", plain) == stored
    # same weights either way
    ell = validate_checkpoint(_write(tmp_path / "ell", "ell"))
    x = torch.randn(3, 8)
    torch.testing.assert_close(SCHEMES["dictsparse"].forward(spec, tensors, x),
                               SCHEMES["dictsparse"].forward(ell.modules[MODULE], ell.module_tensors(MODULE), x))
    torch.testing.assert_close(SCHEMES["dictsparse"].reconstruct(spec, tensors),
                               SCHEMES["dictsparse"].reconstruct(ell.modules[MODULE], ell.module_tensors(MODULE)))
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"]["format_version"] == \
        FORMAT_VERSION == 2


def test_a_format_version_1_checkpoint_still_loads_as_ell(tmp_path: Path) -> None:
    """Written the old way: no ``encoding`` field, int16 indices, format_version 1."""
    path = _write(tmp_path / "old", "ell")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    del config["quantization_config"]["modules"][MODULE]["encoding"]
    (path / "config.json").write_text(json.dumps(config))
    state = load_file(str(path / "model.safetensors"))
    state[f"{MODULE}.coef_indices"] = state[f"{MODULE}.coef_indices"].to(torch.int16)
    save_file(state, str(path / "model.safetensors"))

    ckpt = validate_checkpoint(path)
    spec, tensors = ckpt.modules[MODULE], ckpt.module_tensors(MODULE)
    assert "encoding" not in spec and tensors["coef_indices"].dtype == torch.int16
    x = torch.randn(3, 8)
    dense = sr.ell_to_dense(tensors["coef_values"], tensors["coef_indices"], 37) @ tensors["dictionary"]
    torch.testing.assert_close(SCHEMES["dictsparse"].forward(spec, tensors, x), x @ dense.t())


@pytest.mark.parametrize(("edit", "needles"), [
    (lambda m: m[5, 4].__ior__(0b1000_0000), ["row 5 sets bits past column 36", "no bits at columns >= 37"]),
    (lambda m: m[2, 0].__ixor__(0b1111_1111), ["row 2 has", "exactly 17 bits per row"]),
])
def test_validate_names_the_mask_tensor_row_and_expectation(tmp_path: Path, edit, needles: list[str]) -> None:
    path = _write(tmp_path / "ckpt", None)
    state = load_file(str(path / "model.safetensors"))
    edit(state[f"{MODULE}.coef_mask"])
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(path)
    message = str(err.value)
    for needle in [f"tensor '{MODULE}.coef_mask'", "model.safetensors", *needles]:
        assert needle in message, message


def test_an_unknown_encoding_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "ckpt", "ell")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["modules"][MODULE]["encoding"] = "csr"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"field 'quantization_config.modules.{MODULE}.encoding'.*'csr'"):
        open_checkpoint(path)
