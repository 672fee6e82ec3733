"""Operator settings of slimserve's FastAPI app, kept apart from the routes that read them.

``slimserve serve`` fills them from its flags (``add_limit_flags`` declares one flag per
limit, ``config_from_flags`` reads them back); tests build ``ServerConfig`` directly to run an
app with small limits. The defaults and what each limit protects are listed in
``docs/serving-limits.md``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from slimserve.errors import SlimserveError

# Environment variable holding the API key, so that the key never appears in argv (``/proc/PID/cmdline``).
API_KEY_ENV = "SLIMSERVE_API_KEY"
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


@dataclass(frozen=True)
class ServerConfig:
    """Operator settings: authentication, queue bounds, and the largest request accepted.

    Every limit bounds the cost of one request before any work is spent on it: the body is
    refused while it is read (413), everything else after parsing and before queueing (400).
    """

    api_key: str | None = None
    max_running: int = 1
    max_waiting: int = 16
    # Bytes of one request body, counted while it streams in, before parsing and authentication.
    max_body_bytes: int = 2 * 1024 * 1024
    default_max_tokens: int = 16
    max_tokens: int = 4096
    # Prompt plus completion tokens when the engine does not declare its own position limit.
    max_model_len: int = 8192
    max_side: int = 2048
    max_steps: int = 200
    max_frames: int = 257
    # Width x height x frames x n of one image or video request (the default is 1024 x 1024 x 32).
    max_pixels: int = 1024 * 1024 * 32
    # The video job store: jobs kept (any status) and bytes of finished MP4s and thumbnails on disk.
    max_video_jobs: int = 100
    max_video_bytes: int = 2 * 1024**3
    # Seconds a finished video stays downloadable (OpenAI's ``expires_at``).
    video_ttl_seconds: int = 3600
    # Seconds running and queued video jobs get to finish on shutdown; keep it below the deploy's grace period.
    drain_seconds: float = 20.0


# Flag help for every limit ``slimserve serve`` exposes; ``api_key`` has its own flags.
_LIMIT_HELP = {
    "max_running": "requests on the engine at once",
    "max_waiting": "queued requests before 429",
    "max_body_bytes": "largest request body in bytes (413 beyond, before parsing and authentication)",
    "default_max_tokens": "completion tokens when a request sets no max_tokens",
    "max_tokens": "largest max_tokens of a text request",
    "max_model_len": "prompt + completion tokens when the model declares no position limit",
    "max_side": "largest width or height of an image or video",
    "max_steps": "most denoising steps (or diffusion-LM forward passes) of one request",
    "max_frames": "most frames of one video",
    "max_pixels": "largest width x height x frames x n of one image or video request",
    "max_video_jobs": "video jobs kept by /v1/videos (finished ones expire first; 429 when all are live)",
    "max_video_bytes": "bytes of finished videos kept on disk",
    "video_ttl_seconds": "seconds a finished video stays downloadable",
    "drain_seconds": "seconds video jobs get to finish after SIGTERM (keep below the deploy's grace period)",
}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--max-...`` flag per ``ServerConfig`` limit, with its default in the help text."""
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        if field.name in _LIMIT_HELP:
            default = getattr(defaults, field.name)
            parser.add_argument("--" + field.name.replace("_", "-"), type=type(default), default=default,
                                help=f"{_LIMIT_HELP[field.name]} (default {default})")


def config_from_flags(args: argparse.Namespace, api_key: str | None) -> ServerConfig:
    """The ``ServerConfig`` of parsed ``serve`` flags (``add_limit_flags``) and the resolved API key."""
    return ServerConfig(api_key=api_key, **{name: getattr(args, name) for name in _LIMIT_HELP})


def resolve_api_key(api_key_file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The API key from ``--api-key-file`` (a mounted secret) or else ``$SLIMSERVE_API_KEY``; ``None`` if neither.

    The key is never taken from argv, where every local user can read it. Trailing newlines of
    a secret file are dropped; an empty key is refused rather than silently disabling auth.
    """
    environ = dict(os.environ) if environ is None else environ
    if api_key_file is not None:
        path = Path(api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SlimserveError(f"cannot read the API key: {exc}", file=str(path),
                                 expected="a readable UTF-8 text file holding the key") from exc
        if not key:
            raise SlimserveError("the API key file is empty", file=str(path), expected="a non-empty key")
        return key
    key = environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise SlimserveError(f"${API_KEY_ENV} is set but empty", field=API_KEY_ENV, expected="a non-empty key")
    return key.strip() if key else None


def default_host(host: str | None, api_key: str | None) -> str:
    """Loopback unless a key protects the server or the operator chose a host with ``--host``."""
    if host is not None:
        return host
    return ALL_INTERFACES if api_key is not None else LOOPBACK
