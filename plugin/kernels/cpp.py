"""Building slimserve's C++ CPU kernels: compiled once per machine at first use, then cached.

The ``.cpp`` sources and the ``.h`` headers they share ship inside the package (package data), so
an ordinary wheel install can build them; ``torch.utils.cpp_extension.load`` compiles them with
``-march=native`` the first time a model that needs them loads, and reuses the build while source
and flags are unchanged. A build is reused by content, not by ninja: beside each library lies a key
file, the digest of the source bytes (with every header beside it), the compiler flags, torch's
version and Python's. When the key matches, the library is imported directly and torch's ``load``
(and with it ninja) is not called. Ninja alone rebuilt far too often: its command holds the source
path and torch's include paths, so every fresh clone, with its own virtual environment, rebuilt
every kernel for every ISA, minutes per clone.

Builds are cached per torch version, Python version and CPU (instruction set and feature flags;
``$SLIMSERVE_KERNEL_DIR``, default ``~/.cache/slimserve/kernels``): a ``-march=native`` build made
on an AVX-512 host must never be loaded on an AVX2 host sharing the same home or volume.

Why every outcome is logged: without the compiled kernel a sparse layer still gives the right
answer through its PyTorch fallback, only several times slower. Serving with that fallback must
be a visible decision, so a failed build logs a WARNING naming the reason, and
``SLIMSERVE_REQUIRE_CPU_KERNELS=1`` turns it into a :class:`KernelBuildError` instead.

Each kernel has AVX-512, AVX2 + FMA and scalar inner loops, chosen at compile time by what the
flags enable. ``-march=native`` picks the best this CPU has; a narrower variant (``isa="avx2"``
or ``"scalar"``, or ``$SLIMSERVE_CPU_ISA`` for benchmarks) builds the same source with the wider
instruction sets switched off, so an AVX-512 host can test and time the path AMD EPYC hosts run.
A variant is its own module (``<name>_<isa>``) in its own cache folder; the one equal to the
native build reuses it. The build log line names the ISA the loaded build's loops use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
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
#: Set to ``avx512``, ``avx2`` or ``scalar`` to build and use that variant instead of the native one.
ISA_ENV = "SLIMSERVE_CPU_ISA"
#: Tuples, and handed to torch as fresh lists: its loader appends its own flags to the lists it gets, the
#: venv's torch library path among them, which would leak into every later build key of the process.
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
#: Flags added to CFLAGS per variant: GCC's ``-mno-avx512f`` drops every AVX-512 extension and
#: ``-mno-avx`` drops AVX, AVX2, FMA and AVX-512 with it, so the source's ``#if`` picks that path.
ISA_FLAGS = {"avx512": (), "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx",)}

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


@functools.cache
def _cpu_flags_line() -> str:
    """The ``flags`` line of /proc/cpuinfo (empty where it cannot be read), read once per process.

    Every kernel op asks for its extension on each call (which checks the ISA the CPU supports), so
    reading the file each time cost ~170 µs a call, ~9 ms a decode step of an 8-layer model.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (``avx512_bf16``, ``amx_tile`` ...); empty if unreadable."""
    return frozenset(_cpu_flags_line().partition(":")[2].split())


def cpu_has_amx_bf16() -> bool:
    """Whether the CPU has AMX's bf16 tile unit, which oneDNN's bf16 GEMMs use wherever it exists (oneDNN asks the
    OS for it itself): a road that replaces a oneDNN GEMM asks this. A road that replaces slimserve's own tile
    strips asks a kernel build's ``amx_usable()`` instead (the build has the strips and this process may use them)."""
    return "amx_bf16" in cpu_flags()


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The kernel variants this CPU can run, widest first (``scalar`` always).

    Cached: every kernel op call asks, and parsing the flags line each time cost ~5 µs a call.
    """
    flags = cpu_flags()
    isas = ["avx512"] if "avx512f" in flags else []
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
    return (*isas, "scalar")


def loop_isa() -> str:
    """The ISA whose loops ``load_cpu_extension``'s default build runs (``$SLIMSERVE_CPU_ISA``, else the widest this
    CPU has), known without building: a caller that uses a kernel on some ISAs only need not build it elsewhere."""
    return os.environ.get(ISA_ENV) or supported_isas()[0]


def cpu_flags_digest() -> str:
    """A short digest of the CPU's feature flags: ``-march=native`` output is only valid on equal flags."""
    return hashlib.sha256(_cpu_flags_line().encode()).hexdigest()[:8]


def build_root() -> Path:
    """The cache folder for builds on this machine's torch, Python and CPU (ISA plus feature flags)."""
    base = Path(os.environ.get(BUILD_DIR_ENV) or Path.home() / ".cache" / "slimserve" / "kernels")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return base / f"torch{torch.__version__.replace('+', '_')}-{python}-{cpu_isa()}-{cpu_flags_digest()}"


def source_path(source: str) -> Path:
    """A kernel source shipped beside this module (package data in the wheel)."""
    return Path(__file__).with_name(source)


