"""Turn one load-test run into ``report.md`` with PNG plots, and check it against the server's own metrics.

Inputs (all written by ``loadtest/run.py``): the locustfile's sample log (JSON lines: every
request sent, every answer, every TTFT / ITL / E2E sample), locust's CSVs, and the server's
``/metrics`` text scraped before and after the run.

The report states:

- how many requests were sent and how many got an answer, by HTTP status (429 = overload,
  refused by the server's admission queue), and how many got none (timeout, reset) or broke
  off mid-stream: "lost or hung" is ``sent - complete answers``, which must be 0;
- client TTFT / ITL / E2E percentiles, over time and in total, and throughput against users;
- the agreement of the client's TTFT and ITL p50 with the server's Prometheus histograms.

How the agreement is measured: the server publishes bucket counts, a sum and a count, over
what the run added (``/metrics`` before minus after). From the buckets the server's median is
only known to lie inside one bucket ``(lo, hi]`` (Prometheus' ``histogram_quantile``
interpolates inside it, which is also reported); the client's exact median must lie in that
bucket widened by the slack ``tolerance_ms + tolerance_fraction x hi`` (default 10 ms + 15 %):
the client adds loopback HTTP, parsing and, on a busy host, scheduler waits the server never
sees. Sum / count is the server's exact mean, so the client's mean must be within the same
slack of it. The number of observations must match too (the server counts every streamed
request once, and every gap between its streamed outputs).

    python loadtest/report.py RUN_DIR [--tolerance-ms 10] [--tolerance-fraction 0.15]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The two families compared with the client (seconds). ``slimserve:`` is what slimserve's app and its
# vLLM stat-logger plugin publish; ``vllm:`` is the fallback for a bare vLLM server.
COMPARED = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds"}
PREFIXES = ("slimserve:", "vllm:")
_SAMPLE = re.compile(r'^(?P<name>[^{\s]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LE = re.compile(r'le="([^"]+)"')


def histogram_buckets(metrics_text: str, family: str) -> dict[float, float]:
    """Cumulative bucket counts of ``family`` (summed over its label sets), keyed by upper bound."""
    buckets: dict[float, float] = defaultdict(float)
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != family + "_bucket":
            continue
        le = _LE.search(match["labels"] or "")
        if le is not None:
            buckets[float(le.group(1))] += float(match["value"])
    return dict(buckets)


def bucket_delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    """What a run added to a histogram (the server may have counted requests before it)."""
    return {le: count - before.get(le, 0.0) for le, count in after.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding the quantile.

    The lowest bucket interpolates from 0; a quantile in the ``+Inf`` bucket is the highest finite
    bound, as Prometheus answers. NaN when the histogram is empty.
    """
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def median_bucket(buckets: dict[float, float]) -> tuple[float, float]:
    """The bucket ``(lo, hi]`` that holds a histogram's median (``hi`` may be infinite)."""
    bounds = sorted(buckets)
    half = buckets[bounds[-1]] / 2
    lower = 0.0
    for bound in bounds:
        if buckets[bound] >= half:
            return lower, bound
        lower = bound
    return lower, math.inf


def histogram_total(metrics_text: str, family: str, suffix: str) -> float:
    """A histogram's ``_sum`` or ``_count`` (``suffix``), summed over its label sets."""
    total = 0.0
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None and match["name"] == family + suffix:
            total += float(match["value"])
    return total


@dataclass
class Agreement:
    """Client vs server p50 of one latency (milliseconds)."""

    metric: str
    family: str
    server_count: int
    client_count: int
    server_bucket_ms: tuple[float, float]  # the server's median lies in (lo, hi]
    server_p50_ms: float  # histogram_quantile's interpolation inside that bucket
    client_p50_ms: float
    server_mean_ms: float  # _sum / _count: exact
    client_mean_ms: float
    slack_ms: float

    @property
    def p50_agrees(self) -> bool:
        low, high = self.server_bucket_ms
        return low - self.slack_ms <= self.client_p50_ms <= high + self.slack_ms

    @property
    def mean_agrees(self) -> bool:
        return abs(self.client_mean_ms - self.server_mean_ms) <= self.slack_ms

    @property
    def agrees(self) -> bool:
        return self.p50_agrees and self.mean_agrees

    @property
    def counts_match(self) -> bool:
        return self.server_count == self.client_count


