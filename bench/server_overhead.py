"""Overhead of slimserve's FastAPI layer: TTFT and e2e over HTTP vs the engine called directly.

The engine is ``TrivialEngine`` with a fixed time per token (a stand-in for a small model's
decode step), so any difference is the HTTP layer: validation, queueing, the worker-thread
hop, SSE framing, metrics. The server runs in its own process (as in production); the
client streams ``/v1/chat/completions`` over loopback, one request at a time.

A third column is the floor any Python server pays on this host: a bare ASGI app under the
same uvicorn, streaming the same engine's deltas through one worker thread, with no FastAPI,
validation, queue or metrics. slimserve minus that floor is what slimserve's own layer costs;
the floor itself is loopback TCP, HTTP parsing and two cross-thread wake-ups, which on a busy
host are scheduler waits.

``--vllm`` measures the reference instead: vLLM's own OpenAI server against vLLM's engine called
directly (``AsyncLLM`` in this process, with its engine core in its own process as the server's
is), the same real model (SmolLM2-135M unless ``--vllm-model``; about 25-35 ms a decode step on
2 cores, close to the TrivialEngine's step), the same streamed chat request and the same client.
vLLM has no engine that sleeps a fixed time per token, so this is the only like-for-like
comparison with vLLM's server there is. It writes its own section of ``bench/README.md``.

The machine is shared and noisy, so the three are measured in turns, ``--repeats`` times,
and the table gives medians over repeats of each repeat's percentiles, with the 1-minute load
average of every repeat.

Definitions (``vllm bench serve``): TTFT = send -> first streamed chunk with content;
E2E = send -> last byte. Goal (issues 5 and 17): HTTP TTFT p50 within 5 % of the direct TTFT p50.

    python bench/server_overhead.py [--requests 40] [--repeats 5] [--step-ms 25] [--max-tokens 8]
    python bench/server_overhead.py --vllm [--requests 40] [--repeats 3] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sections import README, update_readme

from slimserve.server.engines.base import TextRequest
from slimserve.testing.live import ServerProcess, free_port
from slimserve.testing.trivial import TrivialEngine

PROMPT = "hello world"
SECTION = "## FastAPI overhead (issue 5)"
VLLM_SECTION = "## vLLM's own OpenAI server overhead (issue 17's reference)"
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
        deltas = engine.generate_text(TextRequest(prompt=PROMPT, max_tokens=max_tokens), lambda d, t: None)
        next(deltas)
        ttfts.append(time.perf_counter() - start)
        for _ in deltas:
            pass
        e2es.append(time.perf_counter() - start)
    return ttfts, e2es


def over_http(base_url: str, requests: int, max_tokens: int, model: str = "trivial",
              extra: dict[str, object] | None = None) -> tuple[list[float], list[float]]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "stream": True, **(extra or {})}
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


def vllm_engine_args(model: Path, dtype: str) -> dict[str, object]:
    """The engine settings both vLLM runs share (the server gets them as flags)."""
    return {"model": str(model), "dtype": dtype, "max_model_len": 2048, "seed": 0}


def vllm_direct(model: Path, requests: int, max_tokens: int, dtype: str) -> tuple[list[float], list[float]]:
    """TTFT and E2E of vLLM's ``AsyncLLM`` called in this process with the prompt the server would render."""
    import asyncio
    import uuid

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    prompt = AutoTokenizer.from_pretrained(str(model)).apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**vllm_engine_args(model, dtype)))

    async def measure(count: int) -> tuple[list[float], list[float]]:
        ttfts, e2es = [], []
        for _ in range(count):
            start, first = time.perf_counter(), None
            async for output in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                if first is None and output.outputs[0].text:
                    first = time.perf_counter()
            e2es.append(time.perf_counter() - start)
            assert first is not None
            ttfts.append(first - start)
        return ttfts, e2es

    async def warm_then_measure() -> tuple[list[float], list[float]]:
        await measure(5)
        return await measure(requests)

    try:
        return asyncio.run(warm_then_measure())
    finally:
        engine.shutdown()


def vllm_over_http(model: Path, requests: int, max_tokens: int, dtype: str, log: Path) -> tuple[list[float],
                                                                                               list[float]]:
    """TTFT and E2E of the same engine behind ``python -m vllm.entrypoints.openai.api_server``, as a user starts it."""
    port = free_port()
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in vllm_engine_args(model, dtype).items()]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags, "--served-model-name", "reference",
            "--host", "127.0.0.1", "--port", str(port)]
    extra = {"temperature": 0.0, "ignore_eos": True}  # as the direct run's SamplingParams
    with ServerProcess(argv, port, log, start_timeout=900) as server:
        over_http(server.base_url, 5, max_tokens, "reference", extra)
        return over_http(server.base_url, requests, max_tokens, "reference", extra)


