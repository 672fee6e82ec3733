"""Operator settings of slimserve's FastAPI app, kept apart from the routes that read them.

``slimserve serve`` fills them from its flags (``launch.py``); tests build them directly to
run an app with small limits.
"""

from __future__ import annotations

from dataclasses import dataclass


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
