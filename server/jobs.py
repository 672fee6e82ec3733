"""The store behind OpenAI's asynchronous ``/v1/videos`` API: one job per created video.

A job is created queued, moves to ``in_progress`` with the engine's first step, and ends
``completed`` (the MP4 and a PNG thumbnail written to the store's folder) or ``failed`` (with
the error the synchronous route would have answered). Everything the server keeps about jobs
lives here, and all of it is bounded:

- at most ``max_jobs`` jobs; a new job first evicts expired ones, then the oldest finished one,
  and is refused with 429 when every kept job is still queued or running;
- finished results live on disk (a temporary folder per server, removed on shutdown), at most
  ``max_bytes`` of them: older finished videos are evicted to make room for a new one;
- a finished job expires ``ttl_seconds`` after it finished (``expires_at``), after which it is
  forgotten and its files deleted.

Nothing survives a restart: the folder is removed at shutdown and a new server starts empty.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from slimserve.server.engines.base import VideoRequest
from slimserve.server.errors import OpenAIError
from slimserve.server.schemas import VideoError, VideoObject

logger = logging.getLogger("slimserve.server")


@dataclass
class VideoJob:
    """One video job: its public ``VideoObject``, what to render, and where its result is once done."""

    video: VideoObject
    request: VideoRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    # True once the job holds an engine slot: from then on only ``cancel`` may stop it, because
    # cancelling the task would release the slot while the engine thread still runs.
    on_engine: bool = False
    content_path: Path | None = None
    thumbnail_path: Path | None = None
    size_bytes: int = 0

    def progress(self, done: int, total: int) -> None:
        """The engine's step callback reports here (from the engine thread)."""
        self.video.status = "in_progress"
        self.video.progress = int(100 * done / total)

    @property
    def finished(self) -> bool:
        return self.video.status in ("completed", "failed")

    def expired(self, now: float) -> bool:
        return self.video.expires_at is not None and now >= self.video.expires_at


class VideoJobStore:
    """Video jobs by id in creation order, bounded by count, bytes on disk and age."""

    def __init__(self, max_jobs: int, max_bytes: int, ttl_seconds: int) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._jobs: dict[str, VideoJob] = {}
        self._folder: Path | None = None
        self.stored_bytes = 0

    # ---- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folder results are written to (one per server, private to its user)."""
        self._folder = Path(tempfile.mkdtemp(prefix="slimserve-videos-"))

    def close(self) -> None:
        """Forget every job and delete the folder: results never outlive the server."""
        self._jobs.clear()
        self.stored_bytes = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    @property
    def folder(self) -> Path:
        assert self._folder is not None, "the job store is open only while the app is being served"
        return self._folder

    async def drain(self, timeout: float) -> None:
        """Give queued and running jobs ``timeout`` seconds to finish, then cancel the rest.

        Queued jobs are cancelled outright; running ones are told to stop at their next step and
        awaited, so the engine threads are idle when the runner shuts down.
        """
        pending = [job for job in self._jobs.values() if job.task is not None and not job.task.done()]
        if not pending:
            return
        _, late = await asyncio.wait([job.task for job in pending if job.task], timeout=timeout)
        if late:
            logger.warning("shutdown: cancelling %d video jobs still unfinished after %.0f s", len(late), timeout)
        for job in pending:
            if job.task in late:
                self._stop(job)
        if late:
            await asyncio.gather(*late, return_exceptions=True)

    # ---- jobs -----------------------------------------------------------------------------

    def add(self, job: VideoJob) -> None:
        """Keep a new job, making room by evicting expired and then the oldest finished jobs (else 429)."""
        self.expire()
        while len(self._jobs) >= self.max_jobs:
            oldest_finished = next((j for j in self._jobs.values() if j.finished), None)
            if oldest_finished is None:
                raise OpenAIError(429, f"{len(self._jobs)} video jobs are queued or running, the most this server "
                                       "keeps; retry later", code="too_many_jobs", headers={"Retry-After": "5"})
            self._forget(oldest_finished)
        self._jobs[job.video.id] = job

    def get(self, video_id: str) -> VideoJob:
        """The job, or the 404 a client gets for an unknown, deleted or expired id."""
        self.expire()
        if video_id not in self._jobs:
            raise OpenAIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return self._jobs[video_id]

    def delete(self, video_id: str) -> VideoJob:
        """Forget the job and stop it: a queued job leaves the queue at once, a running one at its next step."""
        job = self.get(video_id)
        self._stop(job)
        self._forget(job)
        return job

    def page(self, limit: int, after: str | None, order: str) -> tuple[list[VideoObject], bool]:
        """Up to ``limit`` videos after the id ``after`` in ``order`` ("asc": oldest first), and whether more follow."""
        self.expire()
        videos = [job.video for job in self._jobs.values()]
        if order == "desc":
            videos.reverse()
        if after is not None:
            ids = [video.id for video in videos]
            if after not in ids:
                raise OpenAIError(400, f"no video with id {after!r} to list after", param="after", code="not_found")
            videos = videos[ids.index(after) + 1:]
        return videos[:limit], len(videos) > limit

    def complete(self, job: VideoJob, content: bytes, thumbnail: bytes) -> None:
        """Write the result to disk within ``max_bytes`` (evicting older results) and mark the job completed."""
        size = len(content) + len(thumbnail)
        if size > self.max_bytes:
            self.fail(job, OpenAIError(400, f"the video takes {size} bytes, more than this server keeps "
                                            f"({self.max_bytes}); ask for fewer frames or a smaller size",
                                       code="video_too_large"))
            return
        if job.video.id not in self._jobs:  # deleted while it rendered: keep nothing
            return
        for older in [j for j in self._jobs.values() if j.content_path is not None]:
            if self.stored_bytes + size <= self.max_bytes:
                break
            self._forget(older)
        job.content_path = self.folder / f"{job.video.id}.mp4"
        job.thumbnail_path = self.folder / f"{job.video.id}.png"
        job.content_path.write_bytes(content)
        job.thumbnail_path.write_bytes(thumbnail)
        job.size_bytes = size
        self.stored_bytes += size
        job.video.status, job.video.progress = "completed", 100
        self._finish(job)

    def fail(self, job: VideoJob, error: OpenAIError) -> None:
        job.video.status = "failed"
        job.video.error = VideoError(code=error.code or "error", message=error.message)
        self._finish(job)

    def expire(self) -> None:
        """Forget jobs past their ``expires_at`` (checked on every access, so no timer is needed)."""
        now = time.time()
        for job in [j for j in self._jobs.values() if j.expired(now)]:
            self._forget(job)

    # ---- internals ------------------------------------------------------------------------

    def _finish(self, job: VideoJob) -> None:
        job.video.completed_at = int(time.time())
        job.video.expires_at = job.video.completed_at + self.ttl_seconds

    def _stop(self, job: VideoJob) -> None:
        job.cancel.set()
        if job.task is not None and not job.on_engine:
            job.task.cancel()  # still waiting for a slot: leave the queue now

    def _forget(self, job: VideoJob) -> None:
        self._jobs.pop(job.video.id, None)
        for path in (job.content_path, job.thumbnail_path):
            if path is not None:
                path.unlink(missing_ok=True)
        self.stored_bytes -= job.size_bytes
        job.size_bytes = 0
        job.content_path = job.thumbnail_path = None