def vllm_reference(args: argparse.Namespace) -> None:
    """Table of vLLM's own OpenAI server against its engine called directly (see the module docstring)."""
    from machine import describe_machine

    from slimserve.loaders.assets import smollm2_folder

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = Path(args.vllm_model) if args.vllm_model else smollm2_folder()
    runs: Runs = {"direct": [], "vLLM server": []}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # in turns, one engine at a time: 2 cores cannot host two fairly
            loads.append(os.getloadavg()[0])
            runs["vLLM server"].append(vllm_over_http(model, args.requests, args.max_tokens, args.dtype,
                                                      Path(tmp) / f"vllm-{repeat}.log"))
            runs["direct"].append(vllm_direct(model, args.requests, args.max_tokens, args.dtype))
            gc.collect()  # the engine's reference cycles now, not at exit, where its __del__ fails noisily
    rows = []
    for metric, label in ((0, "TTFT"), (1, "E2E")):
        for q in (50, 90, 99):
            base, served = (median_over_repeats(runs, name, metric, q) for name in ("direct", "vLLM server"))
            rows.append(f"| {label} p{q} | {base:.2f} | {served:.2f} ({served / base:.3f}) | {served - base:+.2f} |")
    ratios = ttft_p50_ratios(runs, "vLLM server", "direct")
    table = "\n".join([
        f"Command: `python bench/server_overhead.py --vllm --requests {args.requests} --repeats {args.repeats} "
        f"--max-tokens {args.max_tokens} --dtype {args.dtype}`",
        "",
        f"{model.name} ({args.dtype}, vLLM's default compiled mode, `VLLM_CPU_KVCACHE_SPACE=1`, no preloads), "
        f"{args.max_tokens} tokens with `ignore_eos`, {args.requests} sequential streamed chat requests per run after "
        f"5 warm-up requests, {args.repeats} repeats taking the server and the direct engine in turns; every cell is "
        "the median over repeats. Direct = `AsyncLLM` in the client's process (its engine core in its own process, "
        "as the server's is); vLLM server = `python -m vllm.entrypoints.openai.api_server` with the same engine "
        "settings, called by the same client as the FastAPI table above. Machine: " + describe_machine() + ".",
        "",
        "| metric | direct (ms) | vLLM server (ms, x direct) | server - direct (ms) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"TTFT p50 ratio vLLM server / direct, median over repeats: {statistics.median(ratios):.3f} (per repeat: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}). 1-minute load average at the start of each repeat: "
        f"{', '.join(f'{load:.1f}' for load in loads)}.",
    ])
    print(table)
    if not args.no_readme:
        update_readme(README, VLLM_SECTION, f"{VLLM_SECTION}\n\n{table}")


Runs = dict[str, list[tuple[list[float], list[float]]]]  # per server: per repeat: (TTFT samples, E2E samples)


def median_over_repeats(runs: Runs, name: str, metric: int, q: float) -> float:
    """The median over repeats of each repeat's q-th percentile of ``metric`` (0 TTFT, 1 E2E), in ms."""
    return statistics.median(percentile(run[metric], q) for run in runs[name]) * 1000


def ttft_p50_ratios(runs: Runs, served: str, base: str) -> list[float]:
    """Per repeat: ``served``'s TTFT p50 over ``base``'s (the repeats were taken in turns)."""
    return [statistics.median(s[0]) / statistics.median(b[0]) for s, b in zip(runs[served], runs[base], strict=True)]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per server per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=25.0, help="engine time per token")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    parser.add_argument("--vllm", action="store_true",
                        help="measure vLLM's own OpenAI server against its engine instead (see the docstring)")
    parser.add_argument("--vllm-model", help="model folder for --vllm (default: SmolLM2-135M from the asset cache)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype for --vllm")
    args = parser.parse_args()
    if args.vllm:
        vllm_reference(args)
        return
    step = args.step_ms / 1000

    names = ("direct", "bare ASGI", "slimserve")
    runs: Runs = {name: [] for name in names}
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

    rows = []
    for metric, label in ((0, "TTFT"), (1, "E2E")):
        for q in (50, 90, 99):
            base, bare, served = (median_over_repeats(runs, name, metric, q) for name in names)
            rows.append(f"| {label} p{q} | {base:.2f} | {bare:.2f} ({bare / base:.3f}) | {served:.2f} "
                        f"({served / base:.3f}) | {served - bare:+.2f} |")
    ratios = ttft_p50_ratios(runs, "slimserve", "direct")
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
        update_readme(README, SECTION, f"{SECTION}\n\n{table}")


if __name__ == "__main__":
    main()
