"""Sirius (issue 11): answer accuracy on the real SmolLM2 and decode latency on the memory-bound Llama.

Two parts, one ``## Sirius (issue 11)`` section of bench/README.md:

- ``quality``: SmolLM2-135M-Instruct (fp32, eager) greedy answers to a locally generated set of one-step
  addition word problems (4-shot, "The answer is N."), a set the CATS-sparse model gets wrong
  more often than the dense one. Rows: dense (vLLM), the sparse model alone (plain PyTorch: CATS
  top-k on every MLP's gate activations for every generated token, dense prompt, as the drafter
  sees it), and Sirius in vLLM with the same CATS drafter: lossless and threshold acceptance at
  period K. Each Sirius row reports vLLM's spec-decode counters as the average advance length
  (tokens committed per check) and corrections per generated token.
- ``latency``: decode tok/s of the random Llama 2048/5632 x 8 (bf16) of bench/decode.py, dense vs
  Sirius (CATS 0.5) at batch 1 and 8. Random weights give no meaningful acceptance, so Sirius
  runs with threshold 0 (every draft kept, advance length exactly K): that measures the cost of
  one round (K − 1 sparse draft steps + one K-token verification) and the rate at the advance
  length ``a`` measured on the real model is ``rate(K) · a / K`` (a round's cost does not depend on
  how many of its drafts are kept).

    python bench/sirius.py --parts quality latency
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import MODEL, measure  # noqa: E402
from machine import describe_machine  # noqa: E402
from sections import update_readme  # noqa: E402

from slimserve.loaders.assets import smollm2_folder  # noqa: E402
from slimserve.plugin.vllm.sirius_settings import SiriusSettings  # noqa: E402
from slimserve.testing.models import build_tiny_causal_lm  # noqa: E402
from slimserve.testing.sirius import CatsGate  # noqa: E402

HEADING = "## Sirius (issue 11)"
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "shells", "cards"]
ANSWER = re.compile(r"answer is (-?\d+)")
SHOTS = 4
MAX_TOKENS = 20
CATS = "cats:0.5"

LATENCY_NOTE = ("CATS here zeroes activations after computing them (it emulates the drafter's arithmetic and "
                "reads every weight), so a draft step costs a dense decode step; what the rounds save is vLLM's "
                "per-step work (scheduling, sampling, output processing), paid once per round of K tokens instead "
                "of once per token. A drafter that skips the weight rows of zeroed activations (R-Sparse's kernel) "
                "would add its own saving on top.")

_VLLM_RUNNER = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype="float32", max_model_len=1024, max_num_seqs=32, seed=0, enforce_eager=True,
              disable_log_stats=False, **args["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"])
    outs = llm.generate(args["prompts"], params, use_tqdm=False)
    counters = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            counters[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    print("SIRIUS_BENCH=" + json.dumps({"texts": [o.outputs[0].text for o in outs],
                                        "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                                        "counters": counters}), flush=True)
"""


def word_problems(count: int, seed: int = 0) -> tuple[str, list[tuple[str, int]]]:
    """A 4-shot prompt head and ``count`` one-step addition word problems with their answers.

    One step because SmolLM2-135M solves almost no two-step problem (``a + b − c``: 1 of 40 right
    in a trial run), which leaves nothing for a sparse model to lose.
    """
    rng = random.Random(seed)

    def problem() -> tuple[str, str, int]:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?", f"{a} + {b}", a + b

    head = "".join(f"Question: {q}\nAnswer: {work} = {answer}. The answer is {answer}.\n\n"
                   for q, work, answer in (problem() for _ in range(SHOTS)))
    return head, [(f"{head}Question: {q}\nAnswer:", answer) for q, _, answer in (problem() for _ in range(count))]


def accuracy(texts: list[str], answers: list[int]) -> tuple[float, float]:
    """Share of texts whose first "The answer is N" gives the right N, and its 95 % normal-approximation half-width."""
    right = sum(bool((m := ANSWER.search(t)) and int(m.group(1)) == a) for t, a in zip(texts, answers))
    p = right / len(answers)
    return p, 1.96 * math.sqrt(p * (1 - p) / len(answers))


def run_vllm(model: Path, prompts: list[str], engine: dict) -> dict:
    """Greedy answers and spec-decode counters of one fresh vLLM engine (a child process: vLLM needs a main guard)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = json.dumps({"model": str(model), "prompts": prompts, "engine": engine, "max_tokens": MAX_TOKENS})
    proc = subprocess.run([sys.executable, "-c", _VLLM_RUNNER, args], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("SIRIUS_BENCH="):
            return json.loads(line.removeprefix("SIRIUS_BENCH="))
    raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


class PromptDenseCatsGate(CatsGate):
    """The drafter's CATS rule on generated tokens only: a call with more than one position is a prompt, run dense,
    as in Sirius, whose drafter only ever sees prompts the full model prefilled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sparse = x.shape[1] == 1
        return super().forward(x)


