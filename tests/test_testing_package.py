"""The test infrastructure stays where it belongs: in ``slimserve.testing``, never in shipped code.

Shipped rooms must not import test helpers (a server that imports a tiny-model builder ships
test code), test modules must not import each other (what they share lives in the package or
in ``conftest.py``), and the light helpers must not drag vLLM or diffusers into a test process.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimserve.testing.live import SLIMSERVE, serve_process
from slimserve.testing.metrics import metric_value

REPO = Path(__file__).resolve().parents[1]
SHIPPED_ROOMS = ("loaders", "plugin", "attention", "server")


def imported_modules(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` names (relative ones with their dots)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_shipped_code_never_imports_the_testing_package() -> None:
    offenders = [
        f"{path.relative_to(REPO)} imports {name}"
        for room in SHIPPED_ROOMS
        for path in sorted((REPO / room).rglob("*.py"))
        for name in imported_modules(path)
        if name == "slimserve.testing" or name.startswith("slimserve.testing.")
    ]
    assert not offenders, offenders


def test_no_test_module_imports_another() -> None:
    test_modules = {path.stem for path in (REPO / "tests").glob("*.py")}
    offenders = [
        f"tests/{path.name} imports {name}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] in test_modules | {"tests"} or name.startswith(".")
    ]
    assert not offenders, offenders


def test_light_helpers_load_neither_vllm_nor_diffusers_nor_the_server() -> None:
    probe = (
        "import json, sys\n"
        "import slimserve.testing, slimserve.testing.models, slimserve.testing.vllm, slimserve.testing.metrics\n"
        "print(json.dumps([m for m in ('vllm', 'diffusers', 'fastapi') if m in sys.modules]))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_metric_value_reads_one_labelled_sample() -> None:
    text = (
        "# HELP slimserve:request_success_total Finished requests.\n"
        "# TYPE slimserve:request_success_total counter\n"
        'slimserve:request_success_total{finished_reason="stop",model_name="m"} 3.0\n'
        'slimserve:request_success_total{finished_reason="length",model_name="m"} 5.0\n'
        "slimserve:up 1.0\n"
    )
    assert metric_value(text, "slimserve:request_success_total", finished_reason="length") == 5.0
    assert metric_value(text, "slimserve:request_success_total", model_name="m") == 3.0  # the first match
    assert metric_value(text, "slimserve:up") == 1.0
    assert metric_value(text, "slimserve:request_success_total", finished_reason="abort") == 0.0
    assert metric_value(text, "slimserve:request_success") == 0.0  # a prefix of a name is not the name


@pytest.mark.parametrize(("kwargs", "tail"), [
    ({}, []),
    ({"served_model_name": "tiny", "api_key": "k", "engine_args": ["--dtype", "float32"]},
     ["--served-model-name", "tiny", "--api-key", "k", "--", "--dtype", "float32"]),
])
def test_serve_process_starts_slimserve_serve_on_loopback(kwargs: dict, tail: list[str], tmp_path: Path) -> None:
    server = serve_process(tmp_path / "model", tmp_path / "server.log", **kwargs)
    assert server.process is None  # built, not started
    assert server.argv == [SLIMSERVE, "serve", str(tmp_path / "model"), "--host", "127.0.0.1",
                           "--port", str(server.port), *tail]
    assert server.base_url == f"http://127.0.0.1:{server.port}"
    assert Path(SLIMSERVE).exists()
