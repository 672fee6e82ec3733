"""A real Prometheus (Debian's ``prometheus`` package) scrapes a live slimserve server."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from slimserve.server.app import create_app
from slimserve.server.engines.diffusion_lm import load_diffusion_lm_engine
from slimserve.testing.live import app_in_thread, free_port

PROMETHEUS = shutil.which("prometheus")


def query(prometheus_url: str, expression: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=5)
    return response.json()["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus binary (apt-get install prometheus)")
def test_prometheus_scrapes_latency_histograms(tiny_diffusion_lm: Path, tmp_path: Path) -> None:
    engine = load_diffusion_lm_engine(tiny_diffusion_lm, "tiny-dllm")
    with app_in_thread(create_app(engine)) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        for _ in range(3):
            list(client.completions.create(model="tiny-dllm", prompt="hi", max_tokens=8, stream=True))
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            f"scrape_configs:\n  - job_name: slimserve\n    static_configs:\n"
            f"      - targets: ['{base_url.removeprefix('http://')}']\n")
        port = free_port()
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
        try:
            prometheus_url = f"http://127.0.0.1:{port}"
            expression = 'slimserve:time_to_first_token_seconds_count{model_name="tiny-dllm"}'
            deadline = time.monotonic() + 60
            result: list[dict] = []
            while time.monotonic() < deadline and not result:
                time.sleep(1)
                try:
                    result = query(prometheus_url, expression)
                except httpx.TransportError:
                    continue
            assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert float(result[0]["value"][1]) == 3
            quantile = query(prometheus_url, "histogram_quantile(0.5, slimserve:time_to_first_token_seconds_bucket)")
            assert quantile and float(quantile[0]["value"][1]) > 0
            targets = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            assert targets[0]["health"] == "up"
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
