"""Overhead of slimserve's FastAPI layer: TTFT and e2e over HTTP vs the engine called directly.

The engine is ``TrivialEngine`` with a fixed time per token (a stand-in for a small model's
decode step), so any difference is the HTTP layer: validation, queueing, the worker-thread
hop, SSE framing, metrics. The server runs in its own process (as in production); the
client streams ``/v1/chat/completions`` over loopback, one request at a time.

A third column is the floor any Python server pays on this host: a bare ASGI app under the
same uvicorn, streaming the same engine's deltas through one worker thread, with no FastAPI,
validation, queue or metrics. slimserve minus that floor is what slimserve's own layer costs;
the floor itself is loopback TCP, HTTP parsing and two cross-thread wake-ups, which on a busy
host are scheduler waits. (vLLM's own OpenAI server is not measured here: it has no engine
that sleeps a fixed time per token, so the same comparison cannot be set up.)

The machine is shared and noisy, so the three are measured in turns, ``--repeats`` times,
and the table gives medians over repeats of each repeat's percentiles, with the 1-minute load
average of every repeat.

Definitions (``vllm bench serve``): TTFT = send -> first streamed chunk with content;
E2E = send -> last byte. Goal (issues 5 and 17): HTTP TTFT p50 within 5 % of the direct TTFT p50.

    python bench/server_overhead.py [--requests 40] [--repeats 5] [--step-ms 25] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
# The floor: the same engine streamed by a bare ASGI app (one worker-thread hop, hand-written chunks).
BARE_SERVER_CODE = """
import asyncio, json, sys, uvicorn
from slimserve.server.engines.base import TextRequest
from slimserve.testing.trivial import TrivialEngine
engine = TrivialEngine(step_seconds=float(sys.argv[1]))

async def app(scope, receive, send):
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    request = json.loads(body)
    prompt = " ".join(m["content"] for m in request["messages"])
    loop, deltas = asyncio.get_running_loop(), asyncio.Queue()

    def produce():
        try:
            for delta in engine.generate_text(TextRequest(prompt=prompt, max_tokens=request["max_tokens"]),
                                              lambda done, total: None):
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
        finally:
            loop.call_soon_threadsafe(deltas.put_nowait, None)

    loop.run_in_executor(None, produce)
    first = await deltas.get()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    delta = first
    while delta is not None:
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": delta.text}}]}
        await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\\n\\n",
                    "more_body": True})
        delta = await deltas.get()
    await send({"type": "http.response.body", "body": b"data: [DONE]\\n\\n"})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", lifespan="off")
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
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per server per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=25.0, help="engine time per token")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    step = args.step_ms / 1000

    names = ("direct", "bare ASGI", "slimserve")
    # per server: per repeat: (ttft samples, e2e samples)
    runs: dict[str, list[tuple[list[float], list[float]]]] = {name: [] for name in names}
    loads = []
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess([sys.executable, "-c", SERVER_CODE, str(step), str(slim_port := free_port())], slim_port,
                          Path(tmp) / "slimserve.log"), \
            ServerProcess([sys.executable, "-c", BARE_SERVER_CODE, str(step), str(bare_port := free_port())],
                          bare_port, Path(tmp) / "bare.log"):
        urls = {"slimserve": f"http://127.0.0.1:{slim_port}", "bare ASGI": f"http://127.0.0.1:{bare_port}"}
        for url in urls.values():
            over_http(url, 5, args.max_tokens)  # warm-up
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            runs["direct"].append(direct(TrivialEngine(step_seconds=step), args.requests, args.max_tokens))
            for name, url in urls.items():
                runs[name].append(over_http(url, args.requests, args.max_tokens))

    def median_over_repeats(name: str, metric: int, q: float) -> float:
        return statistics.median(percentile(run[metric], q) for run in runs[name]) * 1000

    rows = []
    for metric, label in ((0, "TTFT"), (1, "E2E")):
        for q in (50, 90, 99):
            base, bare, served = (median_over_repeats(name, metric, q) for name in names)
            rows.append(f"| {label} p{q} | {base:.2f} | {bare:.2f} ({bare / base:.3f}) | {served:.2f} "
                        f"({served / base:.3f}) | {served - bare:+.2f} |")
    ratios = [statistics.median(slim[0]) / statistics.median(base[0])
              for slim, base in zip(runs["slimserve"], runs["direct"], strict=True)]
    ttft_ratio = statistics.median(ratios)
    table = "\n".join([
        f"Command: `python bench/server_overhead.py --requests {args.requests} --repeats {args.repeats} "
        f"--step-ms {args.step_ms:g} --max-tokens {args.max_tokens}`",
        "",
        f"TrivialEngine sleeping {args.step_ms:g} ms per token, {args.max_tokens} tokens, {args.requests} sequential "
        f"streamed chat requests per server and repeat over loopback (servers in their own processes), "
        f"{args.repeats} repeats taken in turns; every cell is the median over repeats. Direct = the engine "
        "called in-process; bare ASGI = the same engine behind a hand-written ASGI app under the same uvicorn (the "
        "floor of any Python server here). Definitions of `vllm bench serve`: TTFT = send -> first chunk with "
        "content, E2E = send -> last byte.",
        "",
        "| metric | direct (ms) | bare ASGI (ms, x direct) | slimserve (ms, x direct) | slimserve - bare (ms) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"TTFT p50 ratio slimserve / direct, median over repeats: {ttft_ratio:.3f} (per repeat: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; goal <= 1.05): {'met' if ttft_ratio <= 1.05 else 'NOT met'}. "
        f"Host: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), 1-minute load average at the "
        f"start of each repeat: {', '.join(f'{load:.1f}' for load in loads)} (the overhead is a few thread and "
        "process wake-ups, so it grows with the host's load).",
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
