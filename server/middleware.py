"""ASGI middleware that runs before FastAPI parses anything: request ids and the body-size limit.

Both are plain ASGI (not ``BaseHTTPMiddleware``) so that they see the raw byte stream: the body
limit must refuse an oversized request before a single handler, parser or authentication check
has spent memory on it, whether the client announced its size (``Content-Length``) or streams it
in chunks.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from slimserve.server.errors import REQUEST_ID, OpenAIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A client-chosen id is echoed only when it is short and plain, so it cannot inject into logs or headers.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestIdMiddleware:
    """Give every HTTP request an id (the client's ``x-request-id`` if sane), log under it, and return it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _CLIENT_REQUEST_ID.match(sent) else uuid.uuid4().hex
        # Not reset afterwards: the 500 handler of the outermost (Starlette) middleware runs after
        # this coroutine raised, in the same task, and names the id in its answer.
        REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit, to stop whoever is reading it."""


class BodyLimitMiddleware:
    """Answer 413 to a body over ``max_bytes``: from ``Content-Length`` before reading, else while counting.

    Whatever the app makes of the interrupted read (FastAPI turns it into a 400, a form parser
    into its own error), the response is replaced by the 413, since the body was the cause.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send, 413 if declared.isdigit() else 400)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                if not started:
                    started = True
                    await self._refuse(send, 413)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, 413)

    async def _refuse(self, send: Send, status: int) -> None:
        message = (f"request body exceeds this server's limit of {self.max_bytes} bytes" if status == 413
                   else "Content-Length must be a non-negative integer")
        error = OpenAIError(status, message, code="request_too_large" if status == 413 else "invalid_value")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
