"""``make loadtest``: serve a model on loopback, load it with locust headless, write ``report.md``.

Steps: start the server (``slimserve serve MODEL`` as a user would, or slimserve's app around
the model-free ``TrivialEngine`` for ``--model trivial``), check that it answers the scenario's
routes, scrape ``/metrics``, run locust with the scenario preset (``loadtest/scenarios.py``),
scrape ``/metrics`` again, stop the server and write the report (``loadtest/report.py``).
Locust's ``--stop-timeout`` is longer than the client's request timeout, so no request is cut
off by locust itself: every request sent ends with an answer, a timeout or a reset, and the
report counts each.

    python loadtest/run.py [--model DIR|trivial] [--scenario streaming-chat] [--users 4] [--duration 30s]

Without ``--model``: the demo checkpoint when ``make demo`` has built it, else a tiny diffusion
LM built once in the machine's asset cache (``loaders.assets.ARTIFACTS``; seconds; served by
slimserve's own app, no vLLM start).
Exit status 1 when a request was lost or hung or the client and server disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

from slimserve.errors import CheckpointError
from slimserve.loaders.assets import ARTIFACTS
from slimserve.testing.live import ServerProcess, free_port, serve_process

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import write_report  # noqa: E402
from scenarios import SCENARIOS, routes_of  # noqa: E402

TRIVIAL_SERVER = """
import sys, uvicorn
from slimserve.server.app import ServerConfig, create_app
from slimserve.testing.trivial import TrivialEngine
step, port, running, waiting = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
app = create_app(TrivialEngine(step_seconds=step), ServerConfig(max_running=running, max_waiting=waiting))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def default_model(artifacts: Path) -> Path:
    """The demo checkpoint if it is built, else a tiny diffusion LM (built here once)."""
    from slimserve.loaders.checkpoint import validate_checkpoint
    from slimserve.server.demo import demo_checkpoint_path

    demo = demo_checkpoint_path(artifacts)
    try:
        validate_checkpoint(demo, check_values=False)
        return demo
    except CheckpointError:
        pass
    tiny = artifacts / "loadtest-tiny-dllm"
    if not (tiny / "config.json").exists():
        from slimserve.testing.diffusion_lm import build_tiny_diffusion_lm

        build_tiny_diffusion_lm(tiny, steps=8, block_length=4)
    return tiny


def start_server(args: argparse.Namespace, log: Path) -> tuple[ServerProcess, str]:
    """The server process (started) and a short description of it for the report."""
    if args.model == "trivial":
        port = free_port()
        running, waiting = args.max_running or 1, 16 if args.max_waiting is None else args.max_waiting
        argv = [sys.executable, "-c", TRIVIAL_SERVER, str(args.step_ms / 1000), str(port), str(running), str(waiting)]
        server = ServerProcess(argv, port, log)
        description = (f"slimserve app, TrivialEngine ({args.step_ms:g} ms per token/step), "
                       f"max_running {running}, max_waiting {waiting}")
    else:
        model = Path(args.model) if args.model else default_model(ARTIFACTS)
        args.model = str(model)
        # slimserve's own admission limits; a causal LM is served by vLLM, which has its own (after --).
        options = [*(["--max-running", str(args.max_running)] if args.max_running else []),
                   *(["--max-waiting", str(args.max_waiting)] if args.max_waiting is not None else [])]
        server = serve_process(model, log, served_model_name=model.name, options=options,
                              start_timeout=args.start_timeout)
        description = " ".join(["slimserve serve", str(model), *options])
    server.start()
    return server, description


def scrape(base_url: str) -> str:
    return httpx.get(base_url + "/metrics", timeout=30).text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="checkpoint folder, or 'trivial' (default: see above)")
    parser.add_argument("--scenario", default="streaming-chat", choices=sorted(SCENARIOS))
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--spawn-rate", type=float, default=1.0, help="users started per second")
    parser.add_argument("--duration", default="30s", help="locust's --run-time, e.g. 30s, 2m")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-running", type=int, help="slimserve's app: requests on the engine at once (default 1)")
    parser.add_argument("--max-waiting", type=int, help="slimserve's app: queued requests before 429 (default 16)")
    parser.add_argument("--step-ms", type=float, default=25.0, help="trivial engine: time per token or step")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="client: seconds before 'hung'")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds the server may take to start")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for report.md, PNGs and CSVs")
    parser.add_argument("--tolerance-ms", type=float, default=10.0)
    parser.add_argument("--tolerance-fraction", type=float, default=0.15)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per point of the plots over time")
    args = parser.parse_args()
    command = "python loadtest/run.py " + shlex.join(sys.argv[1:])

    args.out.mkdir(parents=True, exist_ok=True)
    samples = args.out / "samples.jsonl"
    samples.write_text("")
    csv_prefix = args.out / "locust"
    server, description = start_server(args, args.out / "server.log")
    try:
        paths = httpx.get(server.base_url + "/openapi.json", timeout=30).json()["paths"]
        missing = [route for route in routes_of(args.scenario) if route not in paths]
        if missing:
            print(f"the server does not answer {', '.join(missing)}, which scenario {args.scenario!r} calls",
                  file=sys.stderr)
            return 2
        load_before = os.getloadavg()[0]
        before = scrape(server.base_url)
        env = {**os.environ, "SLIMSERVE_SCENARIO": args.scenario, "SLIMSERVE_LOADTEST_SAMPLES": str(samples),
               "SLIMSERVE_MAX_TOKENS": str(args.max_tokens), "SLIMSERVE_REQUEST_TIMEOUT": str(args.request_timeout)}
        locust = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--host", server.base_url,
                  "--headless", "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration,
                  "--csv", str(csv_prefix), "--csv-full-history", "--only-summary",
                  "--stop-timeout", str(int(args.request_timeout) + 10)]
        run = subprocess.run(locust, env=env, capture_output=True, text=True)
        (args.out / "locust.log").write_text(run.stdout + run.stderr)
        time.sleep(1.0)  # vLLM's stat logger publishes per engine iteration; let the last one land
        after = scrape(server.base_url)
        load_after = os.getloadavg()[0]
    finally:
        server.stop()

    meta = {"model": args.model, "scenario": args.scenario, "users": args.users, "spawn_rate": args.spawn_rate,
            "duration": args.duration, "server": description, "command": command, "csv_prefix": csv_prefix.name,
            "load_before": load_before, "load_after": load_after, "locust_exit": run.returncode}
    (args.out / "run.json").write_text(json.dumps(meta, indent=1))
    (args.out / "metrics_before.txt").write_text(before)
    (args.out / "metrics_after.txt").write_text(after)
    result = write_report(args.out, args.tolerance_ms, args.tolerance_fraction, args.window)
    print((args.out / "report.md").read_text())
    accounting, agreements = result["accounting"], result["agreements"]
    ok = accounting.sent > 0 and accounting.lost_or_hung == 0 and all(a.agrees and a.counts_match
                                                                     for a in agreements)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
