"""The app's routes by family, as vLLM splits its OpenAI entrypoints.

``common`` (``/v1/models``, ``/health``, ``/metrics``) is always mounted; ``text``, ``images``
and ``videos`` only for engines that implement that task, so ``/docs`` and the OpenAPI spec
describe exactly what the server answers. Everything under ``/v1`` requires the API key when
one is configured; the probes never do.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from slimserve.server.engines.base import Engine, ImageEngine, TextEngine, VideoEngine
from slimserve.server.errors import OpenAIError
from slimserve.server.routes import common, images, text, videos
from slimserve.server.schemas import ErrorResponse
from slimserve.server.state import State

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500)
}
_BEARER = HTTPBearer(auto_error=False)


async def authenticate(state: State,
                       credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
    """Require ``Authorization: Bearer KEY`` when the server has an API key (constant-time comparison).

    ``async`` so that FastAPI runs it on the event loop, not on a worker thread (a hop per request).
    """
    api_key = state.config.api_key
    if api_key is None:
        return
    # Compared as UTF-8 bytes: ``compare_digest`` refuses non-ASCII ``str``, and any token a client sends must be a 401.
    sent = credentials.credentials.encode("utf-8", "surrogateescape") if credentials is not None else None
    if sent is None or not secrets.compare_digest(sent, api_key.encode("utf-8")):
        raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})


def v1_router(engine: Engine) -> APIRouter:
    """``/v1``: the models list and the families ``engine`` serves, all behind ``authenticate``."""
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=ERROR_RESPONSES)
    v1.include_router(common.router)
    for task, family in ((TextEngine, text), (ImageEngine, images), (VideoEngine, videos)):
        if isinstance(engine, task):
            v1.include_router(family.router)
    return v1