def load_samples(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_with_server(samples: list[dict[str, Any]], before: str, after: str, tolerance_ms: float,
                        tolerance_fraction: float) -> list[Agreement]:
    """One ``Agreement`` per compared latency the server publishes and the client measured."""
    agreements = []
    for metric, suffix in COMPARED.items():
        client_ms = [s["ms"] for s in samples if s["kind"] == metric]
        for prefix in PREFIXES:
            family = prefix + suffix
            added = bucket_delta(histogram_buckets(before, family), histogram_buckets(after, family))
            if added and max(added.values()) > 0:
                break
        else:
            continue
        if not client_ms:
            continue
        low, high = median_bucket(added)
        count = histogram_total(after, family, "_count") - histogram_total(before, family, "_count")
        total = histogram_total(after, family, "_sum") - histogram_total(before, family, "_sum")
        finite_high = high if math.isfinite(high) else low
        agreements.append(Agreement(
            metric=metric, family=family, server_count=round(count), client_count=len(client_ms),
            server_bucket_ms=(low * 1000, high * 1000), server_p50_ms=histogram_quantile(0.5, added) * 1000,
            client_p50_ms=float(np.median(client_ms)), server_mean_ms=total / count * 1000 if count else math.nan,
            client_mean_ms=float(np.mean(client_ms)), slack_ms=tolerance_ms + tolerance_fraction * finite_high * 1000))
    return agreements


@dataclass
class Accounting:
    """Every request the client sent, and what became of it."""

    sent: int
    statuses: Counter[int]
    no_answer: int  # status 0: timeout, refused or reset connection
    broken: int  # headers came, the body stopped before its end

    @property
    def complete_answers(self) -> int:
        return sum(self.statuses.values()) - self.no_answer - self.broken

    @property
    def lost_or_hung(self) -> int:
        return self.sent - self.complete_answers


def account(samples: list[dict[str, Any]]) -> Accounting:
    answers = [s for s in samples if s["kind"] == "answer"]
    return Accounting(sent=sum(1 for s in samples if s["kind"] == "sent"),
                      statuses=Counter(int(s["status"]) for s in answers),
                      no_answer=sum(1 for s in answers if s["status"] == 0),
                      broken=sum(1 for s in answers if s["status"] != 0 and not s.get("complete", True)))


def percentiles_over_time(samples: list[dict[str, Any]], kind: str, start: float,
                          window: float) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """p50/p90/p99 of one latency per time window (window centres in seconds from the start)."""
    rows = [(s["t"] - start, s["ms"]) for s in samples if s["kind"] == kind]
    if not rows:
        return np.array([]), {}
    times, values = np.asarray(rows).T
    edges = np.arange(0.0, times.max() + window, window)
    centres, result = [], {50: [], 90: [], 99: []}
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = values[(times >= low) & (times < high)]
        if inside.size:
            centres.append((low + high) / 2)
            for q in result:
                result[q].append(np.percentile(inside, q))
    return np.asarray(centres), {q: np.asarray(v) for q, v in result.items()}


def plot(samples: list[dict[str, Any]], out_dir: Path, window: float) -> list[str]:
    """The report's PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(s["t"] for s in samples)
    names = []
    for kind, title in (("ttft", "Time to first token"), ("itl", "Inter-token latency"), ("e2e", "End-to-end latency")):
        centres, series = percentiles_over_time(samples, kind, start, window)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for q, values in series.items():
            ax.plot(centres, values, marker="o", label=f"p{q}")
        ax.set(title=f"{title} (client, {window:g} s windows)", xlabel="seconds since start", ylabel="ms")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{kind}_over_time.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        names.append(name)

    answers = [s for s in samples if s["kind"] == "answer"]
    edges = np.arange(0.0, max(s["t"] for s in answers) - start + window, window) if answers else np.array([0.0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    by_users: dict[int, list[float]] = defaultdict(list)
    times = np.asarray([s["t"] - start for s in answers])
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = [s for s, t in zip(answers, times, strict=True) if low <= t < high]
        if inside:
            users = max(s["users"] for s in inside)
            by_users[users].append(sum(1 for s in inside if s["status"] == 200) / window)
    users_axis = sorted(by_users)
    left.plot(users_axis, [np.mean(by_users[u]) for u in users_axis], marker="o")
    left.set(title="Throughput vs users", xlabel="simulated users", ylabel="successful requests / s")
    left.grid(alpha=0.3)
    statuses = sorted({s["status"] for s in answers})
    for status in statuses:
        counts, _ = np.histogram([t for s, t in zip(answers, times, strict=True) if s["status"] == status],
                                 bins=edges)
        label = "no answer" if status == 0 else f"HTTP {status}"
        right.plot((edges[:-1] + edges[1:]) / 2, counts / window, marker="o", label=label)
    right.set(title="Answers by status over time", xlabel="seconds since start", ylabel="answers / s")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_errors.png", dpi=90)
    plt.close(fig)
    names.append("throughput_errors.png")
    return names


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def write_report(run_dir: Path, tolerance_ms: float = 10.0, tolerance_fraction: float = 0.15,
                 window: float = 5.0) -> dict[str, Any]:
    """Write ``run_dir/report.md`` and its PNGs; return the numbers (for tests and ``run.py``)."""
    meta = json.loads((run_dir / "run.json").read_text())
    samples = load_samples(run_dir / "samples.jsonl")
    before = (run_dir / "metrics_before.txt").read_text()
    after = (run_dir / "metrics_after.txt").read_text()
    accounting = account(samples)
    agreements = compare_with_server(samples, before, after, tolerance_ms, tolerance_fraction)
    plots = plot(samples, run_dir, window) if samples else []

    latency_rows = []
    for kind in ("ttft", "itl", "tpot", "e2e"):
        values = [s["ms"] for s in samples if s["kind"] == kind]
        if values:
            p50, p90, p99 = np.percentile(values, [50, 90, 99])
            latency_rows.append([kind.upper(), str(len(values)), f"{p50:.1f}", f"{p90:.1f}", f"{p99:.1f}"])
    status_rows = [["no answer (timeout/reset)" if status == 0 else str(status), str(count)]
                   for status, count in sorted(accounting.statuses.items())]
    agreement_rows = [[a.metric.upper(), f"`{a.family}`", f"{a.server_count} / {a.client_count}",
                       f"({a.server_bucket_ms[0]:g}, {a.server_bucket_ms[1]:g}]", f"{a.server_p50_ms:.1f}",
                       f"{a.client_p50_ms:.1f}", f"{a.server_mean_ms:.1f}", f"{a.client_mean_ms:.1f}",
                       f"{a.slack_ms:.1f}", "yes" if a.agrees and a.counts_match else "NO"] for a in agreements]
    overload = accounting.statuses.get(429, 0)
    times = [s["t"] for s in samples if s["kind"] in ("sent", "answer")]
    span = max(times) - min(times) if times else 0.0
    lines = [
        f"# Load test: {meta['scenario']} against {meta['model']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['users']} users (spawn rate {meta['spawn_rate']}/s), {meta['duration']}, server `{meta['server']}`, "
        f"host: {os.cpu_count()} CPUs, 1-minute load average {meta['load_before']:.1f} before and "
        f"{meta['load_after']:.1f} after. Requests were sent and answered over {span:.1f} s. "
        f"Locust's own CSVs: `{meta['csv_prefix']}_*.csv`.",
        "",
        "## Every request accounted for",
        "",
        f"Sent: **{accounting.sent}**. Complete answers: **{accounting.complete_answers}**. "
        f"Overload (429, refused by the admission queue, retryable): **{overload}**. "
        f"No answer (timeout or reset): **{accounting.no_answer}**. Streams broken off: **{accounting.broken}**. "
        f"Lost or hung (sent - complete answers): **{accounting.lost_or_hung}**.",
        "",
        *_table(status_rows, ["HTTP status", "answers"]),
        "",
        "## Client latency (ms)",
        "",
        "TTFT = send -> first content chunk; ITL = gap between content chunks; TPOT = (E2E - TTFT) / (tokens - 1); "
        "E2E = send -> last byte (`vllm bench serve`'s definitions).",
        "",
        *_table(latency_rows, ["metric", "samples", "p50", "p90", "p99"]),
        "",
        "## Client vs the server's Prometheus histograms",
        "",
        "From what this run added to the server's histograms (scraped before and after): the bucket that holds "
        "the server's p50, `histogram_quantile(0.5)` inside it, and the exact mean (sum / count). The client agrees "
        f"when its median lies in that bucket widened by the slack ({tolerance_ms:g} ms + {tolerance_fraction:.0%} "
        "of the bucket's upper bound: loopback HTTP, parsing and scheduling on the client's side), its mean is "
        "within the slack of the server's, and both counted the same observations.",
        "",
        *(_table(agreement_rows, ["metric", "server family", "observations (server / client)", "server p50 bucket",
                                  "server p50 (interpolated)", "client p50", "server mean", "client mean", "slack",
                                  "agree"])
          if agreement_rows else ["No streamed requests: nothing to compare."]),
        "",
        "## Plots",
        "",
        *(f"![{name}]({name})" for name in plots),
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
    return {"accounting": accounting, "agreements": agreements, "plots": plots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tolerance-ms", type=float, default=10.0)
    parser.add_argument("--tolerance-fraction", type=float, default=0.15)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per point of the plots over time")
    args = parser.parse_args()
    write_report(args.run_dir, args.tolerance_ms, args.tolerance_fraction, args.window)
    print(args.run_dir / "report.md")


if __name__ == "__main__":
    main()
