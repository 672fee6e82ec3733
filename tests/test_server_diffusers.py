"""`slimserve serve` on tiny diffusers pipelines, called with the real `openai` client over loopback.

A text-to-image DiT (PixArt-Sigma) and a text-to-video DiT (Wan) are built with random weights,
served as child processes exactly as a user would start them, and exercised through the
OpenAI images and videos APIs.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from slimserve.testing.live import ServerProcess, serve_process
from slimserve.testing.metrics import metric_value

# The openai SDK marks its videos API as deprecated; slimserve still serves the shape others standardized on.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def image_server(tiny_pixart: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("pixart_log") / "server.log"
    with serve_process(tiny_pixart, log, served_model_name="tiny-pixart") as server:
        yield server


@pytest.fixture(scope="module")
def video_server(tiny_wan: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("wan_log") / "server.log"
    with serve_process(tiny_wan, log, served_model_name="tiny-wan") as server:
        yield server


def client_for(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_image_generation_b64(image_server: ServerProcess) -> None:
    client = client_for(image_server)
    assert [m.id for m in client.models.list()] == ["tiny-pixart"]
    result = client.images.generate(model="tiny-pixart", prompt="a red square", n=2, size="32x16",
                                    extra_body={"num_inference_steps": 2, "seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [image.size for image in images] == [(32, 16), (32, 16)]
    again = client.images.generate(model="tiny-pixart", prompt="a red square", n=2, size="32x16",
                                   extra_body={"num_inference_steps": 2, "seed": 3})
    assert again.data[0].b64_json == result.data[0].b64_json  # seeded requests are reproducible


def test_image_errors(image_server: ServerProcess) -> None:
    client = client_for(image_server)
    with pytest.raises(openai.BadRequestError, match="multiples of 2"):
        client.images.generate(model="tiny-pixart", prompt="x", size="31x31", extra_body={"num_inference_steps": 1})
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="tiny-pixart", prompt="x", n=11)
    with pytest.raises(openai.NotFoundError):  # an image server has no text routes
        client.completions.create(model="tiny-pixart", prompt="x")


def test_image_metrics(image_server: ServerProcess) -> None:
    client_for(image_server).images.generate(model="tiny-pixart", prompt="x", size="16x16",
                                             extra_body={"num_inference_steps": 3})
    text = httpx.get(image_server.base_url + "/metrics").text
    labels = {"model_name": "tiny-pixart"}
    assert metric_value(text, "slimserve:e2e_request_latency_seconds_count", **labels) >= 1
    assert metric_value(text, "slimserve:request_queue_time_seconds_count", **labels) >= 1
    assert metric_value(text, "slimserve:denoise_step_seconds_count", **labels) >= 3
    assert metric_value(text, "slimserve:generated_images_total", **labels) >= 1
    assert metric_value(text, "slimserve:model_compression_ratio", **labels) == 0.0


def test_video_job_create_poll_download(video_server: ServerProcess) -> None:
    client = client_for(video_server)
    job = client.videos.create(model="tiny-wan", prompt="a cat surfing", size="32x32",
                               extra_body={"num_frames": 5, "num_inference_steps": 2, "fps": 8})
    assert job.status in ("queued", "in_progress") and job.size == "32x32"
    deadline = time.monotonic() + 60
    while job.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.videos.retrieve(job.id)
    assert job.status == "completed", job.error
    assert job.progress == 100 and job.seconds == "0.625"
    content = client.videos.download_content(job.id).read()
    assert content[4:8] == b"ftyp"
    thumbnail = client.videos.download_content(job.id, variant="thumbnail").read()
    assert Image.open(io.BytesIO(thumbnail)).size == (32, 32)
    assert job.id in [v.id for v in client.videos.list()]
    client.videos.delete(job.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(job.id)


def test_video_sync_and_metrics(video_server: ServerProcess) -> None:
    form = {"prompt": "waves", "size": "16x16", "num_frames": "5", "num_inference_steps": "2"}
    response = httpx.post(video_server.base_url + "/v1/videos/sync", data=form, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    assert response.content[4:8] == b"ftyp"
    bad = httpx.post(video_server.base_url + "/v1/videos/sync", data={**form, "size": "20x20"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
    # The tiny Wan's rotary table covers 32 patches (512 px) per axis and 32 latent frames; its pipeline's
    # defaults (832x480, 81 frames) and larger requests are the client's to change, not a server fault.
    for data, param in (({"prompt": "waves", "fps": "1"}, "size"), ({**form, "size": "528x16"}, "size"),
                        ({**form, "num_frames": "129"}, "num_frames")):
        too_big = httpx.post(video_server.base_url + "/v1/videos/sync", data=data, timeout=60)
        assert too_big.status_code == 400, too_big.text
        error = too_big.json()["error"]
        assert error["param"] == param and "rotary position table" in error["message"]
    assert httpx.post(video_server.base_url + "/v1/videos/sync", data={**form, "size": "512x16"},
                      timeout=60).status_code == 200  # the largest size it can place
    text = httpx.get(video_server.base_url + "/metrics").text
    assert metric_value(text, "slimserve:generated_video_frames_total", model_name="tiny-wan") >= 5
    assert metric_value(text, "slimserve:e2e_request_latency_seconds_count", model_name="tiny-wan") >= 1