def load_cpu_extension(name: str, source: str, isa: str | None = None) -> ModuleType | None:
    """The compiled extension ``name`` built from ``source`` (a file beside this module), or None.

    ``isa`` (default ``$SLIMSERVE_CPU_ISA``, else the native build) selects the variant: ``avx512``,
    ``avx2`` or ``scalar``; one this CPU cannot run raises :class:`KernelBuildError`, since its code
    would die on an illegal instruction. None means the caller must use its PyTorch fallback; that
    has already been logged as a WARNING with the reason. Raises :class:`KernelBuildError` instead
    when ``SLIMSERVE_REQUIRE_CPU_KERNELS=1``.
    """
    wanted = isa or os.environ.get(ISA_ENV) or None
    if wanted is not None and wanted not in ISA_FLAGS:
        raise KernelBuildError(f"unknown CPU kernel ISA {wanted!r}", field=ISA_ENV if isa is None else "isa",
                               expected=" | ".join(ISA_FLAGS))
    supported = supported_isas()
    if wanted is not None and wanted not in supported:
        raise KernelBuildError(f"this CPU cannot run the {wanted} kernels", field=ISA_ENV if isa is None else "isa",
                               expected=" | ".join(supported))
    # The native build already is the widest variant; only narrower ones need their own module.
    variant = None if wanted in (None, supported[0]) else wanted
    return _cached_build(name, source, variant)


def build_cpu_extension(name: str, source: str, variant: str | None = None) -> ModuleType | None:
    """Loads the cached build of one variant (``None`` meaning native), building it first when the key differs.

    Not memoised in-process: each call really checks the cache and, where needed, builds.
    """
    from torch.utils.cpp_extension import load

    path = source_path(source)
    module_name = name if variant is None else f"{name}_{variant}"
    cflags = [*CFLAGS, *(() if variant is None else ISA_FLAGS[variant])]
    build_dir = build_root() / module_name
    start = time.perf_counter()
    action = "loaded the cached build of"
    try:
        key = build_key(source_bytes(path), cflags)
        module = _import_matching_build(build_dir, module_name, key)
        if module is None:
            action = "built"
            build_dir.mkdir(parents=True, exist_ok=True)
            clear_stale_lock(build_dir)
            module = load(name=module_name, sources=[str(path)], extra_cflags=list(cflags), extra_ldflags=list(LDFLAGS),
                          build_directory=str(build_dir), verbose=False)
            _write_atomically(build_dir / f"{module_name}.key", key)
    except (RuntimeError, OSError, ImportError, SystemExit) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if os.environ.get(REQUIRE_ENV) == "1":
            raise KernelBuildError(f"could not build the CPU kernel ({reason})", file=path,
                                   expected=f"a C++ compiler (g++) and ninja, since {REQUIRE_ENV}=1") from err
        logger.warning("slimserve: could not build the CPU kernel %s in %s (%s); sparse layers use the slower "
                       "PyTorch fallback. Install g++ and ninja, or set %s=1 to fail instead.",
                       path, build_dir, reason, REQUIRE_ENV)
        return None
    logger.info("slimserve: %s CPU kernel %s in %s in %.1f s (ISA %s in the loops; CPU %s; %s)", action, path.name,
                build_dir, time.perf_counter() - start, module.isa(), cpu_isa(), " ".join(cflags))
    return module


_cached_build = functools.cache(build_cpu_extension)


def source_bytes(path: Path) -> bytes:
    """A kernel source and every header beside it (the headers it may include), in a fixed order."""
    return path.read_bytes() + b"".join(header.read_bytes() for header in sorted(path.parent.glob("*.h")))


def build_key(source: bytes, cflags: list[str]) -> str:
    """What a build's output depends on: the source bytes, the flags, torch's version and Python's.

    Paths are left out on purpose (see the module docstring); the CPU is already in :func:`build_root`.
    """
    digest = hashlib.sha256(source)
    for part in (*cflags, "|", *LDFLAGS, "|", torch.__version__, sys.version):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _import_matching_build(build_dir: Path, module_name: str, key: str) -> ModuleType | None:
    """The library in ``build_dir`` imported as ``module_name`` if its key file says it was built from ``key``."""
    library = build_dir / f"{module_name}.so"
    try:
        if (build_dir / f"{module_name}.key").read_text() != key or not library.is_file():
            return None
    except FileNotFoundError:
        return None
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the kernel library {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a concurrent reader (the other TP worker) sees all of it or nothing."""
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)


#: A build holds torch's ``lock`` file for a minute or two; one older than this was left by a killed build.
STALE_LOCK_SECONDS = 900


def clear_stale_lock(build_dir: Path) -> bool:
    """Remove the build lock a killed build left behind; returns whether one was removed.

    torch's extension loader waits for ``build_dir/lock`` to disappear and never checks whether its
    owner is alive, so a build killed halfway (a test timeout, Ctrl-C) made every later load hang.
    """
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    logger.warning("slimserve: removing the kernel build lock %s, left %.0f s ago by a build that did not finish",
                   lock, age)
    lock.unlink(missing_ok=True)
    return True
