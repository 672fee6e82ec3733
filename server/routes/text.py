"""``/v1/completions`` and ``/v1/chat/completions`` for text engines (diffusion LMs), streamed or not.

The engine runs on a worker thread and hands its deltas to the event loop through a queue;
``TextStream`` turns them into a JSON answer or SSE chunks and records vLLM's latency metrics
(TTFT, inter-token latency, e2e) on the way. A stream awaits its first delta before any header
is sent, so engine failures at start get a real status instead of a 200.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slimserve.attention.sparsed import SparsedParams
from slimserve.server.engines.base import (
    ChatMessage,
    EngineRequestError,
    RequestCancelled,
    TextDelta,
    TextEngine,
    TextRequest,
)
from slimserve.server.errors import OpenAIError, engine_error
from slimserve.server.openai_format import TextFormat, usage
from slimserve.server.runner import StepTracker
from slimserve.server.schemas import ChatCompletionRequest, CompletionRequest, SparsedBody, TextRequestBody
from slimserve.server.sse import DisconnectWatcher, sse_event
from slimserve.server.state import AppState, State

router = APIRouter()

_TEXT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A completion, or an SSE stream of chunks when `stream` is true.",
          "content": {"application/json": {}, "text/event-stream": {}}},
}


@router.post("/completions", response_model=None, responses=_TEXT_RESPONSES)
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    arrival = time.perf_counter()
    state.check_model(body.model)
    state.note_ignored(body)
    return await _complete(state, body, body.prompt_text, chat=False, http_request=request, arrival=arrival)


@router.post("/chat/completions", response_model=None, responses=_TEXT_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    arrival = time.perf_counter()
    state.check_model(body.model)
    state.note_ignored(body)
    messages = [ChatMessage(role=m.role, content=m.text()) for m in body.messages]
    engine = _text_engine(state)
    return await _complete(state, body, lambda: engine.render_chat(messages), chat=True, http_request=request,
                           arrival=arrival)


def _text_engine(state: AppState) -> TextEngine:
    engine = state.engine
    assert isinstance(engine, TextEngine), "text routes are mounted only for text engines"
    return engine


def _text_request(state: AppState, body: TextRequestBody, prompt: str) -> TextRequest:
    """The engine request, after the server's limits on tokens and diffusion steps."""
    limits = state.config
    max_tokens = body.token_budget(limits.default_max_tokens)
    if max_tokens > limits.max_tokens:
        raise OpenAIError(400, f"max_tokens must be at most {limits.max_tokens}", param="max_tokens",
                          code="invalid_value")
    for name, value in (("steps", body.steps), ("block_length", body.block_length)):
        if value is not None and value > limits.max_steps:
            raise OpenAIError(400, f"{name} must be at most {limits.max_steps}", param=name, code="invalid_value")
    request = TextRequest(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature, seed=body.seed,
                          stop=tuple(body.stop_strings()), steps=body.steps, block_length=body.block_length,
                          sparsed=_sparsed_params(body.sparsed))
    passes = _text_engine(state).forward_passes(request)
    if passes is not None and passes > limits.max_steps:
        raise OpenAIError(400, f"this request needs {passes} forward passes (steps rounded up to whole blocks of "
                               f"max_tokens / block_length), more than this server's {limits.max_steps}; raise "
                               "block_length or lower max_tokens or steps", param="steps", code="invalid_value")
    return request


def _sparsed_params(field: bool | SparsedBody | None) -> SparsedParams | Literal[False] | None:
    """The engine's SparseD setting: ``None`` keeps the model's default, ``False`` turns it off."""
    if field is None or field is False:
        return field
    knobs = SparsedBody() if field is True else field
    return SparsedParams(skip=knobs.skip, rho=knobs.rho, block=knobs.block)


def _check_prompt_length(state: AppState, prompt_tokens: int, max_tokens: int) -> None:
    """Refuse a prompt that leaves no room for ``max_tokens`` in the model's positions (vLLM's check, too)."""
    declared = _text_engine(state).max_positions()
    positions = min(declared, state.config.max_model_len) if declared is not None else state.config.max_model_len
    if prompt_tokens + max_tokens > positions:
        raise OpenAIError(400, f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, more than "
                               f"the {positions} positions this model serves; shorten the prompt or lower max_tokens",
                          param="prompt", code="context_length_exceeded")


