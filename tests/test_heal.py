"""``slimserve heal``: distillation into the stored factors, keeping every scheme, shape and support."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import iter_tensors, open_checkpoint, validate_checkpoint
from slimserve.loaders.compress.run import compress
from slimserve.loaders.heal import HealSettings, distillation_loss, heal, state_path, trainable_tensors
from slimserve.server.cli import main

SMALL = dict(seq_len=64, batch=4, lr=3e-4, eval_windows=2)


@pytest.fixture(scope="module")
def compressed(narrow_llama: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROCKET at 50 %: dictsparse and lowrank modules (and a kept-dense one if the allocation keeps any)."""
    return compress(narrow_llama, tmp_path_factory.mktemp("heal") / "rocket", method="rocket", ratio=0.5,
                    calib=text_file, calib_samples=8, calib_seq_len=64, progress=False)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(open_checkpoint(path)))


def test_distillation_loss_is_zero_for_the_teacher_and_positive_otherwise():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = distillation_loss(logits, logits.detach())
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and logits.grad.abs().max() < 1e-6
    assert float(distillation_loss(torch.randn(2, 5, 11), logits.detach())) > 0


def test_heal_lowers_the_held_out_loss_and_changes_only_the_trained_values(compressed, narrow_llama, text_file,
                                                                           tmp_path, capsys):
    settings = HealSettings(steps=30, eval_every=10, **SMALL)
    result = heal(compressed, tmp_path / "healed", teacher=narrow_llama, text=text_file, settings=settings,
                  progress=False)
    before, after = result.held_out[0][1], result.held_out[-1][1]
    assert [s for s, _ in result.held_out] == [0, 10, 20, 30]
    assert after < 0.95 * before, result.held_out
    assert result.train_loss[-1][1] < result.train_loss[0][1]
    assert result.held_out_written < before
    assert "held-out KL" in capsys.readouterr().out

    healed = validate_checkpoint(result.path)
    source = open_checkpoint(compressed)
    assert healed.modules == source.modules  # schemes, shapes, ranks, atoms, nnz
    trained = {f"{m}.{s}" for m, s in trainable_tensors(source)}
    schemes = {spec["scheme"] for spec in source.modules.values()}
    assert {"dictsparse", "lowrank"} & schemes and trained
    old, new = _tensors(compressed), _tensors(result.path)
    assert old.keys() == new.keys()
    for name, tensor in old.items():
        assert new[name].dtype == tensor.dtype and new[name].shape == tensor.shape, name
        if name in trained:
            assert not torch.equal(new[name], tensor), f"{name} did not train"
        else:  # index tensors, dense modules, embeddings and norms: bit for bit
            assert torch.equal(new[name], tensor), name
    producer = healed.quantization_config["producer"]
    assert producer["method"] == "rocket" and producer["heal"]["steps"] == 30
    assert producer["heal"]["held_out_kl_after"] < producer["heal"]["held_out_kl_before"]
    assert json.loads((result.path / "slimserve_heal.json").read_text())["held_out"][0][0] == 0


def test_resume_gives_the_uninterrupted_result(compressed, narrow_llama, text_file, tmp_path):
    whole = heal(compressed, tmp_path / "whole", teacher=narrow_llama, text=text_file,
                 settings=HealSettings(steps=6, eval_every=3, save_every=3, **SMALL), progress=False)
    heal(compressed, tmp_path / "split", teacher=narrow_llama, text=text_file,
         settings=HealSettings(steps=3, eval_every=3, save_every=3, **SMALL), progress=False)
    assert torch.load(state_path(tmp_path / "split"), weights_only=True)["step"] == 3
    resumed = heal(compressed, tmp_path / "split", teacher=narrow_llama, text=text_file,
                   settings=HealSettings(steps=6, eval_every=3, save_every=3, **SMALL), resume=True, progress=False)
    assert resumed.held_out == whole.held_out
    a, b = _tensors(whole.path), _tensors(resumed.path)
    assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(CompressionError, match="differs in lr"):
        heal(compressed, tmp_path / "split", teacher=narrow_llama, text=text_file,
             settings=HealSettings(steps=9, **{**SMALL, "lr": 5e-4}), resume=True, progress=False)


def test_heal_refuses_dense_inputs_and_overwriting(compressed, narrow_llama, text_file):
    settings = HealSettings(steps=1, **SMALL)
    with pytest.raises(CompressionError, match="nothing to heal"):
        heal(narrow_llama, compressed.parent / "x", teacher=narrow_llama, text=text_file, settings=settings)
    with pytest.raises(CompressionError, match="give the dense model"):
        heal(compressed, compressed.parent / "y", teacher=compressed, text=text_file, settings=settings)
    with pytest.raises(CompressionError, match="being healed"):
        heal(compressed, compressed, teacher=narrow_llama, text=text_file, settings=settings)


def test_cli_heal_and_compress_heal_steps(compressed, narrow_llama, text_file, tmp_path, capsys):
    out = tmp_path / "cli-healed"
    assert main(["heal", str(compressed), str(out), "--teacher", str(narrow_llama), "--text", str(text_file),
                 "--steps", "2", "--seq-len", "64", "--batch", "2", "--eval-every", "1", "--quiet"]) == 0
    assert "held-out KL" in capsys.readouterr().out
    assert validate_checkpoint(out).quantization_config["producer"]["heal"]["batch"] == 2
    both = tmp_path / "compressed-healed"
    assert main(["compress", str(narrow_llama), str(both), "--method", "svd-llm", "--ratio", "0.4", "--calib",
                 str(text_file), "--calib-samples", "8", "--calib-seq-len", "64", "--sequential", "--heal-steps", "2",
                 "--heal-seq-len", "64", "--quiet"]) == 0
    producer = validate_checkpoint(both).quantization_config["producer"]
    assert producer["heal"]["steps"] == 2 and producer["calibration"]["sequential"] is True
    assert (both / "slimserve_report.json").is_file() and not list(tmp_path.glob("*.unhealed*"))


def test_heal_trains_a_pruned_row_sparse_checkpoint_on_its_support(narrow_llama, text_file, tmp_path):
    """Rank-0 ``lowrank_sparse`` (``compress --method sparsegpt --ratio``): only the kept weights train."""
    pruned = compress(narrow_llama, tmp_path / "sparsegpt", method="sparsegpt", ratio=0.5, calib=text_file,
                      calib_samples=8, calib_seq_len=64, progress=False)
    source = open_checkpoint(pruned)
    assert {(m, s) for m, s in trainable_tensors(source)} == {(m, "s_values") for m in source.modules}
    result = heal(pruned, tmp_path / "healed", teacher=narrow_llama, text=text_file,
                  settings=HealSettings(steps=20, eval_every=20, **SMALL), progress=False)
    assert result.held_out[-1][1] < 0.95 * result.held_out[0][1], result.held_out
    healed = validate_checkpoint(result.path)
    assert healed.modules == source.modules
    old, new = _tensors(pruned), _tensors(result.path)
    for name, tensor in old.items():
        changed = not torch.equal(new[name], tensor)
        assert changed == name.endswith(".s_values"), name  # masks, empty factors and the rest: bit for bit
