"""The small, typed interface between slimserve's FastAPI app and the models behind it.

An engine is synchronous and single-request: the app owns concurrency, queueing,
cancellation and metrics, and calls an engine from a worker thread. That keeps engines
plain PyTorch code and lets a trivial engine stand in for the app's unit tests and for the
HTTP-overhead benchmark. An engine implements one or more task interfaces
(``TextEngine``, ``ImageEngine``, ``VideoEngine``); the app serves exactly the routes its
engine's tasks need.

Every generating method takes an ``on_step(done, total)`` callback that the engine calls after
each denoising step (or block of text). The app uses it for progress, step timings and
cancellation: the callback raises ``RequestCancelled`` when the client has gone away, which
unwinds the engine mid-request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from slimserve.attention.sparsed import SparsedParams

StepCallback = Callable[[int, int], None]
FinishReason = Literal["stop", "length"]


class RequestCancelled(Exception):
    """Raised inside an engine (by its step callback) when the request's client disconnected."""


class EngineRequestError(ValueError):
    """A request the engine cannot run as given; the app answers it with HTTP 400.

    ``param`` names the offending request field, as in OpenAI error bodies.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SparsityReport:
    """What the sparse methods save on this engine, exported as ``slimserve:`` gauges."""

    attention_density: float = 1.0
    skipped_heads: int = 0
    compression_ratio: float = 0.0


class Engine:
    """Common part of every engine: the served name and what it saves."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def sparsity(self) -> SparsityReport:
        """Savings of the loaded model; dense unless an engine knows better."""
        return SparsityReport()


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TextRequest:
    """A text generation request after the app validated and normalized it."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    # Diffusion-LM knobs (``extra_body`` fields); ``None`` keeps the model's defaults.
    steps: int | None = None
    block_length: int | None = None
    # SparseD for diffusion LMs: ``None`` keeps the engine's default, ``False`` turns it off.
    sparsed: SparsedParams | Literal[False] | None = None


@dataclass(frozen=True)
class SparseAttentionStats:
    """What a request's sparse attention kept and what choosing it cost (exported as ``slimserve:`` metrics)."""

    kept_density: float
    selection_seconds: float
    layers: int


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text, and the number of tokens it commits.

    The last delta of a generation carries the finish reason.
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    sparse_attention: SparseAttentionStats | None = None  # on the last delta of a sparse-attention request


class TextEngine(Engine, ABC):
    """An engine that completes text (served on ``/v1/completions`` and ``/v1/chat/completions``)."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens ``text`` encodes to (for usage and token counters)."""

    @abstractmethod
    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """Turn chat messages into the prompt the model was trained on."""

    @abstractmethod
    def generate_text(self, request: TextRequest, on_step: StepCallback) -> Iterator[TextDelta]:
        """Yield the completion in order; the last delta has ``finish_reason`` set."""

    def max_positions(self) -> int | None:
        """Prompt plus completion tokens the model can attend over; ``None`` when it declares no limit.

        The app refuses a prompt longer than this minus ``max_tokens`` before queueing it.
        """
        return None

    def forward_passes(self, request: TextRequest) -> int | None:
        """Model forward passes ``request`` really costs (a diffusion LM rounds steps up to whole blocks).

        The app refuses requests above its ``max_steps``; ``None`` means the engine does not count
        steps (an autoregressive engine is bounded by ``max_tokens`` instead).
        """
        return None


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int = 1
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None


class ImageEngine(Engine, ABC):
    """An engine that renders images (served on ``/v1/images/generations``)."""

    @abstractmethod
    def generate_images(self, request: ImageRequest, on_step: StepCallback) -> list[Image.Image]:
        """Return ``request.n`` images."""


@dataclass(frozen=True)
class VideoRequest:
    prompt: str
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: int = 16
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None


@dataclass
class Video:
    """Decoded frames, ``(frames, height, width, 3)`` uint8, and their playback rate."""

    frames: np.ndarray
    fps: int


class VideoEngine(Engine, ABC):
    """An engine that renders videos (served on ``/v1/videos``)."""

    @abstractmethod
    def generate_video(self, request: VideoRequest, on_step: StepCallback) -> Video:
        """Return the rendered frames."""
