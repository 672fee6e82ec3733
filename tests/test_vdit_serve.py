"""A searched Sparse-vDiT schedule saved next to a pipeline is used by `slimserve serve`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from slimserve.attention.schedule import Schedule
from slimserve.server.cli import main
from slimserve.testing.diffusers import build_tiny_wan
from slimserve.testing.live import serve_process
from slimserve.testing.metrics import metric_value

pytestmark = pytest.mark.slow


def test_served_pipeline_runs_with_its_searched_schedule(tmp_path: Path) -> None:
    model_dir = build_tiny_wan(tmp_path / "tiny-wan")  # its own folder: the search writes its schedule into it
    assert main(["vdit-search", str(model_dir), "--prompt", "a red car drives through the rain", "--steps", "2",
                 "--height", "64", "--width", "64", "--num-frames", "9", "--guidance-scale", "1",
                 "--block-size", "8", "--backend", "flex_eager", "--lambda", "0.01", "--epsilon", "10"]) == 0
    schedule = Schedule.load(model_dir)
    assert schedule.density() < 1.0

    with serve_process(model_dir, tmp_path / "server.log", served_model_name="tiny-wan-sparse") as server:
        form = {"prompt": "a cat sleeps on a sofa", "size": "64x64", "num_frames": "9", "num_inference_steps": "2",
                "guidance_scale": "1"}
        response = httpx.post(server.base_url + "/v1/videos/sync", data=form, timeout=600)
        assert response.status_code == 200, response.text
        assert response.content[4:8] == b"ftyp"
        # a request of another size does not match the searched token layout: a clear 4xx, server stays up
        other = httpx.post(server.base_url + "/v1/videos/sync", data={**form, "size": "32x32"}, timeout=600)
        assert other.status_code in (400, 422) and "layout" in other.json()["error"]["message"]
        text = httpx.get(server.base_url + "/metrics").text
        density = metric_value(text, "slimserve:attention_density", model_name="tiny-wan-sparse")
        assert density == pytest.approx(schedule.density())
        assert httpx.get(server.base_url + "/health").status_code == 200
