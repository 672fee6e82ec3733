"""The JSON objects of OpenAI's text APIs, built in one place for both endpoints.

``/v1/completions`` and ``/v1/chat/completions`` differ only in object names and in whether a
choice carries ``text`` or a ``message``/``delta``; every streamed chunk and the final response
of one request share its id and creation time, as in OpenAI's and vLLM's answers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TextFormat:
    """Builds the JSON objects of ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions``."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, object_name: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": [choice]}

    def chunk(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        """One streamed chunk; the first chat delta also names the assistant role."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            return self._envelope("chat.completion.chunk",
                                  {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
        return self._envelope("text_completion",
                              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, only usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", {})
        body["choices"] = []
        body["usage"] = counts
        return body

    def response(self, text: str, finish_reason: str, counts: dict[str, int]) -> dict[str, Any]:
        """The whole answer of a non-streaming request."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", choice)
        else:
            body = self._envelope("text_completion",
                                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
        body["usage"] = counts
        return body
