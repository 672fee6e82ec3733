"""The CPU image, built with podman and run for real: a checkpoint on a mounted volume, called from the host.

``deploy/container/build-image.sh`` (``make image``) builds the repository's Dockerfile on a debootstrapped
bookworm base where no image registry is reachable. Building takes several minutes and gigabytes, so the test
is opt-in; an image that already exists is reused unless ``SLIMSERVE_CONTAINER_REBUILD=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from slimserve.loaders.checkpoint import compression_summary
from slimserve.loaders.compress.run import compress
from slimserve.testing.live import ServerProcess, free_port
from slimserve.testing.metrics import metric_value

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("IMAGE", "localhost/slimserve:cpu")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SLIMSERVE_CONTAINER_TEST") != "1",
        reason="opt-in: builds the podman image (root, ~10 min, ~10 GB under ~/.cache/slimserve/container and "
               "/var/lib/containers) and serves from it; set SLIMSERVE_CONTAINER_TEST=1",
    ),
]


def ensure_image() -> None:
    """Build the image unless it exists (or a rebuild is asked for): the build is the expensive part."""
    if (os.environ.get("SLIMSERVE_CONTAINER_REBUILD") != "1" and shutil.which("podman") is not None
            and subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode == 0):
        return
    subprocess.run([str(ROOT / "deploy" / "container" / "build-image.sh")], check=True, timeout=3600)


def readable_by_everyone(folder: Path) -> None:
    """The container runs as uid 1000 and the checkpoint was written by whoever runs the test."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def test_image_serves_a_mounted_checkpoint_to_the_host(tiny_llama: Path, tmp_path: Path) -> None:
    ensure_image()
    ckpt = compress(tiny_llama, tmp_path / "svd-0.3", ratio=0.3, progress=False)
    readable_by_everyone(ckpt)
    port, name, key = free_port(), f"slimserve-test-{os.getpid()}", "container-test-key"
    # As deploy/README.md says a user runs it: published on the host's loopback only, the key from the
    # environment (with a key the server listens on every interface of the container), the model read-only.
    host_options = subprocess.run([str(ROOT / "deploy" / "container" / "run-options.sh")], capture_output=True,
                                  text=True, check=True).stdout.split()
    # --shm-size: vLLM's engine talks to its worker through /dev/shm, and the container default (64 MiB) is too
    # small ("Insufficient space in /dev/shm for shared-memory allocation: 160 MiB required, 62 MiB free").
    argv = ["podman", "run", *host_options, "--shm-size", "1g", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8000",
            "-e", "SLIMSERVE_API_KEY", "-v", f"{ckpt}:/models/model:ro", IMAGE,
            "serve", "/models/model", "--port", "8000", "--served-model-name", "tiny-llama", "--kv-cache-gib", "1",
            "--", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4"]
    server = ServerProcess(argv, port, tmp_path / "container.log", env={**os.environ, "SLIMSERVE_API_KEY": key},
                           start_timeout=300)
    try:
        with server:
            uid = subprocess.run(["podman", "exec", name, "id", "-u"], capture_output=True, text=True, check=True)
            assert uid.stdout.strip() == "1000"
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
            assert [m.id for m in client.models.list()] == ["tiny-llama"]
            result = client.completions.create(model="tiny-llama", prompt="Return the", max_tokens=5, temperature=0)
            assert result.usage.completion_tokens == 5
            chunks = list(client.completions.create(model="tiny-llama", prompt="Return the", max_tokens=5,
                                                    temperature=0, stream=True))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=server.base_url + "/v1", api_key="bad", max_retries=0).models.list()
            # slimserve's plugins were found inside the image: the compressed layers loaded and are reported.
            metrics = httpx.get(server.base_url + "/metrics").text
            assert metric_value(metrics, "slimserve:model_compression_ratio", model_name="tiny-llama") == \
                pytest.approx(compression_summary(ckpt)["ratio"])
    finally:
        subprocess.run(["podman", "rm", "-f", "--ignore", name], check=False, capture_output=True)
