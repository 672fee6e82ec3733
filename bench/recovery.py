"""Keeping the answers (issue 16): one-pass vs sequential calibration, with and without healing, on SmolLM2-135M.

A method (default ROCKET, the best of the compression-quality table) at the given ratios,
calibrated on *Pride and Prejudice* or on other ``--calib`` sources (``self:N``: the dense model's
own chat turns); token perplexity on *Emma* (same author as the novel) and on *Moby Dick* (a text
of another kind), dense in the same run. Healing distils the dense model on the calibration text
(``slimserve heal``; steps, tokens and wall time in the table). Results accumulate in
``bench/results/recovery.json`` (a rerun skips finished rows) and the table goes into bench/README.md;
``make demo``'s ratio is read off its chat column.

    OMP_NUM_THREADS=2 .venv/bin/python bench/recovery.py [--ratios 0.3] [--heal-steps 40] [--chat]
        [--calibrations one-pass sequential] [--method rocket] [--allocation knapsack]
        [--budget params] [--calib self:64]
        [--model DIR --calib-cache FILE]   # reuse a folder and Gram cache (and its knapsack profile) made earlier
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model
from sections import README, update_readme

from slimserve.loaders.assets import ARTIFACTS, _read_rdb_object, austen_text, smollm2_folder
from slimserve.loaders.chat_eval import SHIPPED_QUESTIONS
from slimserve.loaders.checkpoint import compression_summary
from slimserve.loaders.compress.calib_sources import prepare_calibration
from slimserve.loaders.compress.calibration import DEFAULT_WINDOWS
from slimserve.loaders.compress.run import compress
from slimserve.loaders.eval import METRIC, perplexity
from slimserve.loaders.heal import HealSettings, heal
from slimserve.server.chat_eval import evaluate_chat

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SECTION = "## Sequential calibration and healing on SmolLM2-135M (issue 16)"
MOBY_DEB = "r-cran-tokenizers"
HEAL_LR = 2e-4


def moby_dick(folder: Path = ARTIFACTS / "texts") -> Path:
    """Moby Dick as plain text, from Debian's r-cran-tokenizers (object ``mobydick``)."""
    path = folder / "mobydick.txt"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    unpacked = folder / "tokenizers"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", MOBY_DEB], cwd=tmp, check=True, capture_output=True)
        subprocess.run(["dpkg-deb", "-x", str(next(Path(tmp).glob(f"{MOBY_DEB}_*.deb"))), str(unpacked)], check=True)
    data = next(unpacked.rglob("tokenizers/data"))
    path.write_text("\n".join(str(x) for x in _read_rdb_object(data, "mobydick")) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3])
    parser.add_argument("--method", default="rocket")
    parser.add_argument("--allocation", default="knapsack")
    parser.add_argument("--budget", choices=["params", "bytes"], default="params")
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_WINDOWS,
                        help="calibration windows of 512 tokens (self:N text holds about N/4 of them)")
    parser.add_argument("--calib", nargs="+", metavar="SOURCE",
                        help="calibration sources as `compress --calib` takes them (default: Pride and Prejudice)")
    parser.add_argument("--calibrations", nargs="+", choices=["one-pass", "sequential"],
                        default=["one-pass", "sequential"])
    parser.add_argument("--heal-steps", type=int, default=40, help="0: no healed rows")
    parser.add_argument("--heal-batch", type=int, default=2)
    parser.add_argument("--heal-seq-len", type=int, default=128)
    parser.add_argument("--heal-lr", type=float, default=HEAL_LR)
    parser.add_argument("--model", type=Path, help="SmolLM2 folder (default: the assets one)")
    parser.add_argument("--calib-cache", type=Path,
                        help="Gram cache (default: bench-recovery/grams.pt in the asset cache)")
    parser.add_argument("--chat", action="store_true",
                        help="also score each row's chat accuracy (`slimserve eval chat`, shipped questions; one vLLM "
                             "start per row) into its 'chat' field")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "recovery.json"
    rows = json.loads(store.read_text()) if store.is_file() else {}
    model = args.model or smollm2_folder()
    texts = {"emma": austen_text("emma"), "mobydick": moby_dick()}
    work = ARTIFACTS / "bench-recovery"
    work.mkdir(parents=True, exist_ok=True)
    if args.calib:
        label = "+".join(Path(source).stem if Path(source).is_file() else source for source in args.calib)
        calib = prepare_calibration(model, args.calib, cache_dir=work)
        cache = args.calib_cache or work / f"grams-{label.replace(':', '')}.pt"
    else:
        label = None
        calib = austen_text("prideprejudice")
        cache = args.calib_cache or work / "grams.pt"

    def save(name: str, row: dict) -> None:
        rows[name] = {**row, "cpu": row.get("cpu") or cpu_model()}
        store.write_text(json.dumps(rows, indent=1))
        print(f"{name}: {row}", flush=True)
        write_readme(rows)

    def ppl(path: Path) -> dict[str, float]:
        return {text: perplexity(path, file).perplexity for text, file in texts.items()}

    def chat(path: Path) -> dict:
        """``{"chat": accuracy, correct, total, ci95}`` with --chat, else nothing."""
        return {"chat": evaluate_chat(path, SHIPPED_QUESTIONS).overall.as_dict()} if args.chat else {}

    if "dense" not in rows or (args.chat and "chat" not in rows["dense"]):
        dense_row = rows.get("dense") or {"ppl": ppl(model), "cpu": cpu_model()}
        save("dense", {**dense_row, **chat(model)})
    for ratio in args.ratios:
        for calibration in args.calibrations:
            sequential = calibration == "sequential"
            name = "/".join([args.method, args.allocation, str(ratio), calibration]
                            + ([f"calib={label}"] if label else [])
                            + ([f"{args.calib_samples}w"] if args.calib_samples != DEFAULT_WINDOWS else [])
                            + (["bytes"] if args.budget == "bytes" else []))
            out = work / name.replace("/", "-")
            if name not in rows:
                start = time.time()
                compress(model, out, method=args.method, ratio=ratio, allocation=args.allocation, budget=args.budget,
                         calib=calib, calib_cache=cache, sequential=sequential, calib_samples=args.calib_samples,
                         progress=False)
                summary = compression_summary(out)
                save(name, {"ppl": ppl(out), "ratio": summary["ratio"], "bytes_ratio": summary["bytes_ratio"],
                            "compress_s": round(time.time() - start, 1), **chat(out)})
            lr_part = "" if args.heal_lr == HEAL_LR else f"@lr{args.heal_lr:g}"  # other rates get their own rows
            healed_name = f"{name}/heal{args.heal_steps}{lr_part}"
            if healed_name in rows or args.heal_steps == 0:
                continue
            settings = HealSettings(steps=args.heal_steps, lr=args.heal_lr, seq_len=args.heal_seq_len,
                                    batch=args.heal_batch, eval_every=max(1, args.heal_steps // 4),
                                    save_every=args.heal_steps, eval_windows=2)
            start = time.time()
            result = heal(out, work / f"{out.name}-heal", teacher=model, text=calib, settings=settings,
                          progress=False)
            seconds = time.time() - start
            removed = {key: rows[name][key] for key in ("ratio", "bytes_ratio") if key in rows[name]}
            save(healed_name, {"ppl": ppl(result.path), **removed, "heal_s": round(seconds, 1),
                               "heal_tokens": args.heal_steps * args.heal_batch * args.heal_seq_len,
                               "heal_lr": args.heal_lr, "held_out_kl": result.held_out,
                               "held_out_kl_written": result.held_out_written, **chat(result.path)})
            shutil.rmtree(result.path)
    return 0


def chat_cell(row: dict, dense: dict | None) -> str:
    """Chat accuracy with its interval, and the share of dense's accuracy it keeps; blank when not measured."""
    chat = row.get("chat")
    if chat is None:
        return ""
    low, high = chat["ci95"]
    kept = f" [{chat['accuracy'] / dense['accuracy']:.0%} of dense]" if dense else ""
    return f"{chat['accuracy']:.1%} ({low:.1%}-{high:.1%}){kept}"


def write_readme(rows: dict) -> None:
    """Replace (or add) this benchmark's section of bench/README.md, leaving other sections alone."""
    dense = rows["dense"]["ppl"]
    lines = [SECTION, "",
             f"{METRIC} of SmolLM2-135M-Instruct on *Emma* (same author as the novel calibration text) and *Moby "
             "Dick* (another kind of text), first 8 windows of 512 tokens, BOS first. A row is "
             "method/allocation/ratio/calibration: ratio = fraction of decoder-linear parameters removed "
             "(`--budget params`, as the quality table above) unless the row ends in /bytes; calibrated on *Pride and "
             "Prejudice* (32 windows of 512 tokens, seed 0) unless the row says calib=self:N (N chat turns the dense "
             "model wrote itself, `compress --calib self:N`; a /Kw part: K windows instead of 32). "
             "One-pass: every layer's Gram from the dense model; "
             "sequential: from the outputs of the already-compressed layers below (`compress --sequential`; the "
             "knapsack levels come from the one-pass profile either way). Healing: `slimserve heal` on the "
             "calibration text, KL to the dense model's logits, only stored factors trained; tokens, lr and wall "
             "time per row. Chat: `slimserve eval chat` on the shipped questions (greedy through vLLM, "
             "exact/numeric match; 95 % Wilson interval). In brackets: x dense.", "",
             f"CPU: {rows['dense'].get('cpu', 'unknown')} unless the time cell names another, 2 cores shared with "
             "other jobs (times are indicative). "
             "Command: `OMP_NUM_THREADS=2 .venv/bin/python bench/recovery.py`.", "",
             "| configuration | Emma | Moby Dick | chat accuracy | params / bytes removed | time |",
             "|---|---|---|---|---|---|",
             f"| dense | {dense['emma']:.2f} | {dense['mobydick']:.2f} | {chat_cell(rows['dense'], None)} | 0 | |"]
    for name, row in rows.items():
        if name == "dense":
            continue
        cells = [f"{row['ppl'][t]:.2f} [{row['ppl'][t] / dense[t]:.2f}x]" for t in ("emma", "mobydick")]
        if "heal_s" in row:
            kl = row["held_out_kl"]
            time_cell = (f"heal {row['heal_tokens']:,} tokens (lr {row['heal_lr']:g}), {row['heal_s']:.0f} s; "
                         f"held-out KL {kl[0][1]:.3f} -> {kl[-1][1]:.3f} ({row['held_out_kl_written']:.3f} in bf16)")
        else:
            time_cell = f"compress {row['compress_s']:.0f} s"
        if row.get("cpu", rows["dense"].get("cpu")) != rows["dense"].get("cpu"):
            time_cell += f" ({row['cpu']})"
        chat = chat_cell(row, rows["dense"].get("chat"))
        removed = f"{row['ratio']:.1%}" + (f" / {row['bytes_ratio']:.1%}" if "bytes_ratio" in row else "")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {chat} | {removed} | {time_cell} |")
    lines.append("")
    update_readme(README, SECTION, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
