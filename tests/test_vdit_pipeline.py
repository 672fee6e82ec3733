"""End to end: a tiny WanPipeline folder, `slimserve vdit-search`, then generation with the schedule."""

from __future__ import annotations

import pytest
import torch

from slimserve.attention.patterns import Mode
from slimserve.attention.schedule import FILENAME, Schedule
from slimserve.errors import ScheduleError
from slimserve.plugin.diffusers import apply
from slimserve.server.cli import main
from slimserve.testing.diffusers import build_tiny_wan

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PROMPTS = ["a red car drives through the rain", "a cat sleeps on a sofa"]
CALL = dict(height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=5.0, output_type="latent")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Wan folder of its own: the search writes its schedule into it (conftest's ``tiny_wan`` stays dense)."""
    return build_tiny_wan(tmp_path_factory.mktemp("vdit") / "tiny-wan")


def generate(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(1), **CALL).frames


def test_search_cli_then_generate(model_dir, capsys):
    from diffusers import WanPipeline

    argv = [
        "vdit-search", str(model_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "3",
        "--height", "64", "--width", "64", "--num-frames", "9", "--guidance-scale", "5",
        "--block-size", "8", "--backend", "flex_eager", "--lambda", "0.01", "--epsilon", "10",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "theoretical attention-FLOP reduction" in printed and str(model_dir / FILENAME) in printed

    schedule = Schedule.load(model_dir)
    assert len(schedule.timesteps) == 3  # one entry per step although CFG calls twice per step
    assert schedule.layout.num_frames == 3 and schedule.layout.tokens_per_frame == 16
    assert schedule.density() < 1.0

    pipe = WanPipeline.from_pretrained(model_dir)
    dense = generate(pipe)
    installed = apply(pipe, model_dir, backend="flex_eager")
    sparse = generate(pipe)
    installed.remove()
    assert sparse.shape == dense.shape and torch.isfinite(sparse).all()
    assert not torch.equal(sparse, dense)

    # With eps = 0 the search keeps every head dense: the pipeline output is bit-exact.
    assert main([*argv[:-2], "--epsilon", "0", "--out", str(model_dir / "dense.json")]) == 0
    dense_schedule = Schedule.load(model_dir / "dense.json")
    assert {m for step in dense_schedule.modes for layer in step for m in layer} == {Mode.FULL}
    installed = apply(pipe, dense_schedule)
    assert torch.equal(generate(pipe), dense)
    installed.remove()


def test_foreign_file_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ScheduleError, match="bad.json, field 'format'.*expected 'slimserve.sparse_vdit' version 1"):
        Schedule.load(bad)
