"""What one running app holds (engine, runner, metrics, config, video jobs) and the checks every route shares.

``create_app`` builds one ``AppState`` and keeps it on ``app.state``; route handlers are plain
module-level functions that receive it through the ``State`` dependency, so a route module
needs no closure over the app and tests can build several apps in one process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Annotated, Any

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from slimserve.metrics import SlimserveMetrics
from slimserve.server.config import ServerConfig
from slimserve.server.engines.base import Engine, RequestCancelled
from slimserve.server.errors import OpenAIError, engine_error
from slimserve.server.jobs import VideoJobStore
from slimserve.server.runner import EngineRunner
from slimserve.server.schemas import RequestBody

logger = logging.getLogger("slimserve.server")

_IGNORED_FIELDS_LOG_SECONDS = 60.0


class AppState:
    """State behind one FastAPI app: the engine, its runner, metrics, config and video jobs."""

    def __init__(self, engine: Engine, config: ServerConfig, model_root: str) -> None:
        self.engine = engine
        self.config = config
        self.model_root = model_root
        self.created = int(time.time())
        # One registry per app: two apps in one process (tests) must not share counters.
        self.registry = CollectorRegistry()
        self.metrics = SlimserveMetrics(engine.model_name, self.registry)
        report = engine.sparsity()
        self.metrics.attention_density.set(report.attention_density)
        self.metrics.attention_skipped_heads.set(report.skipped_heads)
        self.metrics.model_compression_ratio.set(report.compression_ratio)
        self._runner: EngineRunner | None = None
        self.videos = VideoJobStore(config.max_video_jobs, config.max_video_bytes, config.video_ttl_seconds)
        self._last_ignored_warning = float("-inf")

    # ---- lifecycle (the app's lifespan) -------------------------------------------------

    def start(self) -> None:
        """Create the runner and the job folder; the runner's semaphore must belong to the server's loop."""
        self._runner = EngineRunner(self.config.max_running, self.config.max_waiting, self.metrics)
        self.videos.open()
        self._refuse_new_work_on_sigterm()

    async def stop(self) -> None:
        """Refuse new work, give video jobs ``drain_seconds``, stop the engine threads, delete job results."""
        self.runner.stop_admitting()
        await self.videos.drain(self.config.drain_seconds)
        self.runner.close()
        self.videos.close()

    def _refuse_new_work_on_sigterm(self) -> None:
        """Answer 503 from the moment SIGTERM arrives, not only once uvicorn reaches the lifespan shutdown.

        uvicorn first waits (up to its graceful timeout) for open connections; requests arriving
        on them meanwhile would otherwise still be queued. uvicorn installs its own handler before
        the lifespan starts (and restores the original afterwards); this one runs first and hands
        over to it. Signal handlers exist only in the main thread, so an app served from another
        thread (tests) keeps uvicorn's handling alone.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):  # no server handler to hand over to: leave SIGTERM's default alone
            return
        runner = self.runner

        def on_sigterm(signum: int, frame: object) -> None:
            runner.stop_admitting()
            previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    @property
    def runner(self) -> EngineRunner:
        assert self._runner is not None, "the runner exists only while the app is being served"
        return self._runner

    # ---- checks shared by the routes ----------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def note_ignored(self, body: RequestBody) -> None:
        """Log unknown request fields at most once a minute, instead of failing or flooding logs."""
        ignored = body.ignored_fields()
        now = time.monotonic()
        if ignored and now - self._last_ignored_warning >= _IGNORED_FIELDS_LOG_SECONDS:
            self._last_ignored_warning = now
            logger.warning("ignoring request fields not used by slimserve: %s", ", ".join(map(repr, ignored)))

    def check_steps(self, steps: int | None) -> None:
        if steps is not None and steps > self.config.max_steps:
            raise OpenAIError(400, f"at most {self.config.max_steps} steps are allowed on this server",
                              param="num_inference_steps", code="invalid_value")

    def media_size(self, size: str, width: int | None = None,
                   height: int | None = None) -> tuple[int | None, int | None]:
        """Width and height within ``max_side``: from ``"WxH"`` unless ``width``/``height`` (videos) override it.

        ``"auto"`` leaves the choice to the engine. Each side is checked under the field it came
        from, so ``width=4000`` is refused like ``size=4000x16``.
        """
        sides: dict[str, int | None] = {"width": None, "height": None}
        if size != "auto":
            for name, side in zip(sides, size.split("x"), strict=True):
                sides[name] = int(side)
                self._check_side("size", int(side))
        for name, side in (("width", width), ("height", height)):
            if side is not None:
                self._check_side(name, side)
                sides[name] = side
        return sides["width"], sides["height"]

    def _check_side(self, param: str, side: int) -> None:
        if side > self.config.max_side:
            raise OpenAIError(400, f"{param}: {side} pixels exceeds this server's {self.config.max_side} pixels "
                                   "per side", param=param, code="invalid_value")

    def check_pixels(self, width: int | None, height: int | None, frames: int, n: int, param: str) -> None:
        """Refuse a request whose width x height x frames x n (its render and encoding cost) exceeds ``max_pixels``.

        An ``"auto"`` size is the engine's default and is bounded by the model itself.
        """
        if width is None or height is None:
            return
        pixels = width * height * frames * n
        if pixels > self.config.max_pixels:
            raise OpenAIError(400, f"{width}x{height} pixels x {frames} frames x {n} outputs = {pixels} pixels "
                                   f"exceeds this server's budget of {self.config.max_pixels}; ask for a smaller "
                                   "size, fewer frames or fewer outputs", param=param, code="invalid_value")

    async def finish_media(self, work: asyncio.Future[Any], arrival: float) -> Any:
        """Await an image or video render, recording its outcome; engine failures become OpenAI errors."""
        try:
            result = await work
        except BaseException as exc:
            self.metrics.request_success("abort" if isinstance(exc, RequestCancelled) else "error")
            raise engine_error(exc) from exc
        self.metrics.request_success("stop")
        self.metrics.e2e_request_latency.observe(time.perf_counter() - arrival)
        return result


async def app_state(request: Request) -> AppState:
    """FastAPI dependency: the state of the app that received ``request``.

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency on a worker thread,
    a hop per request that showed up in TTFT on a busy host.
    """
    return request.app.state.slimserve


State = Annotated[AppState, Depends(app_state)]
