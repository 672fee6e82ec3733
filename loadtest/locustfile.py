"""Load test for any slimserve server (slimserve's app or vLLM's), measuring TTFT by hand.

Users stream chat completions and completions and request images, according to the
tasks the server answers (discovered from ``/openapi.json``; vLLM's server always has the
text routes). Client-side metrics follow ``vllm bench serve``'s definitions:

- TTFT: send -> first streamed chunk that carries content;
- TPOT: ``(e2e - TTFT) / (output tokens - 1)`` per request (tokens from the usage chunk);
- E2E: send -> last byte.

- ITL: the gap between consecutive content chunks of one stream (vLLM's inter-token latency).

They are reported to locust as extra rows with request type ``METRIC`` (response time in
ms), so ``--csv`` output has them next to the HTTP rows. An ``error`` event inside a stream
counts as a failure, never as a fast success.

Which tasks run is a scenario preset (``loadtest/scenarios.py``, ``SLIMSERVE_SCENARIO``,
default ``mixed``: every task the server answers). With ``SLIMSERVE_LOADTEST_SAMPLES=PATH``
every request and every latency sample is appended to ``PATH`` as JSON lines (time, user
count, kind, route, value, HTTP status), which ``loadtest/report.py`` turns into the report:
exact percentiles, and the proof that every request sent got an answer (``sent`` lines are
written before a request goes out, ``answer`` lines when it ends, whatever the outcome).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 4 -r 2 -t 30s --csv out

Environment: ``SLIMSERVE_API_KEY`` (bearer key), ``SLIMSERVE_MAX_TOKENS`` (default 16),
``SLIMSERVE_IMAGE_SIZE`` (default 64x64), ``SLIMSERVE_IMAGE_STEPS`` (default 2),
``SLIMSERVE_VIDEO_FRAMES`` (default 4), ``SLIMSERVE_REQUEST_TIMEOUT`` (seconds, default 120: a
request with no answer by then is counted as hung).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from locust import HttpUser, events
from locust.env import Environment
from locust.exception import RescheduleTask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # locust imports this file by path, not as a package
from scenarios import SCENARIOS  # noqa: E402

MAX_TOKENS = int(os.environ.get("SLIMSERVE_MAX_TOKENS", "16"))
IMAGE_SIZE = os.environ.get("SLIMSERVE_IMAGE_SIZE", "64x64")
IMAGE_STEPS = int(os.environ.get("SLIMSERVE_IMAGE_STEPS", "2"))
VIDEO_FRAMES = int(os.environ.get("SLIMSERVE_VIDEO_FRAMES", "4"))
REQUEST_TIMEOUT = float(os.environ.get("SLIMSERVE_REQUEST_TIMEOUT", "120"))
# A refused user backs off this long before its next request, as a client honouring Retry-After would
# (briefer than the server's 1 s so overload stays visible); without it a refused user would spin.
OVERLOAD_BACKOFF_SECONDS = 0.2
SCENARIO = os.environ.get("SLIMSERVE_SCENARIO", "mixed")
PROMPTS = ("Explain what a sparse attention mask is.", "Write a haiku about low-rank matrices.",
           "List three uses of a diffusion model.")


class SampleLog:
    """Appends one JSON line per request event and latency sample (``SLIMSERVE_LOADTEST_SAMPLES``)."""

    def __init__(self) -> None:
        path = os.environ.get("SLIMSERVE_LOADTEST_SAMPLES")
        self.file: IO[str] | None = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - open all run
        self.lock = threading.Lock()
        self.environment: Environment | None = None

    def write(self, kind: str, route: str, **fields: Any) -> None:
        if self.file is None:
            return
        runner = self.environment.runner if self.environment is not None else None
        record = {"t": time.time(), "users": runner.user_count if runner is not None else 0, "kind": kind,
                  "route": route, **fields}
        with self.lock:
            self.file.write(json.dumps(record) + "\n")


SAMPLES = SampleLog()


@events.init.add_listener
def _remember_environment(environment: Environment, **_: Any) -> None:
    SAMPLES.environment = environment


def report_metric(name: str, route: str, milliseconds: float) -> None:
    events.request.fire(request_type="METRIC", name=f"{name} {route}", response_time=milliseconds,
                        response_length=0, exception=None, context={})
    SAMPLES.write(name, route, ms=milliseconds)


class SlimserveUser(HttpUser):
    """One client looping over the scenario's tasks with no think time (closed-loop load)."""

    def on_start(self) -> None:
        key = os.environ.get("SLIMSERVE_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.model = self.client.get("/v1/models", name="/v1/models").json()["data"][0]["id"]
        paths = self.client.get("/openapi.json", name="/openapi.json").json()["paths"]
        self.has_text = "/v1/completions" in paths
        self.has_images = "/v1/images/generations" in paths
        self.has_videos = "/v1/videos/sync" in paths
        self.prompt_index = 0

    def next_prompt(self) -> str:
        self.prompt_index = (self.prompt_index + 1) % len(PROMPTS)
        return PROMPTS[self.prompt_index]

    def stream_chat(self) -> None:
        if not self.has_text:
            raise RescheduleTask()
        body = {"model": self.model, "messages": [{"role": "user", "content": self.next_prompt()}],
                "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
        self._stream("/v1/chat/completions", body, lambda choice: choice.get("delta", {}).get("content"))

    def stream_completion(self) -> None:
        if not self.has_text:
            raise RescheduleTask()
        body = {"model": self.model, "prompt": self.next_prompt(), "max_tokens": MAX_TOKENS, "stream": True,
                "stream_options": {"include_usage": True}}
        self._stream("/v1/completions", body, lambda choice: choice.get("text"))

    def image(self) -> None:
        if not self.has_images:
            raise RescheduleTask()
        body = {"model": self.model, "prompt": self.next_prompt(), "size": IMAGE_SIZE,
                "num_inference_steps": IMAGE_STEPS}
        path = "/v1/images/generations"
        sent = self._sent(path)
        status = 0
        try:
            with self.client.post(path, json=body, name=path, catch_response=True,
                                  timeout=REQUEST_TIMEOUT) as response:
                status = response.status_code
                if status != 200 or not response.json().get("data"):
                    response.failure(f"status {status}: {response.text[:200]}")
        finally:
            self._answered(path, sent, status)
        if status == 200:
            report_metric("e2e", path, (time.perf_counter() - sent) * 1000)

    def video(self) -> None:
        if not self.has_videos:
            raise RescheduleTask()
        form = {"model": self.model, "prompt": self.next_prompt(), "size": IMAGE_SIZE,
                "num_frames": str(VIDEO_FRAMES), "num_inference_steps": str(IMAGE_STEPS)}
        path = "/v1/videos/sync"
        sent = self._sent(path)
        status = 0
        try:
            with self.client.post(path, data=form, name=path, catch_response=True,
                                  timeout=REQUEST_TIMEOUT) as response:
                status = response.status_code
                if status != 200 or not response.content:
                    response.failure(f"status {status}: {response.text[:200]}")
        finally:
            self._answered(path, sent, status)
        if status == 200:
            report_metric("e2e", path, (time.perf_counter() - sent) * 1000)

    def _sent(self, path: str) -> float:
        SAMPLES.write("sent", path)
        return time.perf_counter()

    def _answered(self, path: str, sent: float, status: int, complete: bool = True) -> None:
        """One ``answer`` line per request, whatever happened.

        ``status`` 0: no HTTP answer at all (timeout, refused or reset connection); ``complete`` false: the
        headers came but the body broke off (a stream that stopped before ``[DONE]``).
        """
        SAMPLES.write("answer", path, status=status, complete=complete, ms=(time.perf_counter() - sent) * 1000)
        if status == 429:
            time.sleep(OVERLOAD_BACKOFF_SECONDS)  # gevent's cooperative sleep under locust

    def _stream(self, path: str, body: dict[str, Any], content_of: Any) -> None:
        sent = self._sent(path)
        outcome = {"status": 0, "complete": False}
        try:
            self._read_stream(path, body, content_of, sent, outcome)
        finally:
            self._answered(path, sent, outcome["status"], outcome["complete"])

    def _read_stream(self, path: str, body: dict[str, Any], content_of: Any, sent: float,
                     outcome: dict[str, Any]) -> None:
        first: float | None = None
        last: float | None = None
        output_tokens = 0
        gaps: list[float] = []
        with self.client.post(path, json=body, stream=True, name=path, catch_response=True,
                              timeout=REQUEST_TIMEOUT) as response:
            outcome["status"] = response.status_code
            if response.status_code != 200:
                outcome["complete"] = response.status_code != 0
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    outcome["complete"] = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    response.failure(f"error event: {chunk['error'].get('message')}")
                    return
                if chunk.get("usage"):
                    output_tokens = chunk["usage"]["completion_tokens"]
                if any(content_of(choice) for choice in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        assert last is not None
                        gaps.append(now - last)
                    last = now
            end = time.perf_counter()
            if first is None:
                response.failure("stream ended without content")
                return
            response.success()
        report_metric("ttft", path, (first - sent) * 1000)
        report_metric("e2e", path, (end - sent) * 1000)
        for gap in gaps:
            report_metric("itl", path, gap * 1000)
        if output_tokens > 1:
            report_metric("tpot", path, (end - first) * 1000 / (output_tokens - 1))


SlimserveUser.tasks = {getattr(SlimserveUser, name): weight for name, weight in SCENARIOS[SCENARIO].items()}
