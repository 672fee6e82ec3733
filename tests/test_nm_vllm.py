"""N:M sparse checkpoints served by real vLLM: greedy tokens equal the densified export's, TP 1 and 2, compiled.

The checkpoint is the tiny Llama pruned by magnitude (``nm_mask``) to 2:4, with one module kept
dense and two in other patterns (4:8, 1:4) inside the fused gate_up, so fused layers mix schemes
and both kernel paths (2:4 permutes, general gathers) run. Row-parallel layers (o_proj,
down_proj) split their compressed input axis across ranks under TP 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.errors import CheckpointError
from slimserve.loaders.checkpoint import (
    densify,
    validate_checkpoint,
)
from slimserve.testing.nm import write_nm_checkpoint
from slimserve.testing.vllm import hf_greedy, vllm_greedy

PROMPTS = ["The quick brown fox", "Return a new list of", "import json", "Create a logger with"]
DENSE_MODULE = "model.layers.0.self_attn.k_proj"
PATTERN_OF = {"model.layers.1.mlp.up_proj": (4, 8), "model.layers.1.mlp.gate_proj": (1, 4)}


@pytest.fixture(scope="module")
def nm_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nm_checkpoint(tiny_llama, tmp_path_factory.mktemp("nm_llama") / "slim", pattern_of=PATTERN_OF,
                               dense_modules={DENSE_MODULE})


def test_the_checkpoint_validates_and_weighs_56_percent_at_2of4(nm_llama: Path) -> None:
    ckpt = validate_checkpoint(nm_llama)
    spec = ckpt.modules["model.layers.0.mlp.down_proj"]
    assert (spec["scheme"], spec["kept"], spec["group"]) == ("nm", 2, 4)
    assert ckpt.tensors["model.layers.0.mlp.down_proj.positions"].dtype == torch.uint8
    values = ckpt.tensor("model.layers.0.mlp.down_proj.values")
    assert values.shape == (256, 256)  # [out, in·2/4] of a [256, 512] layer


@pytest.mark.slow
def test_tp1_compiled_and_tp2_eager_match_the_densified_reference(nm_llama: Path, tiny_llama: Path,
                                                                  tmp_path: Path) -> None:
    reference = hf_greedy(densify(nm_llama, tmp_path / "dense"), PROMPTS)
    # pruning really changed the model, so equality below is not vacuous
    assert hf_greedy(tiny_llama, PROMPTS) != reference
    assert vllm_greedy(nm_llama, PROMPTS, enforce_eager=False) == reference
    assert vllm_greedy(nm_llama, PROMPTS, tp=2) == reference


def test_a_tp_split_inside_a_group_is_refused_by_name() -> None:
    from slimserve.plugin.vllm.linear import _check_input_split

    spec = {"scheme": "nm", "out_features": 8, "in_features": 24, "kept": 2, "group": 8}
    local = dict(spec, in_features=12, full_in_features=24)  # TP 2 would cut each group of 8 in the middle
    with pytest.raises(CheckpointError, match=r"\(2:8\) over 2 tensor-parallel ranks") as err:
        _check_input_split("model.layers.0.mlp.down_proj", dict(spec, full_in_features=24), local)
    assert err.value.tensor == "model.layers.0.mlp.down_proj.values"
    with pytest.raises(CheckpointError, match="m.positions"):  # whole groups, but 12 bits of positions a rank
        _check_input_split("m", dict(spec, in_features=32, full_in_features=32),
                           dict(spec, in_features=16, full_in_features=32))
    _check_input_split("m", dict(spec, in_features=64, full_in_features=64),
                       dict(spec, in_features=32, full_in_features=64))
