"""Perplexity of SmolLM2-135M compressed by every method and allocation (issue 3).

Calibrates on Pride and Prejudice, evaluates token perplexity on Emma (both from Debian's
r-cran-janeaustenr), for dense and for svd / svd-llm / cospadi / rocket at 20/30/50 % with
uniform and knapsack allocation. Results accumulate in ``bench/results/compress_quality.json``
(a rerun skips finished rows) and the table is written into ``bench/README.md``. ``--chat`` also
asks a few simple questions, through the chat template in real vLLM, of dense and of the given
configurations, to judge where answers stay sensible (the demo's choice).

    OMP_NUM_THREADS=1 .venv/bin/python bench/compress_quality.py [--methods svd svd-llm rocket cospadi]
        [--ratios 0.2 0.3 0.5] [--allocations uniform knapsack] [--chat rocket/knapsack/0.3 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from slimserve.loaders.assets import ARTIFACTS, austen_text, smollm2_folder
from slimserve.loaders.checkpoint import compression_summary
from slimserve.loaders.compress.calibration import DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from slimserve.loaders.compress.run import REPORT_JSON, REPORT_PNG, compress
from slimserve.loaders.eval import METRIC, perplexity
from slimserve.server.demo import build_demo_checkpoint
from slimserve.testing.vllm import vllm_chat

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
README = BENCH / "README.md"
SECTION = "## Compression quality on SmolLM2-135M (issue 3)"
CHAT_QUESTIONS = ("What is the capital of France?", "How many days are there in a week?",
                  "What color is the sky on a clear day?", "What is 2 + 3?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["svd", "svd-llm", "rocket", "cospadi"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "knapsack"])
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_WINDOWS,
                        help=f"calibration windows of {DEFAULT_SEQ_LEN} tokens; rows with another value than "
                             "the default are stored and shown separately (METHOD/ALLOCATION/RATIO@Nw)")
    parser.add_argument("--chat", nargs="*", default=[], metavar="METHOD/ALLOCATION/RATIO",
                        help="ask CHAT_QUESTIONS of dense and of these configurations in real vLLM")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "compress_quality.json"
    rows = json.loads(store.read_text()) if store.is_file() else {}
    model = smollm2_folder()
    calib, held_out = austen_text("prideprejudice"), austen_text("emma")
    work = ARTIFACTS / "bench-compress"
    work.mkdir(parents=True, exist_ok=True)
    if "dense" not in rows:
        rows["dense"] = {"ppl": perplexity(model, held_out).perplexity, "ratio": 0.0, "bytes_ratio": 0.0}
        store.write_text(json.dumps(rows, indent=1))
    suffix = windows_suffix(args.calib_samples)
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in args.allocations:
                name = f"{method}/{allocation}/{ratio}{suffix}"
                if name in rows:
                    continue
                out = work / f"{method}-{allocation}-{ratio}{suffix}"
                start = time.time()
                # The committed table counts parameters (the papers' convention); byte-budget rows are issue 14's.
                compress(model, out, method=method, ratio=ratio, allocation=allocation, budget="params",
                         calib=None if method == "svd" else calib, calib_samples=args.calib_samples,
                         calib_cache=work / f"grams{suffix}.safetensors", progress=False)
                seconds = time.time() - start
                summary = compression_summary(out)
                ppl = perplexity(out, held_out).perplexity
                # Re-read before writing: another run (other methods or allocations) may share the store.
                rows = {**json.loads(store.read_text()),
                        name: {"ppl": ppl, "ratio": summary["ratio"], "bytes_ratio": summary["bytes_ratio"],
                               "compress_s": round(seconds, 1)}}
                print(f"{name}: ppl {ppl:.2f} (ratio {summary['ratio']:.3f}, {seconds:.0f} s)", flush=True)
                reports = RESULTS / "reports"
                reports.mkdir(exist_ok=True)
                for file in (REPORT_JSON, REPORT_PNG):
                    shutil.copy2(out / file, reports / f"{out.name}-{file.split('_', 1)[1]}")
                shutil.rmtree(out)
                store.write_text(json.dumps(rows, indent=1))
                write_readme(rows)
    for name in ["dense", *args.chat] if args.chat else []:
        rows = json.loads(store.read_text())
        if name in rows.get("chat", {}):
            continue
        if name == "dense":
            answers = vllm_chat(model, list(CHAT_QUESTIONS))
        else:  # built (and kept) exactly as `make demo` would build it with these settings
            method, allocation, ratio = name.split("/")
            checkpoint = build_demo_checkpoint(ARTIFACTS, method, float(ratio), allocation)
            answers = vllm_chat(checkpoint, list(CHAT_QUESTIONS))
        rows = json.loads(store.read_text())
        rows.setdefault("chat", {})[name] = answers
        store.write_text(json.dumps(rows, indent=1))
        print(f"{name}: {answers}", flush=True)
    write_readme(json.loads(store.read_text()))
    return 0


def windows_suffix(samples: int) -> str:
    """Row-name suffix of a run calibrated on a non-default number of windows."""
    return "" if samples == DEFAULT_WINDOWS else f"@{samples}w"


def write_readme(rows: dict) -> None:
    """Replace (or add) this benchmark's section of bench/README.md, leaving other sections alone."""
    dense = rows["dense"]["ppl"]
    ratios = sorted({float(k.rsplit("/", 1)[1].split("@")[0]) for k in rows if k not in ("dense", "chat")})
    variants = sorted({k.partition("@")[2] for k in rows if "@" in k}, key=lambda v: int(v.rstrip("w")))
    lines = [SECTION, "",
             f"{METRIC} of SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF; see docs/methods/assets.md) on "
             "*Emma* (first 8 windows of 512 tokens, BOS first), calibrated on *Pride and Prejudice* "
             f"({DEFAULT_WINDOWS} windows of {DEFAULT_SEQ_LEN} tokens, seed 0, unless a row says otherwise). "
             "Ratio = fraction of decoder-linear parameters removed "
             "(stored values; the achieved value is in parentheses with, for dictsparse, the fraction of bytes "
             "removed once int16 indices are counted). Lower is better; in brackets: x dense.",
             "", "Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/compress_quality.py` (compression times in "
             "the JSON are from 2 cores shared with other jobs, one thread per run). Knapsack = ROCKET's "
             "objective and error cap (`loaders/compress/README.md`).", "",
             f"Dense: **{dense:.2f}**", "",
             "| method | allocation | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    methods = ("svd", "svd-llm", "cospadi", "rocket")
    for suffix, method, allocation in [(s, m, a) for s in ["", *(f"@{v}" for v in variants)]
                                       for m in methods for a in ("uniform", "knapsack")]:
        cells = []
        for r in ratios:
            row = rows.get(f"{method}/{allocation}/{r}{suffix}")
            if row is None:
                cells.append("not run")
                continue
            cells.append(f"{row['ppl']:.2f} [{row['ppl'] / dense:.2f}x] "
                         f"({row['ratio']:.1%} / {row['bytes_ratio']:.1%} B)")
        if any(c != "not run" for c in cells):
            calibration = f", {suffix[1:-1]} windows" if suffix else ""
            lines.append(f"| {method} | {allocation}{calibration} | " + " | ".join(cells) + " |")
    lines += ["", "Per-layer reports (level, scheme, rank/atoms/nnz, errors; JSON + PNG), written by every run to "
              "`results/reports/<method>-<allocation>-<ratio>-report.*` (only the best 30 % one is committed). "
              "Raw numbers and compression times: "
              "`results/compress_quality.json`.", ""]
    if rows.get("chat"):
        lines += ["Greedy chat answers (real vLLM, bfloat16, chat template, at most 48 tokens), "
                  "`--chat METHOD/ALLOCATION/RATIO ...`:", "",
                  "| model | " + " | ".join(CHAT_QUESTIONS) + " |", "|---|" + "---|" * len(CHAT_QUESTIONS)]
        for name, answers in rows["chat"].items():
            cells = [" ".join(a.split()).replace("|", "\\|") for a in answers]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    section = "\n".join(lines)
    text = README.read_text() if README.is_file() else "# Benchmarks\n\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
