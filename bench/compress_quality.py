"""Perplexity of SmolLM2-135M compressed by every method and allocation (issue 3).

Calibrates on Pride and Prejudice, evaluates token perplexity on Emma (both from Debian's
r-cran-janeaustenr), for dense and for svd / svd-llm / cospadi / rocket at 20/30/50 % with
uniform and knapsack allocation. The ratio counts parameters (the papers' convention) unless
``--budget bytes`` (everything stored counted: values, indices, masks), whose rows go to their
own store and section. Results accumulate in ``bench/results/compress_quality[_bytes].json``
(a rerun skips finished rows) and the table is written into ``bench/README.md``. ``--methods
sparsegpt wanda`` prune to each of ``--patterns`` (N:M, the ``nm`` scheme) instead, and
``--same-bytes METHOD/ALLOCATION ...`` compresses by those methods to the bytes each pattern
stores (``--budget bytes``); both go to ``results/nm_quality.json`` and their own section. ``--chat`` also
asks a few simple questions, through the chat template in real vLLM, of dense and of the given
configurations, to judge where answers stay sensible (the demo's choice).

    OMP_NUM_THREADS=1 .venv/bin/python bench/compress_quality.py [--methods svd svd-llm rocket cospadi]
        [--ratios 0.2 0.3 0.5] [--allocations uniform knapsack] [--budget params|bytes]
        [--chat rocket/knapsack/0.3 ...]
    OMP_NUM_THREADS=1 .venv/bin/python bench/compress_quality.py --methods sparsegpt wanda --patterns 2:4 4:8
        --same-bytes svd-llm/uniform rocket/uniform
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from machine import cpu_model
from sections import README, update_readme

from slimserve.loaders.assets import ARTIFACTS, austen_text, smollm2_folder
from slimserve.loaders.checkpoint import compression_summary
from slimserve.loaders.compress.calibration import DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from slimserve.loaders.compress.prune import PRUNE_METHODS, prune
from slimserve.loaders.compress.run import REPORT_JSON, REPORT_PNG, compress
from slimserve.loaders.eval import METRIC, perplexity
from slimserve.server.demo import build_demo_checkpoint
from slimserve.testing.vllm import vllm_chat

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SECTION = "## Compression quality on SmolLM2-135M (issue 3)"
BYTES_SECTION = "## Compression quality at byte budgets on SmolLM2-135M (issue 14)"
NM_SECTION = "## N:M pruning quality on SmolLM2-135M (issue 15)"
CHAT_QUESTIONS = ("What is the capital of France?", "How many days are there in a week?",
                  "What color is the sky on a clear day?", "What is 2 + 3?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["svd", "svd-llm", "rocket", "cospadi"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "knapsack"])
    parser.add_argument("--budget", choices=["params", "bytes"], default="params",
                        help="what the ratio counts: parameters (the issue-3 table) or every byte stored (issue 14)")
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_WINDOWS,
                        help=f"calibration windows of {DEFAULT_SEQ_LEN} tokens; rows with another value than "
                             "the default are stored and shown separately (METHOD/ALLOCATION/RATIO@Nw)")
    parser.add_argument("--chat", nargs="*", default=[], metavar="METHOD/ALLOCATION/RATIO",
                        help="ask CHAT_QUESTIONS of dense and of these configurations in real vLLM")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8"], help="N:M patterns of sparsegpt/wanda")
    parser.add_argument("--same-bytes", nargs="*", default=[], metavar="METHOD/ALLOCATION",
                        help="compress by these to the bytes each N:M pattern stores, beside the pruned rows")
    args = parser.parse_args()
    classic = [m for m in args.methods if m not in PRUNE_METHODS]
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / store_name(args.budget)
    rows = json.loads(store.read_text()) if store.is_file() else {}
    model = smollm2_folder()
    calib, held_out = austen_text("prideprejudice"), austen_text("emma")
    work = ARTIFACTS / "bench-compress"
    work.mkdir(parents=True, exist_ok=True)
    if "dense" not in rows:
        rows["dense"] = {"ppl": perplexity(model, held_out).perplexity, "ratio": 0.0, "bytes_ratio": 0.0}
        store.write_text(json.dumps(rows, indent=1))
    suffix = windows_suffix(args.calib_samples)
    if len(classic) < len(args.methods) or args.same_bytes:
        run_nm([m for m in args.methods if m in PRUNE_METHODS], args.patterns, args.same_bytes, model, calib,
               held_out, work)
        if not classic and not args.chat:  # leave the issue-3 section (and its hand-written notes) alone
            return 0
    for ratio in args.ratios:
        for method in classic:
            for allocation in args.allocations:
                name = f"{method}/{allocation}/{ratio}{suffix}"
                if name in rows:
                    continue
                out = work / f"{method}-{allocation}-{ratio}{suffix}{'-bytes' if args.budget == 'bytes' else ''}"
                start = time.time()
                compress(model, out, method=method, ratio=ratio, allocation=allocation, budget=args.budget,
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
                write_readme(rows, args.budget)
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
    write_readme(json.loads(store.read_text()), args.budget)
    return 0


def run_nm(methods: list[str], patterns: list[str], same_bytes: list[str], model: Path, calib: Path,
           held_out: Path, work: Path) -> None:
    """Prune by ``methods`` to ``patterns``, then compress by ``same_bytes`` to each pattern's bytes; rows are kept."""
    store = RESULTS / "nm_quality.json"
    rows = json.loads(store.read_text()) if store.is_file() else {}
    if "dense" not in rows:  # measured in this run's store, so the ratios to dense come from one setup
        rows["dense"] = {"ppl": perplexity(model, held_out).perplexity, "ratio": 0.0, "bytes_ratio": 0.0}
    jobs = [(f"{m}/{p}", m, p, None) for p in patterns for m in methods]
    jobs += [(f"{b}@{p}", b, p, b.split("/")[1]) for p in patterns for b in same_bytes]
    for name, method, pattern, allocation in jobs:
        if name in rows:
            continue
        out = work / name.replace("/", "-").replace(":", "of").replace("@", "-at-")
        start = time.time()
        if allocation is None:
            prune(model, out, method=method, pattern=pattern, calib=calib, calib_cache=work / "grams.safetensors",
                  progress=False)
        else:  # the bytes a pruned checkpoint of this pattern stores, whichever pruner wrote it
            nm_rows = [r for k, r in rows.items() if k.endswith(f"/{pattern}")]
            if not nm_rows:
                raise SystemExit(f"--same-bytes {method}: prune to {pattern} first (--methods sparsegpt)")
            compress(model, out, method=method.split("/")[0], ratio=round(nm_rows[0]["bytes_ratio"], 4),
                     allocation=allocation, budget="bytes", calib=calib, calib_cache=work / "grams.safetensors",
                     progress=False)
        seconds = time.time() - start
        summary = compression_summary(out)
        rows[name] = {"ppl": perplexity(out, held_out).perplexity, "ratio": summary["ratio"],
                      "bytes_ratio": summary["bytes_ratio"], "compress_s": round(seconds, 1)}
        print(f"{name}: ppl {rows[name]['ppl']:.2f} ({summary['bytes_ratio']:.1%} of bytes removed, "
              f"{seconds:.0f} s)", flush=True)
        shutil.rmtree(out)
        store.write_text(json.dumps(rows, indent=1))
        write_nm_readme(rows)


