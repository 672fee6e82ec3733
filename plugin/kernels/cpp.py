"""Building slimserve's C++ CPU kernels: compiled once per machine at first use, then cached.

The ``.cpp`` sources ship inside the package (package data), so an ordinary wheel install can
build them; ``torch.utils.cpp_extension.load`` compiles them with ``-march=native`` the first
time a model that needs them loads, and reuses the build while source and flags are unchanged.

Builds are cached per torch version, Python version and CPU (instruction set and feature flags;
``$SLIMSERVE_KERNEL_DIR``, default ``~/.cache/slimserve/kernels``): a ``-march=native`` build made
on an AVX-512 host must never be loaded on an AVX2 host sharing the same home or volume.

Why every outcome is logged: without the compiled kernel a sparse layer still gives the right
answer through its PyTorch fallback, only several times slower. Serving with that fallback must
be a visible decision, so a failed build logs a WARNING naming the reason, and
``SLIMSERVE_REQUIRE_CPU_KERNELS=1`` turns it into a :class:`KernelBuildError` instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from slimserve.errors import SlimserveError

#: Set to 1 to refuse the PyTorch fallback: a kernel that cannot be built raises instead.
REQUIRE_ENV = "SLIMSERVE_REQUIRE_CPU_KERNELS"
#: Where builds are cached (one subfolder per torch version, Python version and ISA).
BUILD_DIR_ENV = "SLIMSERVE_KERNEL_DIR"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]

logger = logging.getLogger(__name__)
if not logger.hasHandlers():
    # vLLM configures only its own logger, so an INFO line from a worker would otherwise vanish;
    # the build line is how an operator knows which kernel serves (the same reason vLLM does this).
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


class KernelBuildError(SlimserveError):
    """A compiled CPU kernel could not be built while ``SLIMSERVE_REQUIRE_CPU_KERNELS=1`` demanded it."""


def cpu_isa() -> str:
    """The instruction set PyTorch detected on this CPU (e.g. ``AVX512``, ``AVX2``, ``DEFAULT``)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_flags_digest() -> str:
    """A short digest of the CPU's feature flags: ``-march=native`` output is only valid on equal flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def build_root() -> Path:
    """The cache folder for builds on this machine's torch, Python and CPU (ISA plus feature flags)."""
    base = Path(os.environ.get(BUILD_DIR_ENV) or Path.home() / ".cache" / "slimserve" / "kernels")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return base / f"torch{torch.__version__.replace('+', '_')}-{python}-{cpu_isa()}-{cpu_flags_digest()}"


def source_path(source: str) -> Path:
    """A kernel source shipped beside this module (package data in the wheel)."""
    return Path(__file__).with_name(source)


@functools.cache
def load_cpu_extension(name: str, source: str) -> ModuleType | None:
    """The compiled extension ``name`` built from ``source`` (a file beside this module), or None.

    None means the caller must use its PyTorch fallback; that has already been logged as a
    WARNING with the reason. Raises :class:`KernelBuildError` instead when ``SLIMSERVE_REQUIRE_CPU_KERNELS=1``.
    """
    from torch.utils.cpp_extension import load

    path = source_path(source)
    build_dir = build_root() / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        before = _built_at(build_dir, name)
        start = time.perf_counter()
        module = load(name=name, sources=[str(path)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                      build_directory=str(build_dir), verbose=False)
    except (RuntimeError, OSError, ImportError, SystemExit) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if os.environ.get(REQUIRE_ENV) == "1":
            raise KernelBuildError(f"could not build the CPU kernel ({reason})", file=path,
                                   expected=f"a C++ compiler (g++) and ninja, since {REQUIRE_ENV}=1") from err
        logger.warning("slimserve: could not build the CPU kernel %s in %s (%s); sparse layers use the slower "
                       "PyTorch fallback. Install g++ and ninja, or set %s=1 to fail instead.",
                       path, build_dir, reason, REQUIRE_ENV)
        return None
    action = "loaded the cached build of" if before is not None and before == _built_at(build_dir, name) else "built"
    logger.info("slimserve: %s CPU kernel %s in %s in %.1f s (ISA %s, %s)", action, path.name, build_dir,
                time.perf_counter() - start, cpu_isa(), " ".join(CFLAGS))
    return module


def _built_at(build_dir: Path, name: str) -> float | None:
    """Modification time of the built library, to tell a fresh build from a cached one in the log."""
    library = build_dir / f"{name}.so"
    return library.stat().st_mtime_ns if library.exists() else None
