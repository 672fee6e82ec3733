"""Handing the heap pages a vLLM worker freed back to the OS: after each layer loads, and when it goes idle.

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

#: Seconds without work after which a worker returns what serving freed.
IDLE_SECONDS = 2.0

#: How often the watcher samples the process's CPU time.
PERIOD_SECONDS = 0.5

#: CPU seconds per second below which the process counts as idle. An idle vLLM CPU worker is not at 0: it polls
#: its shared-memory queue (about 0.34 of a core on a 2-core AMD EPYC); a working one keeps its OpenMP threads busy.
IDLE_CPU_CORES = 0.5


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None off glibc (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand every whole free page of the heap back to the OS (under tcmalloc, which has its own release, a no-op)."""
    trim = malloc_trim()
    if trim is not None:
        trim(0)


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