def write_nm_readme(rows: dict) -> None:
    """Replace (or add) the N:M section of bench/README.md: one row per pruner or same-bytes method, by pattern."""
    dense, rows = rows["dense"]["ppl"], {k: v for k, v in rows.items() if k != "dense"}
    patterns = sorted({k.rsplit("@", 1)[1] if "@" in k else k.rsplit("/", 1)[1] for k in rows},
                      key=lambda p: [int(n) for n in p.split(":")])
    names = sorted({k.rsplit("@", 1)[0] if "@" in k else k.rsplit("/", 1)[0] for k in rows},
                   key=lambda n: (n not in PRUNE_METHODS, n))
    lines = [NM_SECTION, "",
             f"{METRIC} of SmolLM2-135M-Instruct (bf16) on *Emma* (first 8 windows of 512 tokens, BOS first), "
             f"calibrated on *Pride and Prejudice* ({DEFAULT_WINDOWS} windows of {DEFAULT_SEQ_LEN} tokens, seed 0; "
             "one pass of the dense model, not sequential). sparsegpt / wanda prune every decoder linear to N:M "
             "(N kept of every M inputs; `nm` scheme, bf16 values + packed offsets); the other rows compress to "
             "the same bytes as that pattern (`--budget bytes --ratio` = the pruned checkpoint's bytes removed). "
             "Cells: perplexity [x dense] (parameters / bytes removed). Lower is better.", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/compress_quality.py --methods sparsegpt wanda "
             "--patterns 2:4 4:8 --same-bytes svd-llm/uniform rocket/uniform` (raw numbers and times: "
             "`results/nm_quality.json`). Machine: " + cpu_model() + ", 2 cores shared with other jobs, one thread "
             "per run (perplexities do not depend on it; the times in the JSON do).", "", f"Dense: **{dense:.2f}**", "",
             "| method | " + " | ".join(patterns) + " |", "|---|" + "---|" * len(patterns)]
    for name in names:
        cells = []
        for pattern in patterns:
            row = rows.get(f"{name}/{pattern}" if name in PRUNE_METHODS else f"{name}@{pattern}")
            cells.append("not run" if row is None else f"{row['ppl']:.2f} [{row['ppl'] / dense:.2f}x] "
                                                       f"({row['ratio']:.1%} / {row['bytes_ratio']:.1%} B)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    update_readme(README, NM_SECTION, "\n".join(lines))


def store_name(budget: str) -> str:
    """The results file of one budget's rows (issue 3's parameter table or issue 14's byte table)."""
    return "compress_quality.json" if budget == "params" else "compress_quality_bytes.json"


def windows_suffix(samples: int) -> str:
    """Row-name suffix of a run calibrated on a non-default number of windows."""
    return "" if samples == DEFAULT_WINDOWS else f"@{samples}w"


def write_readme(rows: dict, budget: str) -> None:
    """Replace (or add) this benchmark's section for ``budget`` in bench/README.md, leaving other sections alone."""
    dense = rows["dense"]["ppl"]
    ratios = sorted({float(k.rsplit("/", 1)[1].split("@")[0]) for k in rows if k not in ("dense", "chat")})
    variants = sorted({k.partition("@")[2] for k in rows if "@" in k}, key=lambda v: int(v.rstrip("w")))
    counted = ("Ratio = fraction of decoder-linear parameters removed (stored values; the achieved value is in "
               "parentheses with, for dictsparse, the fraction of bytes removed once int16 indices are counted)"
               if budget == "params" else
               "Ratio = fraction of decoder-linear bytes removed (`--budget bytes`: everything the checkpoint stores "
               "counted, values, indices and masks; the achieved parameters / bytes removed are in parentheses)")
    command = "" if budget == "params" else " --budget bytes"
    lines = [SECTION if budget == "params" else BYTES_SECTION, "",
             f"{METRIC} of SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF; see docs/methods/assets.md) on "
             "*Emma* (first 8 windows of 512 tokens, BOS first), calibrated on *Pride and Prejudice* "
             f"({DEFAULT_WINDOWS} windows of {DEFAULT_SEQ_LEN} tokens, seed 0, unless a row says otherwise). "
             f"{counted}. Lower is better; in brackets: x dense.",
             "", f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/compress_quality.py{command}` (compression "
             f"times in `results/{store_name(budget)}` are from {cpu_model()}, 2 cores shared with other jobs, one "
             "thread per run). Knapsack = ROCKET's "
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
              f"Raw numbers and compression times: `results/{store_name(budget)}`.", ""]
    if rows.get("chat"):
        lines += ["Greedy chat answers (real vLLM, bfloat16, chat template, at most 48 tokens), "
                  "`--chat METHOD/ALLOCATION/RATIO ...`:", "",
                  "| model | " + " | ".join(CHAT_QUESTIONS) + " |", "|---|" + "---|" * len(CHAT_QUESTIONS)]
        for name, answers in rows["chat"].items():
            cells = [" ".join(a.split()).replace("|", "\\|") for a in answers]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    update_readme(README, lines[0], "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
