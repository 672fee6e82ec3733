"""What one running app holds (engine, runner, metrics, config, video jobs) and the checks every route shares.

``create_app`` builds one ``AppState`` and keeps it on ``app.state``; route handlers are plain
module-level functions that receive it through the ``State`` dependency, so a route module
needs no closure over the app and tests can build several apps in one process.
"""

from __future__ import annotations

import asyncio
import logging
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
        self.videos = VideoJobStore()
        self._last_ignored_warning = float("-inf")

    # ---- lifecycle (the app's lifespan) -------------------------------------------------

    def start(self) -> None:
        """Create the runner; its semaphore must belong to the server's event loop, hence not in ``__init__``."""
        self._runner = EngineRunner(self.config.max_running, self.config.max_waiting, self.metrics)

    async def stop(self) -> None:
        """Let video jobs finish, then wait for engine threads and stop them."""
        await self.videos.drain()
        self.runner.close()

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

    def parse_size(self, size: str) -> tuple[int | None, int | None]:
        """``"WxH"`` as integers within ``max_side``; ``"auto"`` leaves the choice to the engine."""
        if size == "auto":
            return None, None
        width, height = (int(side) for side in size.split("x"))
        if max(width, height) > self.config.max_side:
            raise OpenAIError(400, f"size {size} exceeds {self.config.max_side} pixels per side",
                              param="size", code="invalid_value")
        return width, height

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


def app_state(request: Request) -> AppState:
    """FastAPI dependency: the state of the app that received ``request``."""
    return request.app.state.slimserve


State = Annotated[AppState, Depends(app_state)]