def sparse_model_texts(model: Path, prompts: list[str], sparsity: float, batch: int = 50) -> list[str]:
    """Greedy answers of the CATS-sparse SmolLM2 alone, in plain PyTorch (transformers, fp32, left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for layer in lm.model.layers:
        layer.mlp.act_fn = PromptDenseCatsGate(sparsity)
    texts = []
    for start in range(0, len(prompts), batch):
        inputs = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = lm.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    return texts


def advance_and_corrections(run: dict) -> tuple[float, float]:
    """Average advance length (accepted drafts + the verifier's token per check) and corrections per token.

    A check is a correction unless it kept its last draft position (vLLM's per-position acceptance counts).
    """
    counters = run["counters"]
    checks = counters["vllm:spec_decode_num_drafts"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    kept_all = (counters.get("vllm:spec_decode_num_accepted_tokens_per_pos") or [0])[-1]
    return (accepted + checks) / checks, (checks - kept_all) / run["tokens"]


def quality(args: argparse.Namespace) -> tuple[str, dict[int, float]]:
    """The accuracy table and the advance length measured at each threshold-Sirius period."""
    model = smollm2_folder()
    _, problems = word_problems(args.problems)
    prompts, answers = [p for p, _ in problems], [a for _, a in problems]
    rows, advance_at = [], {}
    start = time.perf_counter()
    dense = run_vllm(model, prompts, {})
    rows.append(("dense (vLLM)", accuracy(dense["texts"], answers), "", "", time.perf_counter() - start))
    start = time.perf_counter()
    sparse = sparse_model_texts(model, prompts, float(CATS.split(":")[1]))
    rows.append((f"sparse alone ({CATS}, PyTorch)", accuracy(sparse, answers), "", "", time.perf_counter() - start))
    for period in args.periods:
        for label, settings in ((f"Sirius lossless K={period}", SiriusSettings(period=period, lossless=True,
                                                                               sparse=CATS)),
                                (f"Sirius thr {args.threshold} K={period}",
                                 SiriusSettings(period=period, threshold=args.threshold, sparse=CATS))):
            start = time.perf_counter()
            run = run_vllm(model, prompts, settings.engine_args(str(model)))
            advance, corrections = advance_and_corrections(run)
            if not settings.lossless:
                advance_at[period] = advance
            rows.append((label, accuracy(run["texts"], answers), f"{advance:.2f}", f"{corrections:.3f}",
                         time.perf_counter() - start))
            print(rows[-1], flush=True)
    lines = ["| configuration | accuracy | ±95 % | advance length | corrections / token | wall s |",
             "|---|---|---|---|---|---|"]
    for label, (acc, half), advance, corrections, wall in rows:
        lines.append(f"| {label} | {acc:.1%} | {half:.1%} | {advance} | {corrections} | {wall:.0f} |")
    return "\n".join(lines), advance_at


def latency(args: argparse.Namespace, advance_at: dict[int, float]) -> str:
    """Decode tok/s dense vs Sirius rounds with every draft kept, scaled to the measured advance lengths."""
    lines = ["| configuration | " + " | ".join(f"b{b} tok/s" for b in args.batches) + " | "
             + " | ".join(f"b{b} vs dense" for b in args.batches) + " |",
             "|---|" + "---|" * (2 * len(args.batches))]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_causal_lm(Path(tmp) / "dense", "llama", **MODEL, weight_std=0.02)
        dense = measure(model, args.batches, args.tokens, args.repeats)

        def row(label: str, rates: dict) -> None:
            cells = [f"{rates[f'b{b}']:.1f}" for b in args.batches]
            cells += [f"{rates[f'b{b}'] / dense[f'b{b}']:.2f}x" for b in args.batches]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

        row("dense", dense)
        for period in args.periods:
            settings = SiriusSettings(period=period, threshold=0.0, sparse=CATS)
            every_draft = measure(model, args.batches, args.tokens, args.repeats,
                                  engine=settings.engine_args(str(model)))
            row(f"Sirius K={period}, every draft kept (a = {period})", every_draft)
            if period in advance_at:
                a = advance_at[period]
                row(f"Sirius K={period} at a = {a:.2f} (model: rate · a / K)",
                    {k: v * a / period for k, v in every_draft.items() if k.startswith("b")})
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["quality", "latency"], choices=["quality", "latency"])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--periods", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--advance", type=json.loads, default={},
                        help='advance lengths {"K": a} for the latency part when quality is not run')
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readme", type=Path, default=Path(__file__).with_name("README.md"))
    args = parser.parse_args()
    command = " ".join(["python bench/sirius.py", *sys.argv[1:]])
    parts = [f"{HEADING}\n\nCommand: `{command}`\n\nMachine: {describe_machine()}, vllm-cpu 0.32.0.\n"]
    advance_at = {int(k): float(v) for k, v in args.advance.items()}
    if "quality" in args.parts:
        table, measured = quality(args)
        advance_at.update(measured)
        parts.append(f"### Accuracy: SmolLM2-135M-Instruct, {args.problems} one-step addition word problems "
                     f"(generated, seed 0, {SHOTS}-shot), greedy, fp32, drafter {CATS}\n\n{table}\n")
    if "latency" in args.parts:
        parts.append(f"### Decode tok/s: random Llama 2048/5632 x 8, bf16, {args.tokens} tokens, median of "
                     f"{args.repeats}, drafter {CATS}\n\n{latency(args, advance_at)}\n\n{LATENCY_NOTE}\n")
    section = "\n".join(parts)
    print(section)
    update_readme(args.readme, HEADING, section)


if __name__ == "__main__":
    main()
