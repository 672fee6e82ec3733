"""What a user gets from `pip install slimserve`: declared dependencies, kernel sources, a working kernel.

The editable install the tests run from hides packaging mistakes (a source file that is not
package data is still on disk beside the module), so the slow test builds the wheel from a copy
of the tree, installs it into a bare folder and imports it from somewhere else.
"""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from slimserve.plugin.kernels import cpp

REPO = Path(__file__).resolve().parents[1]
#: What the Dockerfile copies: the build inputs of the wheel.
BUILD_INPUTS = ["pyproject.toml", "README.md", "slimserve", "loaders", "plugin", "attention", "server"]
ROOMS = ["loaders", "plugin", "attention", "server", "slimserve"]
#: Imported only behind a CUDA check, from packages that come with a CUDA build of torch/vLLM.
OPTIONAL_ACCELERATORS = {"triton", "xformers"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "slimserve"}


def test_every_runtime_import_is_declared_outside_the_test_extra() -> None:
    """A module a user's command imports must come with an extra that command's users install, not `test`."""
    project = _pyproject()["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {extra: {_requirement_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    runtime_declared = core.union(*(names for extra, names in extras.items() if extra != "test"))
    # fastapi brings starlette; a module's distribution name often differs from the module (PIL, cv2).
    brought_by = {"starlette": "fastapi"}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for room in ROOMS:
        for path in sorted((REPO / room).rglob("*.py")):
            test_helper = path.is_relative_to(REPO / "slimserve" / "testing")
            for module in sorted(_third_party_imports(path) - OPTIONAL_ACCELERATORS):
                dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
                dists |= {brought_by[module]} if module in brought_by else set()
                allowed = runtime_declared | (extras["test"] if test_helper else set())
                if not dists & allowed:
                    problems.append(f"{path.relative_to(REPO)} imports {module} (distribution {sorted(dists)})")
    assert not problems, "undeclared runtime imports:\n" + "\n".join(problems)


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    """setuptools ships only the packages pyproject lists; an unlisted one works editable and is missing installed."""
    config = _pyproject()["tool"]["setuptools"]
    folder_of = {package: Path(folder) for package, folder in config["package-dir"].items()}
    listed = set(config["packages"])
    found = set()
    for package, folder in folder_of.items():
        for init in (REPO / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                relative = init.parent.relative_to(REPO / folder).parts
                found.add(".".join((package, *relative)))
    assert found - listed == set(), f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"


def test_failed_kernel_build_warns_or_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """No silent fallback: a kernel that cannot be built is a WARNING, or an error when one is demanded."""
    monkeypatch.setenv(cpp.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(cpp.REQUIRE_ENV, raising=False)
    build = cpp.build_cpu_extension  # uncached: each call really tries to build
    with caplog.at_level(logging.WARNING, logger=cpp.__name__):
        assert build("slimserve_missing_kernel", "missing_kernel.cpp") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "missing_kernel.cpp" in warnings[0].getMessage()
    assert "PyTorch fallback" in warnings[0].getMessage() and cpp.REQUIRE_ENV in warnings[0].getMessage()

    monkeypatch.setenv(cpp.REQUIRE_ENV, "1")
    with pytest.raises(cpp.KernelBuildError, match="missing_kernel.cpp"):
        build("slimserve_missing_kernel", "missing_kernel.cpp")


def test_kernel_builds_are_cached_per_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `-march=native` build is keyed by torch, Python and the CPU's ISA and flags."""
    monkeypatch.setenv(cpp.BUILD_DIR_ENV, str(tmp_path))
    root = cpp.build_root()
    assert root.parent == tmp_path
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert cpp.cpu_isa() in root.name and cpp.cpu_flags_digest() in root.name and python in root.name


# Run in a fresh interpreter from an unrelated cwd: imports slimserve from the installed folder only.
_SMOKE = """
import os, sys, torch
import slimserve
from slimserve.plugin.kernels import cpp, ell
target = os.environ["PYTHONPATH"]
assert slimserve.__file__.startswith(target), slimserve.__file__
assert str(cpp.source_path("ell_cpu.cpp")).startswith(target)
ext = ell._cpu_kernel()
assert ext is not None and ext.__file__.startswith(os.environ["SLIMSERVE_KERNEL_DIR"]), ext
torch.manual_seed(0)
z = torch.randn(5, 40)
indices = torch.stack([torch.randperm(40)[:17] for _ in range(96)]).to(torch.int16)
values = torch.randn(96, 17)
expected = (z[:, indices.long()] * values).sum(-1)
torch.testing.assert_close(torch.ops.slimserve.ell_matmul(z, values, indices), expected, rtol=1e-5, atol=1e-5)
print("compiled kernel OK from", slimserve.__file__)
"""


@pytest.mark.slow
def test_wheel_ships_kernel_sources_and_runs_a_compiled_kernel(tmp_path: Path) -> None:
    """Build the wheel, install it outside the tree, and run the compiled ELL kernel built from its sources."""
    source = tmp_path / "src"
    source.mkdir()
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("slimserve-*.whl")
    kernels = REPO / "plugin" / "kernels"
    shipped_sources = {p.name for pattern in ("*.cpp", "*.h") for p in kernels.glob(pattern)}
    assert shipped_sources, "no kernel sources in plugin/kernels"
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {Path(n).name for n in archive.namelist() if n.startswith("slimserve/plugin/kernels/")}
    assert shipped_sources <= in_wheel, f"kernel sources missing from the wheel: {shipped_sources - in_wheel}"

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "SLIMSERVE_KERNEL_DIR": str(tmp_path / "kernels"),
           cpp.REQUIRE_ENV: "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _SMOKE], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled kernel OK" in result.stdout
    # The first start says what it built, where, how long it took and for which ISA.
    assert re.search(r"built CPU kernel ell_cpu\.cpp in \S+ in [\d.]+ s \(ISA \w+", result.stderr), result.stderr
