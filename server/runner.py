"""Runs blocking engine calls on worker threads behind a bounded queue.

Engines are synchronous PyTorch code; the event loop must stay free to accept requests,
stream tokens and notice disconnects. ``EngineRunner`` admits at most ``max_running``
requests onto the engine at once, lets at most ``max_waiting`` more wait, and refuses the
rest with 429 so that a burst becomes a fast, retryable error instead of unbounded latency.
Once the server is shutting down (``stop_admitting``, called on SIGTERM) every new request is
refused with 503 at once, while admitted ones finish.
A slot is released when the engine call returns, not when the client leaves, so a
cancelled request never overlaps the next one on the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from slimserve.metrics import SlimserveMetrics
from slimserve.server.engines.base import RequestCancelled
from slimserve.server.errors import OpenAIError

T = TypeVar("T")


class StepTracker:
    """The ``on_step`` callback given to an engine: timing, progress and cancellation."""

    def __init__(self, metrics: SlimserveMetrics, cancel: threading.Event,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.metrics = metrics
        self.cancel = cancel
        self.progress = progress
        self._last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.metrics.denoise_step.observe(now - self._last)
        self._last = now
        if self.progress is not None:
            self.progress(done, total)
        if self.cancel.is_set():
            raise RequestCancelled()


class Ticket:
    """A place in the queue; ``wait()`` returns once the request holds an engine slot."""

    def __init__(self, runner: EngineRunner) -> None:
        self.runner = runner
        self.enqueued_at = time.perf_counter()

    async def wait(self) -> float:
        """Wait for a slot and return the seconds spent queued."""
        runner = self.runner
        try:
            await runner.slots.acquire()
        finally:
            runner.waiting -= 1
            runner.metrics.num_requests_waiting.set(runner.waiting)
        runner.running += 1
        runner.metrics.num_requests_running.set(runner.running)
        queued = time.perf_counter() - self.enqueued_at
        runner.metrics.request_queue_time.observe(queued)
        return queued


class EngineRunner:
    """Bounded admission in front of a pool of ``max_running`` engine threads."""

    def __init__(self, max_running: int, max_waiting: int, metrics: SlimserveMetrics) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.slots = asyncio.Semaphore(max_running)
        self.waiting = 0
        self.running = 0
        self.admitting = True
        self.executor = ThreadPoolExecutor(max_running, thread_name_prefix="slimserve-engine")

    def enqueue(self) -> Ticket:
        """Join the queue, or raise 503 when the server is shutting down and 429 when the queue is full."""
        if not self.admitting:
            self.metrics.admission_rejection("shutting_down")
            raise OpenAIError(503, "server is shutting down; retry on another replica", code="shutting_down",
                              headers={"Retry-After": "5"})
        if self.waiting >= self.max_waiting and (self.slots.locked() or self.waiting > 0):
            self.metrics.admission_rejection("queue_full")
            raise OpenAIError(429, f"server busy: {self.running} running and {self.waiting} waiting requests; "
                                   "retry later", code="queue_full", headers={"Retry-After": "1"})
        self.waiting += 1
        self.metrics.num_requests_waiting.set(self.waiting)
        return Ticket(self)

    def run(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``work`` on an engine thread; the caller must hold a slot (``Ticket.wait``)."""
        started = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(self.executor, work)

        def release(_: asyncio.Future[T]) -> None:
            self.metrics.request_inference_time.observe(time.perf_counter() - started)
            self.running -= 1
            self.metrics.num_requests_running.set(self.running)
            self.slots.release()

        future.add_done_callback(release)
        return future

    def stop_admitting(self) -> None:
        """Refuse new requests from now on (safe to call from a signal handler: it only sets a flag)."""
        self.admitting = False

    def close(self) -> None:
        """Wait for running engine calls, then stop the threads."""
        self.executor.shutdown(wait=True)
