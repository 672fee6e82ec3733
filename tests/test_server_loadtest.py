"""The locustfile runs headless against a live tiny server and reports TTFT rows."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from slimserve.server.app import create_app
from slimserve.server.engines.diffusion_lm import load_diffusion_lm_engine
from slimserve.testing.live import app_in_thread

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"


def test_locust_headless_reports_ttft(tiny_diffusion_lm: Path, tmp_path: Path) -> None:
    engine = load_diffusion_lm_engine(tiny_diffusion_lm, "tiny-dllm")
    with app_in_thread(create_app(engine)) as base_url:
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", base_url, "--headless",
             "-u", "2", "-r", "2", "-t", "8s", "--csv", str(tmp_path / "out"), "--only-summary",
             "--stop-timeout", "5"],
            capture_output=True, text=True, timeout=90, env={"SLIMSERVE_MAX_TOKENS": "4", "PATH": ""},
        )
    rows = {(row["Type"], row["Name"]): row for row in csv.DictReader((tmp_path / "out_stats.csv").open())}
    streamed = [name for kind, name in rows if kind == "POST"]
    assert streamed, run.stderr[-3000:]
    for path in streamed:  # every streamed route got client-side TTFT, TPOT and e2e rows
        for metric in ("ttft", "tpot", "e2e"):
            assert int(rows[("METRIC", f"{metric} {path}")]["Request Count"]) > 0, (metric, path)
    assert all(int(row["Failure Count"]) == 0 for row in rows.values()), run.stderr[-3000:]
