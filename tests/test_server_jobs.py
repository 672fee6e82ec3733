"""The ``/v1/videos`` job store is bounded and honest (issue 13, item 2), over real HTTP with the trivial engine.

Jobs are bounded by count and bytes, results live in a per-server folder removed at shutdown,
``expires_at`` is filled and enforced, pagination works, DELETE frees a queued slot, and a
server that is shutting down refuses new work with 503 while its drain is bounded.
"""

from __future__ import annotations

import os
import signal
import time

import httpx

from slimserve.server.app import ServerConfig, create_app
from slimserve.server.state import AppState
from slimserve.testing.live import app_in_thread
from slimserve.testing.trivial import TrivialEngine


def create(base_url: str, **fields: str) -> dict:
    response = httpx.post(base_url + "/v1/videos", data={"prompt": "grey", "num_frames": "2", **fields})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(base_url: str, video_id: str, status: str = "completed", timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = httpx.get(f"{base_url}/v1/videos/{video_id}").json()
        if video.get("status") == status:
            return video
        time.sleep(0.02)
    raise AssertionError(f"{video_id} did not reach {status}: {video}")


def test_results_on_disk_expire_and_vanish_at_shutdown() -> None:
    # 3 s: completed_at is whole seconds, so the result lives at least 2 s, time for the checks on a loaded machine
    app = create_app(TrivialEngine(), ServerConfig(video_ttl_seconds=3))
    state: AppState = app.state.slimserve
    with app_in_thread(app) as base_url:
        video = wait_for(base_url, create(base_url)["id"])
        assert video["expires_at"] == video["completed_at"] + 3
        folder = state.videos.folder
        assert sorted(p.name for p in folder.iterdir()) == [f"{video['id']}.mp4", f"{video['id']}.png"]
        content = httpx.get(f"{base_url}/v1/videos/{video['id']}/content")
        assert content.status_code == 200 and content.content == (folder / f"{video['id']}.mp4").read_bytes()
        time.sleep(4.1 - (time.time() - video["completed_at"]))  # past expires_at (whole seconds)
        assert httpx.get(f"{base_url}/v1/videos/{video['id']}").status_code == 404
        assert list(folder.iterdir()) == []
        create(base_url)
    assert not folder.exists()  # nothing survives the server


def test_pagination_after_and_has_more() -> None:
    with app_in_thread(create_app(TrivialEngine())) as base_url:
        ids = [create(base_url)["id"] for _ in range(5)]
        for video_id in ids:
            wait_for(base_url, video_id)
        seen: list[str] = []
        after = None
        while True:
            params = {"limit": 2, "order": "asc", **({"after": after} if after else {})}
            page = httpx.get(base_url + "/v1/videos", params=params).json()
            seen += [v["id"] for v in page["data"]]
            assert page["has_more"] == (len(seen) < 5)
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == ids
        newest = httpx.get(base_url + "/v1/videos", params={"limit": 1}).json()  # OpenAI's default: newest first
        assert [v["id"] for v in newest["data"]] == [ids[-1]] and newest["has_more"]
        missing = httpx.get(base_url + "/v1/videos", params={"after": "video_nope"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "after"


def test_count_bound_evicts_finished_jobs_and_refuses_when_all_live() -> None:
    config = ServerConfig(max_video_jobs=2, max_waiting=8)
    with app_in_thread(create_app(TrivialEngine(step_seconds=0.3), config)) as base_url:
        first, second = create(base_url), create(base_url)
        refused = httpx.post(base_url + "/v1/videos", data={"prompt": "grey", "num_frames": "2"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
        wait_for(base_url, first["id"])
        third = create(base_url)  # evicts the finished first job
        assert httpx.get(f"{base_url}/v1/videos/{first['id']}").status_code == 404
        for video in (second, third):
            wait_for(base_url, video["id"])


def test_byte_bound_evicts_older_results_and_fails_oversized_ones() -> None:
    app = create_app(TrivialEngine())
    state: AppState = app.state.slimserve
    with app_in_thread(app) as base_url:
        first = wait_for(base_url, create(base_url)["id"])
        one_result = state.videos.stored_bytes  # a 16x16 2-frame MP4 plus its PNG thumbnail
        state.videos.max_bytes = 2 * one_result + one_result // 2  # room for two such results
        second = wait_for(base_url, create(base_url)["id"])
        third = wait_for(base_url, create(base_url)["id"])
        assert state.videos.stored_bytes == 2 * one_result
        assert httpx.get(f"{base_url}/v1/videos/{first['id']}").status_code == 404
        for video in (second, third):
            assert httpx.get(f"{base_url}/v1/videos/{video['id']}/content").status_code == 200
        big = create(base_url, size="512x512", num_frames="8")
        failed = wait_for(base_url, big["id"], status="failed")
        assert failed["error"]["code"] == "video_too_large"


def test_delete_frees_a_queued_slot() -> None:
    config = ServerConfig(max_running=1, max_waiting=2)
    with app_in_thread(create_app(TrivialEngine(step_seconds=0.2), config)) as base_url:
        running = create(base_url, num_inference_steps="10")  # 2 s on the engine
        time.sleep(0.1)
        queued = [create(base_url), create(base_url)]
        assert httpx.post(base_url + "/v1/videos", data={"prompt": "grey"}).status_code == 429
        assert httpx.delete(f"{base_url}/v1/videos/{queued[0]['id']}").json()["deleted"] is True
        replacement = create(base_url)  # the deleted job's queue place is free at once
        assert httpx.get(f"{base_url}/v1/videos/{running['id']}").json()["status"] in ("queued", "in_progress")
        for video in (queued[1], replacement):
            wait_for(base_url, video["id"])


def test_shutdown_refuses_new_work_and_bounds_the_drain() -> None:
    app = create_app(TrivialEngine(step_seconds=0.1), ServerConfig(drain_seconds=0.5))
    state: AppState = app.state.slimserve
    with app_in_thread(app) as base_url:
        long_job = create(base_url, num_inference_steps="200")  # 20 s if nobody stops it
        wait_for(base_url, long_job["id"], status="in_progress")
        state.runner.stop_admitting()  # what SIGTERM does first
        refused = httpx.post(base_url + "/v1/videos", data={"prompt": "grey"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert httpx.post(base_url + "/v1/completions", json={"prompt": "a"}).status_code == 503
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5  # 0.5 s drain, then cancelled at the next 0.1 s step


def test_sigterm_handler_refuses_new_work_then_hands_over() -> None:
    """In the main thread the app chains its SIGTERM handler in front of the server's (uvicorn's)."""
    received: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        state = create_app(TrivialEngine()).state.slimserve
        state.start()
        assert state.runner.admitting
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 2
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [signal.SIGTERM] and not state.runner.admitting
        state.runner.close()
        state.videos.close()
    finally:
        signal.signal(signal.SIGTERM, original)


def test_job_folder_is_private() -> None:
    app = create_app(TrivialEngine())
    with app_in_thread(app):
        assert app.state.slimserve.videos.folder.stat().st_mode & 0o777 == 0o700
