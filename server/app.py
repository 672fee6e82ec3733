"""slimserve's OpenAI-compatible FastAPI app for diffusers pipelines and diffusion LMs.

Causal LMs are served by vLLM's own OpenAI server (see ``launch.py``); this app serves the
engines vLLM cannot run. It mounts only the routes its engine's tasks need, so ``/docs`` and
the OpenAPI spec describe exactly what the server answers:

- text engines: ``/v1/completions``, ``/v1/chat/completions`` (SSE with ``stream_options``);
- image engines: ``/v1/images/generations`` (``b64_json``);
- video engines: the ``/v1/videos`` job API (create, list, poll, content, delete) and
  ``/v1/videos/sync``, which returns the MP4 directly (for load tests);
- always: ``/v1/models``, ``/health``, ``/metrics``, ``/docs``.

Errors before a stream starts get a real HTTP status; the first text delta is awaited
before the response headers are sent, so engine failures at start are never a 200. An
error after the stream started is sent as an ``error`` event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from slimserve.metrics import SlimserveMetrics
from slimserve.server import media
from slimserve.server.engines.base import (
    ChatMessage,
    Engine,
    EngineRequestError,
    ImageEngine,
    ImageRequest,
    RequestCancelled,
    TextDelta,
    TextEngine,
    TextRequest,
    VideoEngine,
    VideoRequest,
)
from slimserve.server.errors import OpenAIError, install_error_handlers
from slimserve.server.runner import EngineRunner, StepTracker, Ticket
from slimserve.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoDeleted,
    VideoError,
    VideoList,
    VideoObject,
    RequestBody,
    TextRequestBody,
)

logger = logging.getLogger("slimserve.server")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500)
}
_BEARER = HTTPBearer(auto_error=False)
_IGNORED_FIELDS_LOG_SECONDS = 60.0
_TEXT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A completion, or an SSE stream of chunks when `stream` is true.",
          "content": {"application/json": {}, "text/event-stream": {}}},
}
# How often a waiting non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ServerConfig:
    """Operator settings: authentication, queue bounds, and the largest request accepted.

    The limits protect a shared server from requests that would occupy the engine for
    hours; they are checked before queueing, and violations are answered with 400.
    """

    api_key: str | None = None
    max_running: int = 1
    max_waiting: int = 16
    default_max_tokens: int = 16
    max_tokens: int = 4096
    max_side: int = 2048
    max_steps: int = 200
    max_frames: int = 257


class _TextFormat:
    """Builds the JSON objects of ``/v1/completions`` or ``/v1/chat/completions``."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, object_name: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": [choice]}

    def chunk(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            return self._envelope("chat.completion.chunk",
                                  {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
        return self._envelope("text_completion",
                              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", {})
        body["choices"] = []
        body["usage"] = usage
        return body

    def response(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", choice)
        else:
            body = self._envelope("text_completion",
                                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
        body["usage"] = usage
        return body


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _engine_error(exc: BaseException) -> OpenAIError:
    """Translate what an engine raised into the error the client gets."""
    if isinstance(exc, EngineRequestError):
        return OpenAIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, RequestCancelled):
        return OpenAIError(499, "client closed the request", code="client_closed_request")
    logger.error("engine failed", exc_info=exc)
    return OpenAIError(500, f"engine error: {type(exc).__name__}: {exc}", code="engine_error")


class _Disconnect:
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
            await asyncio.sleep(_DISCONNECT_POLL_SECONDS)

    async def __aenter__(self) -> _Disconnect:
        self.task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task


@dataclass
class _VideoJob:
    video: VideoObject
    request: VideoRequest
    cancel: threading.Event
    content: bytes | None = None
    thumbnail: bytes | None = None
    task: asyncio.Task[None] | None = None


class SlimserveApp:
    """State behind one FastAPI app: the engine, its runner, metrics and video jobs."""

    def __init__(self, engine: Engine, config: ServerConfig, model_root: str) -> None:
        self.engine = engine
        self.config = config
        self.model_root = model_root
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.metrics = SlimserveMetrics(engine.model_name, self.registry)
        report = engine.sparsity()
        self.metrics.attention_density.set(report.attention_density)
        self.metrics.attention_skipped_heads.set(report.skipped_heads)
        self.metrics.model_compression_ratio.set(report.compression_ratio)
        self.runner: EngineRunner | None = None
        self.videos: dict[str, _VideoJob] = {}
        self._last_ignored_warning = float("-inf")

    # ---- shared checks ----------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def note_ignored(self, body: RequestBody) -> None:
        """Log unknown request fields at most once a minute, instead of failing or flooding logs."""
        ignored = body.ignored_fields()
        now = time.monotonic()
        if ignored and now - self._last_ignored_warning >= _IGNORED_FIELDS_LOG_SECONDS:
            self._last_ignored_warning = now
            logger.warning("ignoring request fields not used by slimserve: %s", ", ".join(map(repr, ignored)))

    def check_steps(self, steps: int | None) -> None:
        if steps is not None and steps > self.config.max_steps:
            raise OpenAIError(400, f"at most {self.config.max_steps} steps are allowed on this server",
                              param="num_inference_steps", code="invalid_value")

    def parse_size(self, size: str) -> tuple[int | None, int | None]:
        if size == "auto":
            return None, None
        width, height = (int(side) for side in size.split("x"))
        if max(width, height) > self.config.max_side:
            raise OpenAIError(400, f"size {size} exceeds {self.config.max_side} pixels per side",
                              param="size", code="invalid_value")
        return width, height

    # ---- text -------------------------------------------------------------------------

    def text_request(self, body: TextRequestBody, prompt: str) -> TextRequest:
        max_tokens = body.token_budget(self.config.default_max_tokens)
        if max_tokens > self.config.max_tokens:
            raise OpenAIError(400, f"max_tokens must be at most {self.config.max_tokens}", param="max_tokens",
                              code="invalid_value")
        for name, value in (("steps", body.steps), ("block_length", body.block_length)):
            if value is not None and value > self.config.max_steps:
                raise OpenAIError(400, f"{name} must be at most {self.config.max_steps}", param=name,
                                  code="invalid_value")
        return TextRequest(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature, seed=body.seed,
                           stop=tuple(body.stop_strings()), steps=body.steps, block_length=body.block_length)

    async def complete(self, body: TextRequestBody, prompt: str, chat: bool, http_request: Request) -> Response:
        """Serve a completion or chat completion, streamed or not."""
        arrival = time.perf_counter()
        engine = self.engine
        assert isinstance(engine, TextEngine) and self.runner is not None
        request = self.text_request(body, prompt)
        prompt_tokens = engine.count_tokens(prompt)
        ticket = self.runner.enqueue()
        await ticket.wait()
        self.metrics.prompt_tokens.inc(prompt_tokens)
        cancel = threading.Event()
        deltas: asyncio.Queue[TextDelta | BaseException | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tracker = StepTracker(self.metrics, cancel)

        def produce() -> None:
            try:
                for delta in engine.generate_text(request, tracker):
                    loop.call_soon_threadsafe(deltas.put_nowait, delta)
            except BaseException as exc:  # noqa: BLE001 - every failure is reported to the client
                loop.call_soon_threadsafe(deltas.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(deltas.put_nowait, None)

        self.runner.run(produce)
        stream = _TextStream(self, deltas, cancel, arrival, prompt_tokens, _TextFormat(chat, engine.model_name))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            first = await stream.first()
            return StreamingResponse(stream.sse(first, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async with _Disconnect(http_request, cancel):
            return JSONResponse(await stream.collect())

    # ---- images -----------------------------------------------------------------------

    async def generate_images(self, body: ImageGenerationRequest, http_request: Request) -> ImagesResponse:
        arrival = time.perf_counter()
        engine = self.engine
        assert isinstance(engine, ImageEngine) and self.runner is not None
        self.check_model(body.model)
        self.note_ignored(body)
        self.check_steps(body.num_inference_steps)
        width, height = self.parse_size(body.size)
        request = ImageRequest(prompt=body.prompt, n=body.n, width=width, height=height,
                               num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                               negative_prompt=body.negative_prompt, seed=body.seed)
        await self.runner.enqueue().wait()
        cancel = threading.Event()
        tracker = StepTracker(self.metrics, cancel)

        def render() -> list[str]:
            images = engine.generate_images(request, tracker)
            return [base64.b64encode(media.encode_image(image, body.output_format)).decode() for image in images]

        async with _Disconnect(http_request, cancel):
            encoded = await self._finish(self.runner.run(render), arrival)
        self.metrics.generated_images.inc(len(encoded))
        return ImagesResponse(created=int(time.time()), data=[{"b64_json": b64} for b64 in encoded],
                              output_format=body.output_format, size=body.size)

    async def _finish(self, work: asyncio.Future[Any], arrival: float) -> Any:
        """Await a media job, recording its outcome; engine failures become OpenAI errors."""
        try:
            result = await work
        except BaseException as exc:
            self.metrics.request_success("abort" if isinstance(exc, RequestCancelled) else "error")
            raise _engine_error(exc) from exc
        self.metrics.request_success("stop")
        self.metrics.e2e_request_latency.observe(time.perf_counter() - arrival)
        return result

    # ---- videos -----------------------------------------------------------------------

    def video_request(self, form: VideoForm) -> tuple[VideoRequest, str, str]:
        """Validate the create-video form; return the request, its ``seconds`` and ``size`` labels."""
        self.check_model(form.model)
        self.check_steps(form.num_inference_steps)
        width, height = self.parse_size(form.size)
        width, height = form.width or width, form.height or height
        num_frames = form.num_frames or int(form.seconds) * form.fps
        if num_frames > self.config.max_frames:
            raise OpenAIError(400, f"at most {self.config.max_frames} frames are allowed on this server",
                              param="num_frames", code="invalid_value")
        request = VideoRequest(prompt=form.prompt, width=width, height=height, num_frames=num_frames, fps=form.fps,
                               num_inference_steps=form.num_inference_steps, guidance_scale=form.guidance_scale,
                               negative_prompt=form.negative_prompt, seed=form.seed)
        seconds = f"{num_frames / form.fps:g}"
        size = f"{width}x{height}" if width and height else form.size
        return request, seconds, size

    async def render_video(self, request: VideoRequest, ticket: Ticket, cancel: threading.Event,
                           progress: Callable[[int, int], None] | None = None) -> tuple[bytes, bytes]:
        """Wait in the queue, render and encode one video; returns the MP4 and a PNG thumbnail."""
        arrival = time.perf_counter()
        engine = self.engine
        assert isinstance(engine, VideoEngine) and self.runner is not None
        await ticket.wait()
        tracker = StepTracker(self.metrics, cancel, progress)

        def render() -> tuple[bytes, bytes, int]:
            video = engine.generate_video(request, tracker)
            return media.encode_mp4(video), media.encode_thumbnail(video), len(video.frames)

        content, thumbnail, frames = await self._finish(self.runner.run(render), arrival)
        self.metrics.generated_video_frames.inc(frames)
        return content, thumbnail

    async def run_video_job(self, job: _VideoJob, ticket: Ticket) -> None:
        def progress(done: int, total: int) -> None:
            job.video.status = "in_progress"
            job.video.progress = int(100 * done / total)

        try:
            job.content, job.thumbnail = await self.render_video(job.request, ticket, job.cancel, progress)
        except OpenAIError as err:
            job.video.status = "failed"
            job.video.error = VideoError(code=err.code or "error", message=err.message)
            return
        job.video.status, job.video.progress = "completed", 100
        job.video.completed_at = int(time.time())

    def video_job(self, video_id: str) -> _VideoJob:
        if video_id not in self.videos:
            raise OpenAIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return self.videos[video_id]

    async def drain(self) -> None:
        """Let queued and running video jobs finish (graceful shutdown)."""
        pending = [job.task for job in self.videos.values() if job.task is not None and not job.task.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class _TextStream:
    """Turns engine deltas into a response, recording vLLM's latency metrics on the way."""

    def __init__(self, state: SlimserveApp, deltas: asyncio.Queue[TextDelta | BaseException | None],
                 cancel: threading.Event, arrival: float, prompt_tokens: int, fmt: _TextFormat) -> None:
        self.state = state
        self.deltas = deltas
        self.cancel = cancel
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.fmt = fmt
        self.generated = 0
        self.ttft: float | None = None
        self.last_output: float | None = None
        self.finished = False

    async def next(self) -> TextDelta | None:
        """The next delta, or ``None`` at the end; engine exceptions are raised here."""
        item = await self.deltas.get()
        if isinstance(item, BaseException):
            self.finished = True
            self.state.metrics.request_success("abort" if isinstance(item, RequestCancelled) else "error")
            raise _engine_error(item) from item
        if item is None:
            return None
        metrics = self.state.metrics
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.arrival
            metrics.time_to_first_token.observe(self.ttft)
        else:
            assert self.last_output is not None
            metrics.inter_token_latency.observe(now - self.last_output)
        self.last_output = now
        self.generated += item.num_tokens
        metrics.generation_tokens.inc(item.num_tokens)
        if item.finish_reason is not None:
            self.finished = True
            metrics.request_success(item.finish_reason)
            metrics.observe_finished_text(e2e=now - self.arrival, ttft=self.ttft, generated_tokens=self.generated)
        return item

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.generated,
                "total_tokens": self.prompt_tokens + self.generated}

    async def first(self) -> TextDelta:
        """Await the first delta before any header is sent, so start-up errors get a real status."""
        try:
            first = await self.next()
        except BaseException:
            self.abandon()
            raise
        assert first is not None, "a text engine must yield at least one delta"
        return first

    async def collect(self) -> dict[str, Any]:
        parts: list[str] = []
        finish_reason = "stop"
        try:
            while (delta := await self.next()) is not None:
                parts.append(delta.text)
                finish_reason = delta.finish_reason or finish_reason
        finally:
            self.abandon()
        return self.fmt.response("".join(parts), finish_reason, self.usage())

    async def sse(self, first: TextDelta, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: TextDelta, is_first: bool) -> str:
            body = self.fmt.chunk(delta.text, delta.finish_reason, is_first)
            if include_usage:
                body["usage"] = None
            return _sse(body)

        try:
            yield chunk(first, True)
            while (delta := await self.next()) is not None:
                yield chunk(delta, False)
            if include_usage:
                yield _sse(self.fmt.usage_chunk(self.usage()))
        except OpenAIError as err:
            yield _sse(err.body())
        finally:
            self.abandon()
        yield _sse("[DONE]")

    def abandon(self) -> None:
        """Stop the engine if the response ends early (client gone, error); count it once."""
        self.cancel.set()
        if not self.finished:
            self.finished = True
            self.state.metrics.request_success("abort")


@dataclass
class VideoForm:
    """Fields of ``POST /v1/videos`` (multipart, as the ``openai`` SDK sends them)."""

    prompt: str
    model: str | None
    seconds: Literal["4", "8", "12"]
    size: str
    width: int | None
    height: int | None
    num_frames: int | None
    fps: int
    num_inference_steps: int | None
    guidance_scale: float | None
    negative_prompt: str | None
    seed: int | None


def _video_form(
    prompt: Annotated[str, Form(min_length=1)],
    model: Annotated[str | None, Form()] = None,
    seconds: Annotated[Literal["4", "8", "12"], Form()] = "4",
    size: Annotated[str, Form(pattern=r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$")] = "auto",
    width: Annotated[int | None, Form(ge=1, le=65536)] = None,
    height: Annotated[int | None, Form(ge=1, le=65536)] = None,
    num_frames: Annotated[int | None, Form(ge=1, le=100000)] = None,
    fps: Annotated[int, Form(ge=1, le=120)] = 16,
    num_inference_steps: Annotated[int | None, Form(ge=1, le=100000)] = None,
    guidance_scale: Annotated[float | None, Form(ge=0.0, le=100.0)] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    seed: Annotated[int | None, Form(ge=0, le=2**63 - 1)] = None,
) -> VideoForm:
    return VideoForm(prompt, model, seconds, size, width, height, num_frames, fps, num_inference_steps,
                     guidance_scale, negative_prompt, seed)


def create_app(engine: Engine, config: ServerConfig | None = None, model_root: str = "") -> FastAPI:
    """Build the FastAPI app serving ``engine``; ``model_root`` is reported as the model's ``root``."""
    config = config or ServerConfig()
    state = SlimserveApp(engine, config, model_root or engine.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.runner = EngineRunner(config.max_running, config.max_waiting, state.metrics)
        yield
        await state.drain()
        state.runner.close()

    app = FastAPI(title="slimserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for diffusion transformers and diffusion LMs.")
    app.state.slimserve = state
    install_error_handlers(app)

    def authenticate(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if config.api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials, config.api_key):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=ERROR_RESPONSES)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.model_name, created=state.created, root=state.model_root)])

    if isinstance(engine, TextEngine):
        @v1.post("/completions", response_model=None, responses=_TEXT_RESPONSES)
        async def completions(body: CompletionRequest, request: Request) -> Response:
            state.check_model(body.model)
            state.note_ignored(body)
            return await state.complete(body, body.prompt_text(), chat=False, http_request=request)

        @v1.post("/chat/completions", response_model=None, responses=_TEXT_RESPONSES)
        async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
            state.check_model(body.model)
            state.note_ignored(body)
            messages = [ChatMessage(role=m.role, content=m.text()) for m in body.messages]
            try:
                prompt = engine.render_chat(messages)
            except EngineRequestError as exc:
                raise _engine_error(exc) from exc
            return await state.complete(body, prompt, chat=True, http_request=request)

    if isinstance(engine, ImageEngine):
        @v1.post("/images/generations", response_model=ImagesResponse)
        async def images_generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
            return await state.generate_images(body, request)

    if isinstance(engine, VideoEngine):
        @v1.post("/videos", response_model=VideoObject)
        async def create_video(form: Annotated[VideoForm, Depends(_video_form)]) -> VideoObject:
            request, seconds, size = state.video_request(form)
            assert state.runner is not None
            video = VideoObject(id="video_" + uuid.uuid4().hex, model=engine.model_name, status="queued", progress=0,
                                created_at=int(time.time()), prompt=form.prompt, seconds=seconds, size=size)
            job = _VideoJob(video=video, request=request, cancel=threading.Event())
            job.task = asyncio.create_task(state.run_video_job(job, state.runner.enqueue()))
            state.videos[video.id] = job
            return video

        @v1.get("/videos", response_model=VideoList)
        async def list_videos(limit: Annotated[int, Query(ge=1, le=100)] = 20) -> VideoList:
            videos = [job.video for job in state.videos.values()][-limit:]
            return VideoList(data=videos, first_id=videos[0].id if videos else None,
                             last_id=videos[-1].id if videos else None)

        @v1.get("/videos/{video_id}", response_model=VideoObject)
        async def get_video(video_id: str) -> VideoObject:
            return state.video_job(video_id).video

        @v1.delete("/videos/{video_id}", response_model=VideoDeleted)
        async def delete_video(video_id: str) -> VideoDeleted:
            job = state.videos.pop(state.video_job(video_id).video.id)
            job.cancel.set()
            return VideoDeleted(id=video_id)

        @v1.get("/videos/{video_id}/content", response_class=Response,
                responses={200: {"content": {"video/mp4": {}, "image/png": {}}}})
        async def video_content(video_id: str,
                                variant: Annotated[Literal["video", "thumbnail"], Query()] = "video") -> Response:
            job = state.video_job(video_id)
            if job.video.status != "completed":
                raise OpenAIError(400, f"video {video_id} is {job.video.status}, not completed",
                                  param="video_id", code="video_not_ready")
            if variant == "thumbnail":
                return Response(job.thumbnail, media_type="image/png")
            return Response(job.content, media_type="video/mp4")

        @v1.post("/videos/sync", response_class=Response, responses={200: {"content": {"video/mp4": {}}}})
        async def create_video_sync(form: Annotated[VideoForm, Depends(_video_form)], request: Request) -> Response:
            video_request, _, _ = state.video_request(form)
            assert state.runner is not None
            ticket = state.runner.enqueue()
            cancel = threading.Event()
            async with _Disconnect(request, cancel):
                content, _ = await state.render_video(video_request, ticket, cancel)
            return Response(content, media_type="video/mp4")

    app.include_router(v1)

    @app.get("/health", response_class=Response)
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    return app
