"""Server-sent events and client-disconnect detection, shared by every route family.

A streaming response notices a vanished client by itself (Starlette stops iterating it), but a
non-streaming one only finds out when it writes the answer, long after the engine spent its
time. ``DisconnectWatcher`` polls the connection while such a request waits and sets the
request's cancel event, which the engine's step callback turns into ``RequestCancelled``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import suppress
from typing import Any

from fastapi import Request

# How often a waiting non-streaming request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.05


def sse_event(payload: dict[str, Any] | str) -> str:
    """One ``data:`` event; dicts are sent as compact JSON, strings (``[DONE]``) as they are."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class DisconnectWatcher:
    """Sets ``cancel`` when the client of a non-streaming request goes away."""

    def __init__(self, request: Request, cancel: threading.Event) -> None:
        self.request = request
        self.cancel = cancel
        self.task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while not self.cancel.is_set():
            if await self.request.is_disconnected():
                self.cancel.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    async def __aenter__(self) -> DisconnectWatcher:
        self.task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task
