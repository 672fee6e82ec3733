"""Overhead of slimserve's FastAPI layer: TTFT and e2e over HTTP vs the engine called directly.

The engine is ``TrivialEngine`` with a fixed time per token (a stand-in for a small model's
decode step), so any difference is the HTTP layer: validation, queueing, the worker-thread
hop, SSE framing, metrics. The server runs in its own process (as in production); the
client streams ``/v1/chat/completions`` over loopback, one request at a time.

Definitions (``vllm bench serve``): TTFT = send -> first streamed chunk with content;
E2E = send -> last byte. Goal (issue 5): HTTP TTFT p50 within 5 % of the direct TTFT p50.

    python bench/server_overhead.py [--requests 100] [--step-ms 25] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from slimserve.server.engines.base import TextRequest
from slimserve.testing.live import ServerProcess, free_port
from slimserve.testing.trivial import TrivialEngine

README = Path(__file__).resolve().parent / "README.md"
SECTION = "## FastAPI overhead (issue 5)"
SERVER_CODE = """
import sys, uvicorn
from slimserve.server.app import create_app
from slimserve.testing.trivial import TrivialEngine
app = create_app(TrivialEngine(step_seconds=float(sys.argv[1])))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def direct(engine: TrivialEngine, requests: int, max_tokens: int) -> tuple[list[float], list[float]]:
    ttfts, e2es = [], []
    for _ in range(requests):
        start = time.perf_counter()
        deltas = engine.generate_text(TextRequest(prompt="hello world", max_tokens=max_tokens), lambda d, t: None)
        next(deltas)
        ttfts.append(time.perf_counter() - start)
        for _ in deltas:
            pass
        e2es.append(time.perf_counter() - start)
    return ttfts, e2es


def over_http(base_url: str, requests: int, max_tokens: int) -> tuple[list[float], list[float]]:
    body = {"model": "trivial", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": max_tokens,
            "stream": True}
    ttfts, e2es = [], []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(requests):
            start = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if first is None and line.startswith("data: {"):
                        if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            first = time.perf_counter()
            e2es.append(time.perf_counter() - start)
            assert first is not None and response.status_code == 200
            ttfts.append(first - start)
    return ttfts, e2es


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--step-ms", type=float, default=25.0, help="engine time per token")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    step = args.step_ms / 1000

    load_before = os.getloadavg()[0]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess([sys.executable, "-c", SERVER_CODE, str(step), str(port)], port, Path(tmp) / "log"):
        over_http(f"http://127.0.0.1:{port}", 5, args.max_tokens)  # warm-up
        http_ttft, http_e2e = over_http(f"http://127.0.0.1:{port}", args.requests, args.max_tokens)
    direct_ttft, direct_e2e = direct(TrivialEngine(step_seconds=step), args.requests, args.max_tokens)

    rows = []
    for name, base, served in (("TTFT", direct_ttft, http_ttft), ("E2E", direct_e2e, http_e2e)):
        for q in (50, 90, 99):
            b, s = percentile(base, q) * 1000, percentile(served, q) * 1000
            rows.append(f"| {name} p{q} | {b:.2f} | {s:.2f} | {s - b:+.2f} | {s / b:.3f} |")
    ttft_ratio = statistics.median(http_ttft) / statistics.median(direct_ttft)
    table = "\n".join([
        f"Command: `python bench/server_overhead.py --requests {args.requests} --step-ms {args.step_ms:g} "
        f"--max-tokens {args.max_tokens}`",
        "",
        f"TrivialEngine sleeping {args.step_ms:g} ms per token, {args.max_tokens} tokens, {args.requests} sequential "
        "streamed chat requests over loopback (server in its own process) vs the engine called in-process. "
        "Definitions of `vllm bench serve`: TTFT = send -> first chunk with content, E2E = send -> last byte.",
        "",
        "| metric | direct (ms) | over HTTP (ms) | overhead (ms) | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"TTFT p50 ratio {ttft_ratio:.3f} (goal <= 1.05): {'met' if ttft_ratio <= 1.05 else 'NOT met'}. "
        f"Host: {os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} when the run started "
        "(the overhead is a fixed few ms of CPU work, so it grows on a busy host).",
    ])
    print(table)
    if not args.no_readme:
        write_section(table)


def write_section(table: str) -> None:
    """Add or replace this benchmark's section of bench/README.md, leaving other sections alone."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{table}\n"
    if SECTION in text:
        start = text.index(SECTION)
        following = text.find("\n## ", start + len(SECTION))
        text = text[:start] + block + (text[following:] if following != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    README.write_text(text)


if __name__ == "__main__":
    main()
