"""The store behind OpenAI's asynchronous ``/v1/videos`` API: one job per created video.

A job is created queued, moves to ``in_progress`` with the engine's first step, and ends
``completed`` (the MP4 and a PNG thumbnail kept for download) or ``failed`` (with the error the
synchronous route would have answered). Everything the server keeps about jobs lives here, so
bounding the store (count, bytes, expiry) is a change to this module only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from slimserve.server.engines.base import VideoRequest
from slimserve.server.errors import OpenAIError
from slimserve.server.schemas import VideoError, VideoObject


@dataclass
class VideoJob:
    """One video job: its public ``VideoObject``, what to render, and the result once done."""

    video: VideoObject
    request: VideoRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    content: bytes | None = None
    thumbnail: bytes | None = None
    task: asyncio.Task[None] | None = None

    def progress(self, done: int, total: int) -> None:
        """The engine's step callback reports here (from the engine thread)."""
        self.video.status = "in_progress"
        self.video.progress = int(100 * done / total)

    def complete(self, content: bytes, thumbnail: bytes) -> None:
        self.content, self.thumbnail = content, thumbnail
        self.video.status, self.video.progress = "completed", 100
        self.video.completed_at = int(time.time())

    def fail(self, error: OpenAIError) -> None:
        self.video.status = "failed"
        self.video.error = VideoError(code=error.code or "error", message=error.message)


class VideoJobStore:
    """Video jobs by id, in creation order."""

    def __init__(self) -> None:
        self._jobs: dict[str, VideoJob] = {}

    def add(self, job: VideoJob) -> None:
        self._jobs[job.video.id] = job

    def get(self, video_id: str) -> VideoJob:
        """The job, or the 404 a client gets for an unknown (or deleted) id."""
        if video_id not in self._jobs:
            raise OpenAIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return self._jobs[video_id]

    def delete(self, video_id: str) -> VideoJob:
        """Forget the job and stop its rendering if it is still running."""
        job = self._jobs.pop(self.get(video_id).video.id)
        job.cancel.set()
        return job

    def latest(self, limit: int) -> list[VideoObject]:
        """The ``limit`` most recently created videos, oldest first."""
        return [job.video for job in self._jobs.values()][-limit:]

    async def drain(self) -> None:
        """Let queued and running video jobs finish (graceful shutdown)."""
        pending = [job.task for job in self._jobs.values() if job.task is not None and not job.task.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
