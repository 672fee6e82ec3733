"""OpenAI-style errors: ``{"error": {message, type, param, code}}`` with a real HTTP status.

Every failure a client can see goes through here, including FastAPI's own validation
errors and unknown routes, so the ``openai`` SDK always raises the right typed exception
(``BadRequestError``, ``AuthenticationError``, ``RateLimitError``, ...).

An unexpected failure is answered with a generic 500 naming only the request id (also sent as
the ``x-request-id`` header of every response); its details (exception, paths, tracebacks) go
to the server log under that id, never to the client.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimserve.server.engines.base import EngineRequestError, RequestCancelled
from slimserve.server.media import VideoEncodingError
from slimserve.server.schemas import ErrorDetail, ErrorResponse

logger = logging.getLogger("slimserve.server")

# The id of the request being served, set by ``middleware.RequestIdMiddleware``; tasks a request
# starts (a video job) inherit it, so their log lines name the request that created them.
REQUEST_ID: ContextVar[str] = ContextVar("slimserve_request_id", default="-")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    """An error answered with an OpenAI error body and ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, object]:
        error_type = _TYPE_BY_STATUS.get(self.status, "server_error")
        return ErrorResponse(error=ErrorDetail(message=self.message, type=error_type, param=self.param,
                                               code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def engine_error(exc: BaseException) -> OpenAIError:
    """Translate what an engine raised into the error the client gets (and log the unexpected ones)."""
    if isinstance(exc, EngineRequestError):
        return OpenAIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, VideoEncodingError):
        if exc.rejected_size:
            return OpenAIError(400, str(exc), param="size", code="unsupported_size")
        return internal_error(exc, "video encoding failed")
    if isinstance(exc, RequestCancelled):
        return OpenAIError(499, "client closed the request", code="client_closed_request")
    return internal_error(exc, "engine failed")


def internal_error(exc: BaseException, what: str) -> OpenAIError:
    """Log ``exc`` in full under the request id; the client learns only that id."""
    request_id = REQUEST_ID.get()
    logger.error("%s (request id %s)", what, request_id, exc_info=exc)
    return OpenAIError(500, f"internal server error; quote request id {request_id} to the operator",
                       code="internal_error", headers={"x-request-id": request_id})


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """Describe the first validation problem the way OpenAI does: a message and the field."""
    first = exc.errors()[0]
    location: list[str] = []
    for part in first.get("loc", ())[1:]:  # the first element says where: body, query, path
        if isinstance(part, int):
            location.append(f"[{part}]")
        elif part.isidentifier():  # pydantic also lists union members ("constrained-str", "list[...]")
            location.append(("." if location else "") + part)
        else:
            break
    param = "".join(location) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return OpenAIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, expected or not, with an OpenAI error body."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return OpenAIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc, f"unhandled error on {request.method} {request.url.path}").response()
