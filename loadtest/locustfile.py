"""Load test for any slimserve server (slimserve's app or vLLM's), measuring TTFT by hand.

Users stream chat completions and completions and request images, according to the
tasks the server answers (discovered from ``/openapi.json``; vLLM's server always has the
text routes). Client-side metrics follow ``vllm bench serve``'s definitions:

- TTFT: send -> first streamed chunk that carries content;
- TPOT: ``(e2e - TTFT) / (output tokens - 1)`` per request (tokens from the usage chunk);
- E2E: send -> last byte.

They are reported to locust as extra rows with request type ``METRIC`` (response time in
ms), so ``--csv`` output has them next to the HTTP rows. An ``error`` event inside a stream
counts as a failure, never as a fast success.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 4 -r 2 -t 30s --csv out

Environment: ``SLIMSERVE_API_KEY`` (bearer key), ``SLIMSERVE_MAX_TOKENS`` (default 16),
``SLIMSERVE_IMAGE_SIZE`` (default 64x64), ``SLIMSERVE_IMAGE_STEPS`` (default 2).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from locust import HttpUser, events, task
from locust.exception import RescheduleTask

MAX_TOKENS = int(os.environ.get("SLIMSERVE_MAX_TOKENS", "16"))
IMAGE_SIZE = os.environ.get("SLIMSERVE_IMAGE_SIZE", "64x64")
IMAGE_STEPS = int(os.environ.get("SLIMSERVE_IMAGE_STEPS", "2"))
PROMPTS = ("Explain what a sparse attention mask is.", "Write a haiku about low-rank matrices.",
           "List three uses of a diffusion model.")


def report_metric(name: str, milliseconds: float) -> None:
    events.request.fire(request_type="METRIC", name=name, response_time=milliseconds, response_length=0,
                        exception=None, context={})


class SlimserveUser(HttpUser):
    """One client looping over the server's tasks with no think time (closed-loop load)."""

    def on_start(self) -> None:
        key = os.environ.get("SLIMSERVE_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.model = self.client.get("/v1/models", name="/v1/models").json()["data"][0]["id"]
        paths = self.client.get("/openapi.json", name="/openapi.json").json()["paths"]
        self.has_text = "/v1/completions" in paths
        self.has_images = "/v1/images/generations" in paths
        self.prompt_index = 0

    def next_prompt(self) -> str:
        self.prompt_index = (self.prompt_index + 1) % len(PROMPTS)
        return PROMPTS[self.prompt_index]

    @task(3)
    def stream_chat(self) -> None:
        if not self.has_text:
            raise RescheduleTask()
        body = {"model": self.model, "messages": [{"role": "user", "content": self.next_prompt()}],
                "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
        self._stream("/v1/chat/completions", body, lambda choice: choice.get("delta", {}).get("content"))

    @task(2)
    def stream_completion(self) -> None:
        if not self.has_text:
            raise RescheduleTask()
        body = {"model": self.model, "prompt": self.next_prompt(), "max_tokens": MAX_TOKENS, "stream": True,
                "stream_options": {"include_usage": True}}
        self._stream("/v1/completions", body, lambda choice: choice.get("text"))

    @task(1)
    def image(self) -> None:
        if not self.has_images:
            raise RescheduleTask()
        body = {"model": self.model, "prompt": self.next_prompt(), "size": IMAGE_SIZE,
                "num_inference_steps": IMAGE_STEPS}
        with self.client.post("/v1/images/generations", json=body, name="/v1/images/generations",
                              catch_response=True) as response:
            if response.status_code != 200 or not response.json().get("data"):
                response.failure(f"status {response.status_code}: {response.text[:200]}")

    def _stream(self, path: str, body: dict[str, Any], content_of: Any) -> None:
        sent = time.perf_counter()
        first: float | None = None
        output_tokens = 0
        with self.client.post(path, json=body, stream=True, name=path, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    response.failure(f"error event: {chunk['error'].get('message')}")
                    return
                if chunk.get("usage"):
                    output_tokens = chunk["usage"]["completion_tokens"]
                if first is None and any(content_of(choice) for choice in chunk.get("choices", [])):
                    first = time.perf_counter()
            end = time.perf_counter()
            if first is None:
                response.failure("stream ended without content")
                return
            response.success()
        report_metric(f"ttft {path}", (first - sent) * 1000)
        report_metric(f"e2e {path}", (end - sent) * 1000)
        if output_tokens > 1:
            report_metric(f"tpot {path}", (end - first) * 1000 / (output_tokens - 1))