async def _complete(state: AppState, body: TextRequestBody, render: Callable[[], str], chat: bool,
                    http_request: Request, arrival: float) -> Response:
    """Serve a completion or chat completion, streamed or not.

    The limits that do not depend on the prompt are checked on the loop, before the queue. Rendering
    the prompt (chat template), counting its tokens and the prompt-length check then run on the engine
    thread just before generating: one thread hop per request instead of three, since on a busy host
    every hop waits for the scheduler (bench/server_overhead.py measured each at 2-4 ms under load).
    The price: a prompt too long for the model holds its engine slot for the tokenizer's time, and
    waits in the queue before it is refused (still with a 400: nothing is sent before the first delta).
    """
    engine = _text_engine(state)
    unrendered = _text_request(state, body, prompt="")
    ticket = state.runner.enqueue()
    await ticket.wait()
    cancel = threading.Event()
    deltas: asyncio.Queue[TextDelta | BaseException | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    stream = TextStream(state, deltas, cancel, arrival, TextFormat(chat, engine.model_name))

    def produce() -> None:
        try:
            try:
                prompt = render()
                prompt_tokens = engine.count_tokens(prompt)
            except EngineRequestError as exc:
                raise engine_error(exc) from exc
            _check_prompt_length(state, prompt_tokens, unrendered.max_tokens)
            # Read by the loop only after it received a delta, which this thread queues afterwards.
            stream.prompt_tokens = prompt_tokens
            state.metrics.prompt_tokens.inc(prompt_tokens)
            # Created here so that the first denoising step's time does not include the tokenizer's.
            tracker = StepTracker(state.metrics, cancel)
            for delta in engine.generate_text(replace(unrendered, prompt=prompt), tracker):
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the client
            loop.call_soon_threadsafe(deltas.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(deltas.put_nowait, None)

    state.runner.run(produce)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        first = await stream.first()
        return StreamingResponse(stream.sse(first, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    async with DisconnectWatcher(http_request, cancel):
        return JSONResponse(await stream.collect())


class TextStream:
    """Turns engine deltas into a response, recording vLLM's latency metrics on the way."""

    def __init__(self, state: AppState, deltas: asyncio.Queue[TextDelta | BaseException | None],
                 cancel: threading.Event, arrival: float, fmt: TextFormat) -> None:
        self.metrics = state.metrics
        self.deltas = deltas
        self.cancel = cancel
        self.arrival = arrival
        self.prompt_tokens = 0  # set by the engine thread once it has counted the prompt
        self.fmt = fmt
        self.generated = 0
        self.ttft: float | None = None
        self.last_output: float | None = None
        self.finished = False

    async def next(self) -> TextDelta | None:
        """The next delta, or ``None`` at the end; engine exceptions are raised here."""
        item = await self.deltas.get()
        if isinstance(item, OpenAIError):  # the prompt was refused before generating: no request ran
            self.finished = True
            raise item
        if isinstance(item, BaseException):
            self.finished = True
            self.metrics.request_success("abort" if isinstance(item, RequestCancelled) else "error")
            raise engine_error(item) from item
        if item is None:
            return None
        metrics = self.metrics
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
        if item.sparse_attention is not None:
            metrics.sparsed_kept_density.observe(item.sparse_attention.kept_density)
            metrics.sparsed_selection_seconds.observe(item.sparse_attention.selection_seconds)
        if item.finish_reason is not None:
            self.finished = True
            metrics.request_success(item.finish_reason)
            metrics.observe_finished_text(e2e=now - self.arrival, ttft=self.ttft, generated_tokens=self.generated)
        return item

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
        """The whole answer of a non-streaming request."""
        parts: list[str] = []
        finish_reason = "stop"
        try:
            while (delta := await self.next()) is not None:
                parts.append(delta.text)
                finish_reason = delta.finish_reason or finish_reason
        finally:
            self.abandon()
        return self.fmt.response("".join(parts), finish_reason, usage(self.prompt_tokens, self.generated))

    async def sse(self, first: TextDelta, include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks; an error after the stream started is an ``error`` event, then ``[DONE]`` as always."""
        def chunk(delta: TextDelta, is_first: bool) -> str:
            body = self.fmt.chunk(delta.text, delta.finish_reason, is_first)
            if include_usage:
                body["usage"] = None
            return sse_event(body)

        try:
            yield chunk(first, True)
            while (delta := await self.next()) is not None:
                yield chunk(delta, False)
            if include_usage:
                yield sse_event(self.fmt.usage_chunk(usage(self.prompt_tokens, self.generated)))
        except OpenAIError as err:
            yield sse_event(err.body())
        finally:
            self.abandon()
        yield sse_event("[DONE]")

    def abandon(self) -> None:
        """Stop the engine if the response ends early (client gone, error); count it once."""
        self.cancel.set()
        if not self.finished:
            self.finished = True
            self.metrics.request_success("abort")
