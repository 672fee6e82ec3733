"""Locust headless against live tiny servers: the locustfile alone, and `make loadtest`'s report vs /metrics."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

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


# ---- make loadtest: the report against a live server, checked against the server's own histograms ----

RUN = LOCUSTFILE.parent / "run.py"


def _report_module() -> ModuleType:
    """``loadtest/report.py`` (a script folder, not a package), loaded under a name of its own."""
    spec = importlib.util.spec_from_file_location("slimserve_loadtest_report", LOCUSTFILE.parent / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_histogram_quantile_and_median_bucket_follow_prometheus() -> None:
    report = _report_module()
    # 10 observations: 2 <= 0.01, 8 <= 0.025, 10 <= 0.05 (cumulative, as /metrics publishes them)
    buckets = {0.01: 2.0, 0.025: 8.0, 0.05: 10.0, math.inf: 10.0}
    assert report.median_bucket(buckets) == (0.01, 0.025)
    # rank 5 sits 3/6 of the way through the (0.01, 0.025] bucket
    assert report.histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.015 * 3 / 6)
    assert report.histogram_quantile(0.99, {0.01: 0.0, math.inf: 4.0}) == 0.01  # +Inf bucket: highest finite bound
    text = ('slimserve:x_bucket{model_name="a",le="0.01"} 1.0\nslimserve:x_bucket{model_name="b",le="0.01"} 2.0\n'
            'slimserve:x_sum{model_name="a"} 0.5\nslimserve:x_sum{model_name="b"} 0.25\n')
    assert report.histogram_buckets(text, "slimserve:x") == {0.01: 3.0}
    assert report.histogram_total(text, "slimserve:x", "_sum") == 0.75


@pytest.mark.slow
def test_make_loadtest_report_agrees_with_server_histograms(tmp_path: Path) -> None:
    """A short overloaded run: every request answered (some 429), client TTFT/ITL agree with /metrics, plots written.

    The trivial engine (30 ms per token, clear of vLLM's bucket bounds at 20/25/40/50 ms) serves one
    request at a time with one more allowed to wait, so three users overload it.
    """
    run = subprocess.run(
        [sys.executable, str(RUN), "--model", "trivial", "--scenario", "streaming-chat", "--users", "3",
         "--spawn-rate", "3", "--duration", "15s", "--step-ms", "30", "--max-tokens", "6", "--max-running", "1",
         "--max-waiting", "1", "--request-timeout", "20", "--window", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = _report_module()
    result = report.write_report(tmp_path, window=3)  # the numbers behind the report run.py wrote
    accounting = result["accounting"]
    assert accounting.sent > 5 and accounting.lost_or_hung == 0
    assert accounting.statuses[429] > 0 and accounting.statuses[200] > 0, accounting
    assert set(accounting.statuses) <= {200, 429}, accounting
    agreements = {a.metric: a for a in result["agreements"]}
    assert set(agreements) == {"ttft", "itl"}
    for agreement in agreements.values():
        assert agreement.counts_match and agreement.agrees, agreement
    # 30 ms per token: the server's ITL median bucket is (25, 50] ms and its mean close to 30 ms
    assert agreements["itl"].server_bucket_ms == (25.0, 50.0)
    assert 29 <= agreements["itl"].server_mean_ms < 45
    text = (tmp_path / "report.md").read_text()
    assert f"Sent: **{accounting.sent}**" in text and "Overload (429" in text and "Lost or hung" in text
    for name in ("ttft_over_time.png", "itl_over_time.png", "e2e_over_time.png", "throughput_errors.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
        assert f"({name})" in text
    assert (tmp_path / "locust_stats.csv").exists() and (tmp_path / "locust_stats_history.csv").exists()
