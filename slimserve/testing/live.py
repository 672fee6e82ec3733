"""Run a server on loopback for tests, the load test and the benchmark, and always stop it.

Two forms: ``app_in_thread`` runs a FastAPI app under uvicorn inside this process (fast to
start, shares the engine object with the caller), and ``ServerProcess`` runs a command such as
``slimserve serve DIR`` as a child process, exactly as a user would (``serve_process`` builds
that command line).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

# The ``slimserve`` console script of the running interpreter's environment (not whatever is first on PATH).
SLIMSERVE = str(Path(sys.executable).parent / "slimserve")


def free_port() -> int:
    """A TCP port on loopback that is free right now (bind to port 0 and let the OS choose)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(base_url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``/health`` until it answers 200; fail early if ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for {base_url} exited before becoming healthy")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout:.0f} s")


@contextmanager
def app_in_thread(app: object, port: int | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread; yield its base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, timeout=30, alive=thread.is_alive)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class ServerProcess:
    """A server started as a child process in its own process group, logging to a file."""

    def __init__(self, argv: Sequence[str], port: int, log_path: str | Path,
                 env: Mapping[str, str] | None = None, start_timeout: float = 120.0) -> None:
        self.argv = list(argv)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        """Start the process and wait until it is healthy (``with`` calls this)."""
        if self.process is not None:
            raise RuntimeError("server already started")
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        try:
            wait_until_healthy(self.base_url, self.start_timeout, alive=lambda: self.process.poll() is None)
        except BaseException:
            self.stop()
            raise RuntimeError(f"server failed to start; log:\n{self.log_tail()}") from None
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def terminate(self) -> None:
        """Ask for a graceful shutdown (SIGTERM to the server process only)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_process(model_dir: str | Path, log_path: str | Path, *, served_model_name: str | None = None,
                  api_key: str | None = None, options: Sequence[str] = (), engine_args: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, start_timeout: float = 120.0) -> ServerProcess:
    """``slimserve serve MODEL_DIR`` on a free loopback port, as a user would start it (not yet started).

    ``options`` are slimserve's own serve flags (limits, Sirius); ``engine_args`` follow ``--`` and go to
    the engine unchanged (vLLM's own flags for a causal LM).
    """
    port = free_port()
    argv = [SLIMSERVE, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    if served_model_name is not None:
        argv += ["--served-model-name", served_model_name]
    if api_key is not None:
        argv += ["--api-key", api_key]
    argv += list(options)
    if engine_args:
        argv += ["--", *engine_args]
    return ServerProcess(argv, port, log_path, env=env, start_timeout=start_timeout)
