"""Deploy assets stay consistent with the code: dashboard queries name real metrics, files parse."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from slimserve.metrics import SlimserveMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def exported_sample_names() -> set[str]:
    registry = CollectorRegistry()
    metrics = SlimserveMetrics("m", registry)
    metrics.request_success("stop")
    metrics.admission_rejection("queue_full")
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "slimserve.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"slimserve:[a-z0-9_]+", expr)}
    missing = used - exported_sample_names()
    assert not missing, missing
    assert "slimserve:time_to_first_token_seconds_bucket" in used


def test_yaml_assets_parse() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"slimserve", "prometheus", "grafana"}
    kinds = [doc["kind"] for doc in yaml.safe_load_all((DEPLOY / "k8s" / "slimserve.yaml").read_text())]
    assert kinds == ["Deployment", "Service"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (apt-get install prometheus)")
def test_prometheus_config_is_valid() -> None:
    subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], check=True, capture_output=True)
