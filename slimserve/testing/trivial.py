"""A model-free engine for the app's tests and the HTTP-overhead benchmark.

It answers every task instantly (or after a fixed ``step_seconds``), so what a test or the
benchmark measures is the FastAPI layer itself: queueing, streaming, metrics, errors. It
is never the proof that a real engine works; those are tested with their real models.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from slimserve.server.engines.base import (
    ChatMessage,
    ImageEngine,
    ImageRequest,
    StepCallback,
    TextDelta,
    TextEngine,
    TextRequest,
    Video,
    VideoEngine,
    VideoRequest,
)


class TrivialEngine(TextEngine, ImageEngine, VideoEngine):
    """Echoes the prompt's words as tokens; renders flat grey images and videos.

    ``step_seconds`` is slept per token or denoising step, which lets tests hold a request
    on the engine (queue full, disconnect, graceful shutdown).
    """

    def __init__(self, model_name: str = "trivial", step_seconds: float = 0.0, steps: int = 2) -> None:
        super().__init__(model_name)
        self.step_seconds = step_seconds
        self.steps = steps

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return " ".join(message.content for message in messages)

    def generate_text(self, request: TextRequest, on_step: StepCallback) -> Iterator[TextDelta]:
        words = (request.prompt.split() or ["empty"]) * request.max_tokens
        count = request.max_tokens
        for index, word in enumerate(words[:count]):
            self._step(on_step, index + 1, count)
            yield TextDelta(("" if index == 0 else " ") + word, 1, "length" if index + 1 == count else None)

    def generate_images(self, request: ImageRequest, on_step: StepCallback) -> list[Image.Image]:
        frame = self._render(request.num_inference_steps, request.width, request.height, on_step)
        return [Image.fromarray(frame) for _ in range(request.n)]

    def generate_video(self, request: VideoRequest, on_step: StepCallback) -> Video:
        frame = self._render(request.num_inference_steps, request.width, request.height, on_step)
        return Video(frames=np.stack([frame] * (request.num_frames or 1)), fps=request.fps)

    def _render(self, steps: int | None, width: int | None, height: int | None, on_step: StepCallback) -> np.ndarray:
        total = steps or self.steps
        for step in range(total):
            self._step(on_step, step + 1, total)
        return np.full((height or 16, width or 16, 3), 128, dtype=np.uint8)

    def _step(self, on_step: StepCallback, done: int, total: int) -> None:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        on_step(done, total)
