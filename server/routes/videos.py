"""OpenAI's ``/v1/videos`` job API for video engines, plus ``/v1/videos/sync``, which answers the MP4 itself.

``POST /v1/videos`` validates, queues and returns the job at once; the render runs as an
asyncio task that holds its place in the runner's queue like any request, so jobs and
synchronous requests share one admission limit. Jobs live in ``jobs.VideoJobStore``, which
bounds them by count, bytes and age; results are files on disk, served from there.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import Response

from slimserve.server import media
from slimserve.server.engines.base import VideoEngine, VideoRequest
from slimserve.server.errors import OpenAIError
from slimserve.server.jobs import VideoJob
from slimserve.server.runner import StepTracker, Ticket
from slimserve.server.schemas import VideoDeleted, VideoGenerationRequest, VideoList, VideoObject
from slimserve.server.sse import DisconnectWatcher
from slimserve.server.state import AppState, State

router = APIRouter()

VideoForm = Annotated[VideoGenerationRequest, Form()]


@router.post("/videos", response_model=VideoObject)
async def create_video(form: VideoForm, state: State) -> VideoObject:
    request, seconds, size = _video_request(state, form)
    video = VideoObject(id="video_" + uuid.uuid4().hex, model=state.engine.model_name, status="queued", progress=0,
                        created_at=int(time.time()), prompt=form.prompt, seconds=seconds, size=size)
    job = VideoJob(video=video, request=request)
    state.videos.add(job)  # 429 when the store is full of live jobs, before taking a queue place
    try:
        ticket = state.runner.enqueue()
    except OpenAIError:
        state.videos.delete(video.id)
        raise
    job.task = asyncio.create_task(_run_job(state, job, ticket))
    return video


@router.get("/videos", response_model=VideoList)
async def list_videos(state: State, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                      after: Annotated[str | None, Query(max_length=100)] = None,
                      order: Annotated[Literal["asc", "desc"], Query()] = "desc") -> VideoList:
    videos, has_more = state.videos.page(limit, after, order)
    return VideoList(data=videos, has_more=has_more, first_id=videos[0].id if videos else None,
                     last_id=videos[-1].id if videos else None)


@router.get("/videos/{video_id}", response_model=VideoObject)
async def get_video(video_id: str, state: State) -> VideoObject:
    return state.videos.get(video_id).video


@router.delete("/videos/{video_id}", response_model=VideoDeleted)
async def delete_video(video_id: str, state: State) -> VideoDeleted:
    state.videos.delete(video_id)
    return VideoDeleted(id=video_id)


@router.get("/videos/{video_id}/content", response_class=Response,
            responses={200: {"content": {"video/mp4": {}, "image/png": {}}}})
async def video_content(video_id: str, state: State,
                        variant: Annotated[Literal["video", "thumbnail"], Query()] = "video") -> Response:
    job = state.videos.get(video_id)
    if job.video.status != "completed":
        raise OpenAIError(400, f"video {video_id} is {job.video.status}, not completed",
                          param="video_id", code="video_not_ready")
    path = job.thumbnail_path if variant == "thumbnail" else job.content_path
    assert path is not None, "a completed job has its files"
    # Read now rather than streaming the file: an eviction right after must not cut the download.
    return Response(path.read_bytes(), media_type="image/png" if variant == "thumbnail" else "video/mp4")


@router.post("/videos/sync", response_class=Response, responses={200: {"content": {"video/mp4": {}}}})
async def create_video_sync(form: VideoForm, request: Request, state: State) -> Response:
    video_request, _, _ = _video_request(state, form)
    ticket = state.runner.enqueue()
    cancel = threading.Event()
    async with DisconnectWatcher(request, cancel):
        content, _ = await _render(state, video_request, ticket, cancel)
    return Response(content, media_type="video/mp4")


def _video_request(state: AppState, form: VideoGenerationRequest) -> tuple[VideoRequest, str, str]:
    """Check the form against the server's limits; return the request, its ``seconds`` and ``size`` labels."""
    state.check_model(form.model)
    state.note_ignored(form)
    state.check_steps(form.num_inference_steps)
    width, height = state.media_size(form.size, form.width, form.height)
    num_frames = form.num_frames or int(form.seconds) * form.fps
    if num_frames > state.config.max_frames:
        raise OpenAIError(400, f"at most {state.config.max_frames} frames are allowed on this server",
                          param="num_frames", code="invalid_value")
    state.check_pixels(width, height, num_frames, 1, param="num_frames")
    request = VideoRequest(prompt=form.prompt, width=width, height=height, num_frames=num_frames, fps=form.fps,
                           num_inference_steps=form.num_inference_steps, guidance_scale=form.guidance_scale,
                           negative_prompt=form.negative_prompt, seed=form.seed)
    seconds = f"{num_frames / form.fps:g}"
    size = f"{width}x{height}" if width and height else form.size
    return request, seconds, size


async def _render(state: AppState, request: VideoRequest, ticket: Ticket, cancel: threading.Event,
                  progress: Callable[[int, int], None] | None = None,
                  on_engine: Callable[[], None] | None = None) -> tuple[bytes, bytes]:
    """Wait in the queue, render and encode one video; returns the MP4 and a PNG thumbnail.

    ``on_engine`` is called once the request holds an engine slot (from then on it must not be
    cancelled as a task, only through ``cancel``).
    """
    arrival = time.perf_counter()
    engine = state.engine
    assert isinstance(engine, VideoEngine), "video routes are mounted only for video engines"
    await ticket.wait()
    if on_engine is not None:
        on_engine()
    tracker = StepTracker(state.metrics, cancel, progress)

    def render() -> tuple[bytes, bytes, int]:
        video = engine.generate_video(request, tracker)
        return media.encode_mp4(video), media.encode_thumbnail(video), len(video.frames)

    content, thumbnail, frames = await state.finish_media(state.runner.run(render), arrival)
    state.metrics.generated_video_frames.inc(frames)
    return content, thumbnail


async def _run_job(state: AppState, job: VideoJob, ticket: Ticket) -> None:
    """Render a job in the background; its failure is the job's status, not an HTTP error."""

    def hold_engine() -> None:
        job.on_engine = True

    try:
        content, thumbnail = await _render(state, job.request, ticket, job.cancel, job.progress, hold_engine)
    except OpenAIError as err:
        state.videos.fail(job, err)
        return
    state.videos.complete(job, content, thumbnail)
