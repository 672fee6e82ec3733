"""slimserve's OpenAI-compatible FastAPI app for diffusers pipelines and diffusion LMs.

Causal LMs are served by vLLM's own OpenAI server (see ``launch.py``); this app serves the
engines vLLM cannot run. It mounts only the routes its engine's tasks need (``routes/``), so
``/docs`` and the OpenAPI spec describe exactly what the server answers:

- text engines: ``/v1/completions``, ``/v1/chat/completions`` (SSE with ``stream_options``);
- image engines: ``/v1/images/generations`` (``b64_json``);
- video engines: the ``/v1/videos`` job API (create, list, poll, content, delete) and
  ``/v1/videos/sync``, which returns the MP4 directly (for load tests);
- always: ``/v1/models``, ``/health``, ``/metrics``, ``/docs``.

Before FastAPI parses a request, ASGI middleware gives it an id (``x-request-id``) and refuses a
body over ``max_body_bytes`` with 413, so neither parsing nor authentication spends memory on
it. Errors before a stream starts get a real HTTP status; the first text delta is awaited
before the response headers are sent, so engine failures at start are never a 200. An
error after the stream started is sent as an ``error`` event followed by ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from slimserve.server.config import ServerConfig
from slimserve.server.engines.base import Engine
from slimserve.server.errors import install_error_handlers
from slimserve.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from slimserve.server.routes import common, v1_router
from slimserve.server.state import AppState

# ``create_app(engine, ServerConfig(...))`` is how callers build the app; both come from here.
__all__ = ["ServerConfig", "create_app"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the engine runner while the server runs; on shutdown refuse new work and drain video jobs (bounded)."""
    state: AppState = app.state.slimserve
    state.start()
    yield
    await state.stop()


def create_app(engine: Engine, config: ServerConfig | None = None, model_root: str = "") -> FastAPI:
    """Build the FastAPI app serving ``engine``; ``model_root`` is reported as the model's ``root``."""
    app = FastAPI(title="slimserve", version="0.1.0", lifespan=_lifespan,
                  description="OpenAI-compatible API for diffusion transformers and diffusion LMs.")
    app.state.slimserve = AppState(engine, config or ServerConfig(), model_root or engine.model_name)
    install_error_handlers(app)
    # The last middleware added runs first: the id is assigned before the body limit can answer.
    app.add_middleware(BodyLimitMiddleware, max_bytes=app.state.slimserve.config.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(v1_router(engine))
    app.include_router(common.probes)
    return app
