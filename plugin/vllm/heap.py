"""Keeping a vLLM worker's freed heap pages from staying resident: while layers load, after each, and when idle.

glibc's malloc keeps freed blocks that live inside its heap (below its mmap threshold) resident
for reuse. Two things leave such pages behind in a serving worker. Loading: a compressed
layer's load buffers and packing temporaries are dropped once its runners hold their packed
copies, between other layers' factors, so the worker's RSS fell by only a third of the bytes a
30 % lowrank checkpoint saves until the loader trimmed after each layer. Serving: glibc raises
its mmap threshold each time a mapped block is freed (up to 32 MiB), so after the first steps a
prefill's activations and the kernels' padded copies and outputs come from the heap too and,
freed, stay resident: on an AMD EPYC (Zen 4, bf16 Llama 2048/5632 x 8) the worker held
100 MiB more after a b1 and a b8 decode and three 500-token prefills than after a trim, dense or
compressed, and lowrank_sparse grew 163 MiB over its load where dense grew 38.

Loading also leaves holes: the packed copies a layer keeps sit in the heap between the spaces its
load buffers freed, and later steps' small blocks land in those spaces and fault their pages back
in. So from the first compressed layer's creation until the last has loaded, blocks from 1 MiB are
mapped (``LoadingLayers``), and the packed copies lie outside the heap: lowrank_sparse's heap after
loading went from 808 to 231 MiB (155 to 25 MiB of it free) and its peak RSS fell by 59 MiB;
afterwards glibc's own end state for a serving process is set (threshold 32 MiB, trim 64 MiB), so
steps' temporaries reuse heap pages as before (a 500-token prefill was no slower in an A/B).

``malloc_trim(0)`` returns every whole free page (about 0.1 ms per MiB). A fixed mmap threshold
would return such blocks at each free instead, but then every step faults them in afresh: it
cost a 500-token prefill 25 % (docs/methods/serving.md). So the worker trims once a spell
without work has lasted ``IDLE_SECONDS``: a burst of requests keeps its heap, an idle server
gives it back, and the next request pays the page faults once.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable

#: mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

#: While compressed layers load, blocks from 1 MiB are mapped: the packed copies the layers keep then lie outside the
#: heap, not between the holes their load buffers leave, which later steps' small blocks fault back in.
LOADING_MMAP_THRESHOLD = 1 << 20

#: After loading, glibc's own end state for a serving process: its moving threshold stops at 32 MiB, with the trim
#: threshold twice that, so steps' temporaries below it reuse heap pages instead of faulting fresh mappings.
SERVING_MMAP_THRESHOLD, SERVING_TRIM_THRESHOLD = 32 << 20, 64 << 20

#: Seconds without work after which a worker returns what serving freed.
IDLE_SECONDS = 2.0

#: How often the watcher samples the process's CPU time.
PERIOD_SECONDS = 0.5

#: CPU seconds per second below which the process counts as idle. An idle vLLM CPU worker is not at 0: it polls
#: its shared-memory queue (about 0.34 of a core on a 2-core AMD EPYC); a working one keeps its OpenMP threads busy.
IDLE_CPU_CORES = 0.5


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None off glibc (musl, macOS)."""
    return _libc_function("malloc_trim")


def return_freed_memory() -> None:
    """Hand every whole free page of the heap back to the OS (under tcmalloc, which has its own release, a no-op)."""
    trim = malloc_trim()
    if trim is not None:
        trim(0)


class LoadingLayers:
    """Counts compressed layers created and not yet loaded, to map large blocks while any is loading."""

    pending = 0

    @classmethod
    def created(cls) -> None:
        """A layer's weights are declared (before any loads): from the first, map blocks of 1 MiB and up."""
        if cls.pending == 0:
            _mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD)
            _mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
        cls.pending += 1

    @classmethod
    def loaded(cls) -> None:
        """A layer holds its packed copies: return what its loading freed; after the last, serving's thresholds."""
        cls.pending = max(0, cls.pending - 1)
        return_freed_memory()
        if cls.pending == 0:
            _mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)


def _mallopt(parameter: int, value: int) -> None:
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(parameter, value)


class IdleTrim:
    """Calls ``trim`` once per idle spell: when the process has used less than ``IDLE_CPU_CORES`` for
    ``IDLE_SECONDS``, and not again until it has worked since."""

    def __init__(self, trim: Callable[[], None], cpu_seconds: Callable[[], float] = time.process_time,
                 idle_seconds: float = IDLE_SECONDS, period: float = PERIOD_SECONDS) -> None:
        self.trim = trim
        self.cpu_seconds = cpu_seconds
        self.idle_seconds = idle_seconds
        self.period = period
        self.last_cpu = cpu_seconds()
        self.idle_for = 0.0
        self.worked = True  # loading and vLLM's profiling run freed memory before the first spell

    def tick(self) -> bool:
        """One sample, ``period`` seconds after the last; whether it trimmed."""
        cpu = self.cpu_seconds()
        used, self.last_cpu = cpu - self.last_cpu, cpu
        if used > IDLE_CPU_CORES * self.period:
            self.idle_for, self.worked = 0.0, True
            return False
        self.idle_for += self.period
        if self.worked and self.idle_for >= self.idle_seconds:
            self.worked = False
            self.trim()
            return True
        return False

    def run(self) -> None:
        while True:
            time.sleep(self.period)
            self.tick()


_started = False


def start_idle_trim() -> None:
    """Start the idle watcher on a daemon thread in this process, once; nothing off glibc."""
    global _started
    if _started or malloc_trim() is None:
        return
    _started = True
    threading.Thread(target=IdleTrim(return_freed_memory).run, name="slimserve-idle-trim", daemon=True).start()
