"""ROCKET and SVD-LLM checkpoints, laid out as those projects write them, convert exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import open_checkpoint, validate_checkpoint
from slimserve.loaders.converters import convert_rocket, convert_svdllm
from slimserve.loaders.models import decoder_linear_modules
from slimserve.testing.rocket_layout import write_rocket_sep


def test_rocket_round_trip(tiny_llama: Path, tmp_path: Path) -> None:
    keep = {"model.layers.0.self_attn.k_proj"}
    # one module is nearly dense: storing its coefficients sparse would cost more than lowrank
    dense_ish = "model.layers.1.mlp.up_proj"
    expected = write_rocket_sep(tiny_llama, tmp_path / "sep", keep_dense=keep, nnz_of={dense_ish: 127})
    out = convert_rocket(tmp_path / "sep", tmp_path / "slim")
    ckpt = validate_checkpoint(out)
    assert "compression_ratio" not in ckpt.config and "auto_map" not in ckpt.config
    assert not (out / "modeling_llama_svd.py").exists()
    schemes = {m: s["scheme"] for m, s in ckpt.modules.items()}
    assert schemes["model.layers.0.self_attn.k_proj"] == "dense"
    assert schemes[dense_ish] == "lowrank"
    assert schemes["model.layers.0.self_attn.q_proj"] == "dictsparse"
    assert ckpt.modules["model.layers.0.self_attn.q_proj"]["nnz"] == 128 // 3
    for module, reference in expected.items():
        torch.testing.assert_close(ckpt.reconstruct(module), reference, rtol=0, atol=1e-6)
    dense = open_checkpoint(tiny_llama)
    torch.testing.assert_close(ckpt.reconstruct("model.layers.0.self_attn.k_proj"),
                               dense.tensor("model.layers.0.self_attn.k_proj.weight"), rtol=0, atol=0)


def test_rocket_wrong_orientation_fails_loudly(tiny_llama: Path, tmp_path: Path) -> None:
    write_rocket_sep(tiny_llama, tmp_path / "sep")
    state = load_file(str(tmp_path / "sep" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    # SVD-LLM's orientation under ROCKET's names: _u holds [out, r], _v holds [r, in]
    state[f"{name}_u.weight"], state[f"{name}_v.weight"] = state[f"{name}_v.weight"], state[f"{name}_u.weight"]
    save_file(state, str(tmp_path / "sep" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}_v.weight.*ROCKET layout"):
        convert_rocket(tmp_path / "sep", tmp_path / "slim")


def svdllm_state_dict(dense_dir: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SVD-LLM's module names and orientation: ``q_u_proj [out, r]``, ``q_v_proj [r, in]``."""
    state = load_file(str(dense_dir / "model.safetensors"))
    out, expected = {}, {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if module in decoder_linear_modules([name]):
            u, s, vh = torch.linalg.svd(tensor, full_matrices=False)
            stem = module.removesuffix("_proj")
            out[f"{stem}_u_proj.weight"] = (u[:, :rank] * s[:rank]).contiguous()
            out[f"{stem}_v_proj.weight"] = vh[:rank].contiguous()
            expected[module] = out[f"{stem}_u_proj.weight"] @ out[f"{stem}_v_proj.weight"]
        else:
            out[name] = tensor
    return out, expected


def test_svdllm_round_trip(tiny_llama: Path, tmp_path: Path) -> None:
    state, expected = svdllm_state_dict(tiny_llama, rank=40)
    torch.save(state, tmp_path / "svdllm_state.pt")
    out = convert_svdllm(tmp_path / "svdllm_state.pt", tmp_path / "slim", base=tiny_llama)
    ckpt = validate_checkpoint(out)
    assert {s["scheme"] for s in ckpt.modules.values()} == {"lowrank"}
    assert all(s["rank"] == 40 for s in ckpt.modules.values())
    for module, reference in expected.items():
        torch.testing.assert_close(ckpt.reconstruct(module), reference, rtol=0, atol=1e-6)
    assert torch.equal(ckpt.tensor("model.norm.weight"), state["model.norm.weight"])


def test_svdllm_refuses_pickled_modules_and_wrong_orientation(tiny_llama: Path, tmp_path: Path) -> None:
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "whole_model.pt")
    with pytest.raises(CheckpointError, match="state_dict"):
        convert_svdllm(tmp_path / "whole_model.pt", tmp_path / "a", base=tiny_llama)
    state, _ = svdllm_state_dict(tiny_llama, rank=40)
    # ROCKET's naming (_u applied first) read as SVD-LLM's: the two factors trade names
    u, v = "model.layers.1.self_attn.o_u_proj.weight", "model.layers.1.self_attn.o_v_proj.weight"
    state[u], state[v] = state[v], state[u]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"o_u_proj.weight.*SVD-LLM layout"):
        convert_svdllm(tmp_path / "bad.pt", tmp_path / "b", base=tiny_llama)
