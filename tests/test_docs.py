"""The docs travel with the repository: no reference outside it, and the architecture names real paths."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
# Built in two pieces so that this file does not match itself.
OUTSIDE = "../" + "shared"
TOP_LEVEL = ("slimserve", "loaders", "plugin", "attention", "server", "docs", "bench", "tests", "deploy", "loadtest")
REPO_PATH = re.compile(r"(?<![\w./-])(?:" + "|".join(TOP_LEVEL) + r")/[\w./-]*")
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def test_no_tracked_file_points_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offenders, f"references to {OUTSIDE} (a clone does not have it):\n" + "\n".join(offenders)


def test_every_path_the_architecture_names_exists() -> None:
    text = ARCHITECTURE.read_text()
    named = {match.rstrip(".,:;") for match in REPO_PATH.findall(text)}
    assert len(named) > 20, "the architecture page should name the files on each path"
    missing = sorted(name for name in named if not (REPO / name).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_architecture_draws_every_room() -> None:
    text = ARCHITECTURE.read_text()
    for room in ("loaders/", "plugin/", "attention/", "server/", "slimserve/errors.py", "slimserve/metrics.py",
                 "slimserve/testing/"):
        assert f"`{room}`" in text, f"docs/ARCHITECTURE.md does not describe {room}"


def test_every_doc_the_code_cites_exists() -> None:
    """Docstrings and READMEs cite method notes as ``docs/<name>.md``; each must be in the repository."""
    cited: dict[str, str] = {}
    for path in _tracked_files():
        if path.suffix in (".py", ".md", ".toml", ".cpp") and "docs/" in (text := path.read_text(errors="replace")):
            for name in re.findall(r"(?<![\w./-])docs/[\w./-]*\.md", text):
                cited.setdefault(name, str(path.relative_to(REPO)))
    missing = {name: where for name, where in cited.items() if not (REPO / name).is_file()}
    assert not missing, f"cited docs that do not exist (doc: first file citing it): {missing}"


def test_relative_links_in_docs_and_readmes_resolve() -> None:
    pages = [*REPO.glob("docs/**/*.md"), *REPO.glob("*.md"), *REPO.glob("*/README.md"), *REPO.glob("*/*/README.md")]
    broken = []
    for page in pages:
        for target in MARKDOWN_LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


# What docs/ARCHITECTURE.md draws: each room may import only these (the hall is "slimserve").
ALLOWED_IMPORTS = {
    "slimserve": set(),
    "loaders": {"slimserve"},
    "attention": {"slimserve"},
    "plugin": {"slimserve", "loaders", "attention"},
    "server": {"slimserve", "loaders", "attention", "plugin"},
}
ROOM_OF_PACKAGE = {"loaders": "loaders", "attention": "attention", "plugin": "plugin", "server": "server",
                   "errors": "slimserve", "metrics": "slimserve", "testing": "testing"}


def _slimserve_imports(path: Path) -> set[str]:
    """Rooms a module imports (lazy imports inside functions included), by ``slimserve.<part>``."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "vllm":
                rooms.add("vllm")
            elif parts[0] == "slimserve" and len(parts) > 1:
                rooms.add(ROOM_OF_PACKAGE.get(parts[1], parts[1]))
    return rooms


def test_imports_point_the_way_the_architecture_draws() -> None:
    """server -> plugin -> loaders, plugin -> attention, server -> attention, every room -> the hall;
    only plugin imports vLLM; nothing shipped imports slimserve.testing."""
    wrong = []
    for room, allowed in ALLOWED_IMPORTS.items():
        for path in sorted((REPO / room).rglob("*.py")):
            if path.is_relative_to(REPO / "slimserve" / "testing"):
                continue
            own = "slimserve" if room == "slimserve" else room
            extra = _slimserve_imports(path) - allowed - {own} - ({"vllm"} if room == "plugin" else set())
            if extra:
                wrong.append(f"{path.relative_to(REPO)} imports {sorted(extra)}")
    assert not wrong, "imports against the drawn direction:\n" + "\n".join(wrong)
