"""Decode throughput and memory of dense vs lowrank vs dictsparse checkpoints in real vLLM.

Every variant is the same memory-bound Llama (hidden 2048, FFN 5632, 8 layers, 16/4 heads,
bf16) served by the same vLLM with the slimserve plugin, one fresh process per variant, in
one run; ratios are to the dense figure of that run. Factor values are random: speed and
memory depend on shapes and storage, not on the values (quality is measured elsewhere).

Decode rate = generated tokens / (time for 1 + T tokens − time for 1 token), so prefill and
scheduling start-up cancel out. Start time is the engine's construction (weights loaded and
packed, memory profiled, KV cache allocated), with the CPU kernels already built and cached.

vLLM runs as ``slimserve serve`` runs it (``server/cpu_tuning.py``: the worker bound to every
core, Intel OpenMP and tcmalloc preloaded), since that is what a user's requests meet;
``--vllm-defaults`` measures vLLM's own defaults instead (on a 2-core host: one worker thread,
the other core reserved), the configuration of the tables written before 2026-12-05.

    python bench/decode.py                  # all variants, prints and writes bench/README.md
    python bench/decode.py --variants dense lowrank-0.3 --tokens 64
    python bench/decode.py --checkpoints DENSE CKPT... --prefill 512 --heading "## ..."   # real checkpoints

With ``--checkpoints`` the rows are those folders instead (the first one dense, the reference),
e.g. the real SmolLM2 and its compressed checkpoints; the context is then 1024 tokens so a
512-token prompt fits.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from slimserve.loaders.checkpoint import (
    CheckpointWriter,
    compression_summary,
    copy_aux_files,
    iter_tensors,
    open_checkpoint,
)
from slimserve.loaders.compress.budget import PARAMS, Budget, dictsparse_sizes, lowrank_rank, lowrank_sparse_nnz
from slimserve.loaders.compress.oats import oats_sizes, row_top
from slimserve.loaders.converters import convert_compressed_tensors
from slimserve.loaders.models import decoder_linear_modules
from slimserve.loaders.schemes.dictsparse import dense_to_coef
from slimserve.loaders.schemes.lowrank_sparse import encode_sparse
from slimserve.loaders.schemes.nm import nm_mask, pack_nm
from slimserve.server.cpu_tuning import choose_dtype, host_cpu_info, openmp_and_malloc_preloads, tune_vllm
from slimserve.testing.edit import edited_copy
from slimserve.testing.models import build_tiny_causal_lm
from slimserve.testing.nm import write_compressed_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402
from sections import update_readme  # noqa: E402

HEADING = "## Decode throughput in vLLM (issue 2)"
MODEL = dict(hidden_size=2048, intermediate_size=5632, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=128,
             vocab_size=512, dtype=torch.bfloat16)
VARIANTS = ["dense"] + [f"{scheme}-{r}" for scheme in ("lowrank", "dictsparse") for r in ("0.2", "0.3", "0.5")]
VARIANTS += ["nm-2:4", "nm-4:8", "nm-1:4"]  # N:M semi-structured sparsity, named kept:group
# 2:4 as llm-compressor publishes it (compressed-tensors' sparse-24-bitmask), imported by convert
VARIANTS += ["nm-2:4-compressed-tensors"]
# dictsparse sized by --budget bytes (bf16): the encoding writers pick (bitmask here), and the same sizes forced to ELL
VARIANTS += ["dictsparse-bytes-0.3", "dictsparse-ell-bytes-0.3"]
VARIANTS += ["lowrank_sparse-bytes-0.3"]  # U·V + S at OATS's split of 30 % of the bytes removed
# row-sparse (lowrank_sparse of rank 0, what `compress --method sparsegpt --ratio` writes) at 20 / 30 % of the bytes
VARIANTS += ["sparse-bytes-0.2", "sparse-bytes-0.3"]

_RUNNER = r"""
import json, os, sys, time
import psutil
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    start = time.perf_counter()  # engine start: load, weight packing, memory profiling, KV cache (kernels cached)
    llm = LLM(model=args["model"], dtype=args["dtype"], enforce_eager=True, max_model_len=args["context"],
              max_num_seqs=max(args["batches"]), seed=0, **args["engine"])
    result = {"start": time.perf_counter() - start}
    prompt = "The history of the city begins with a small settlement on the river"

    def run(batch, tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt] * batch, params, use_tqdm=False)
        return time.perf_counter() - start
    for batch in args["batches"]:
        run(batch, 8)  # warm-up
        rates = []
        for _ in range(args["repeats"]):
            t1, tn = run(batch, 1), run(batch, 1 + args["tokens"])
            rates.append(batch * args["tokens"] / (tn - t1))
        result[f"b{batch}"] = sorted(rates)[len(rates) // 2]
    if args["prefill"]:  # prompt tok/s of one long prompt; each repeat starts differently, so no prefix-cache hit
        params = SamplingParams(temperature=0.0, max_tokens=1)
        times = []
        for repeat in range(args["repeats"] + 1):
            ids = [(7 * i + repeat) % 500 + 3 for i in range(args["prefill"])]  # ids < 503: any vocabulary
            start = time.perf_counter()
            llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        result["prefill"] = args["prefill"] / sorted(times[1:])[len(times[1:]) // 2]  # the first is a warm-up
    # peak (VmHWM) and steady (VmRSS, after every request and an idle spell, when the worker has handed back the
    # heap serving freed: plugin/vllm/heap.py) resident memory of the largest process: the worker
    from slimserve.plugin.vllm.heap import IDLE_SECONDS, PERIOD_SECONDS
    time.sleep(2 * IDLE_SECONDS + 2 * PERIOD_SECONDS)  # the first samples after a burst still see its threads spin
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    result["peak_rss"] = result["steady_rss"] = 0
    for p in procs:
        try:
            for line in open(f"/proc/{p.pid}/status"):
                for key, field in (("peak_rss", "VmHWM:"), ("steady_rss", "VmRSS:")):
                    if line.startswith(field):
                        result[key] = max(result[key], int(line.split()[1]) * 1024)
        except OSError:
            pass
    print("BENCH_RESULT=" + json.dumps(result), flush=True)
"""


def write_variant(dense_dir: Path, out: Path, variant: str) -> Path:
    """Write a checkpoint of ``variant`` with random factors of the budgeted shapes."""
    if variant == "dense":
        return dense_dir
    if variant == "nm-2:4-compressed-tensors":
        return write_compressed_tensors_variant(dense_dir, out)
    if variant.startswith("nm-"):
        return write_nm_variant(dense_dir, out, variant)
    scheme, ratio = variant.rsplit("-", 1)
    ratio = float(ratio)
    options = scheme.split("-")[1:]  # dictsparse: "bytes" (byte budget), "ell" (force that encoding)
    scheme = scheme.split("-")[0]
    budget = Budget("bytes", MODEL["dtype"].itemsize) if "bytes" in options else PARAMS
    ckpt = open_checkpoint(dense_dir)
    modules = decoder_linear_modules(ckpt.tensors)
    writer = CheckpointWriter(out, ckpt.config, producer={"method": f"bench-random-{scheme}", "ratio": ratio})
    generator = torch.Generator().manual_seed(0)
    for name, tensor in iter_tensors(ckpt):
        if name.removesuffix(".weight") not in modules:
            writer.add_tensor(name, tensor)
    for module in modules:
        out_features, in_features = ckpt.tensors[f"{module}.weight"].shape
        scale = in_features ** -0.5
        if scheme == "lowrank":
            r = lowrank_rank(out_features, in_features, ratio)
            tensors = {"u": torch.randn(out_features, r, generator=generator) * scale,
                       "v": torch.randn(r, in_features, generator=generator) * scale}
            fields = {"rank": r}
        elif scheme in ("lowrank_sparse", "sparse"):
            r, s = (oats_sizes(out_features, in_features, ratio, budget) if scheme == "lowrank_sparse" else
                    (0, lowrank_sparse_nnz(out_features, in_features, 0,
                                           budget.allowed(out_features, in_features, ratio), budget)))
            tensors = {"u": torch.randn(out_features, r, generator=generator) * scale,
                       "v": torch.randn(r, in_features, generator=generator) * scale,
                       **encode_sparse(row_top(torch.randn(out_features, in_features, generator=generator) * scale, s),
                                       s)}
            fields = {"rank": r, "nnz": s, "encoding": "bitmask" if "s_mask" in tensors else "ell"}
        else:
            k, s = dictsparse_sizes(out_features, in_features, ratio, budget=budget)
            values, indices = dense_to_coef(torch.randn(out_features, k, generator=generator) * scale, s)
            tensors = {"dictionary": torch.randn(k, in_features, generator=generator) * scale,
                       "coef_values": values, "coef_indices": indices}
            # without "encoding" the writer stores the smaller one (bitmask at k/s = 2)
            fields = {"atoms": k, "nnz": s, **({"encoding": "ell"} if "ell" in options else {})}
        stored = {k: v.to(MODEL["dtype"]) if v.is_floating_point() else v for k, v in tensors.items()}
        writer.add_module(module, "lowrank_sparse" if scheme == "sparse" else scheme, stored, in_features=in_features,
                          out_features=out_features, **fields)
    copy_aux_files(dense_dir, out)
    return writer.finish()


def write_nm_variant(dense_dir: Path, out: Path, variant: str) -> Path:
    """Write an ``nm`` checkpoint (e.g. ``nm-2:4``): random weights pruned by magnitude to kept:group."""
    kept, group = (int(v) for v in variant.removeprefix("nm-").split(":"))
    ckpt = open_checkpoint(dense_dir)
    modules = decoder_linear_modules(ckpt.tensors)
    writer = CheckpointWriter(out, ckpt.config, producer={"method": f"bench-random-nm-{kept}:{group}"})
    generator = torch.Generator().manual_seed(0)
    for name, tensor in iter_tensors(ckpt):
        if name.removesuffix(".weight") not in modules:
            writer.add_tensor(name, tensor)
    for module in modules:
        out_features, in_features = ckpt.tensors[f"{module}.weight"].shape
        weight = torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5
        tensors = pack_nm((weight * nm_mask(weight, kept, group)).to(MODEL["dtype"]), kept, group, module=module)
        writer.add_module(module, "nm", tensors, in_features=in_features, out_features=out_features, kept=kept,
                          group=group)
    copy_aux_files(dense_dir, out)
    return writer.finish()


def serving_environment(vllm_defaults: bool = False) -> tuple[dict[str, str], str]:
    """The environment a benchmarked vLLM runs in and a line saying how its threads are set up: as
    ``slimserve serve`` sets them (binding, preloads), or vLLM's defaults when ``vllm_defaults``."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if vllm_defaults:
        return env, "vLLM's default threads (automatic binding, one core reserved), nothing preloaded"
    _, log = tune_vllm([], env, host_cpu_info(), openmp_and_malloc_preloads())
    choices = [line for line in log if not line.startswith(("CPU", "dtype"))]
    return env, "as `slimserve serve` runs it: " + "; ".join(choices)


def write_compressed_tensors_variant(dense_dir: Path, out: Path) -> Path:
    """Random weights pruned by magnitude to 2:4, saved in compressed-tensors' ``sparse-24-bitmask`` layout and
    converted as a user would (``slimserve convert --from compressed-tensors``)."""
    generator = torch.Generator().manual_seed(0)

    def prune(state: dict) -> None:
        for module in decoder_linear_modules(state):
            out_features, in_features = state[f"{module}.weight"].shape
            weight = torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5
            state[f"{module}.weight"] = (weight * nm_mask(weight, 2, 4)).to(MODEL["dtype"])

    pruned = edited_copy(dense_dir, out.with_name(f"{out.name}-pruned"), tensors=prune)
    published = out.with_name(f"{out.name}-published")
    write_compressed_tensors(pruned, published, "sparse-24-bitmask")
    shutil.rmtree(pruned)
    converted = convert_compressed_tensors(published, out)
    shutil.rmtree(published)
    return converted


def measure(model: Path, batches: list[int], tokens: int, repeats: int, engine: dict | None = None,
            prefill: int = 0, dtype: str = "bfloat16", context: int = 512,
            env: dict[str, str] | None = None) -> dict[str, float]:
    """Decode tok/s, engine start time and RSS of ``model`` in a fresh vLLM serving it as ``dtype``; ``engine``: extra
    engine arguments (e.g. Sirius); ``prefill``: also the prompt tok/s of a prompt that long (0: not measured);
    ``context``: the engine's max_model_len; ``env``: the process environment (default: ``serving_environment()``)."""
    env = env if env is not None else serving_environment()[0]
    args = json.dumps({"model": str(model), "batches": batches, "tokens": tokens, "repeats": repeats,
                       "engine": engine or {}, "prefill": prefill, "dtype": dtype, "context": context})
    proc = subprocess.run([sys.executable, "-c", _RUNNER, args], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT="):
            return json.loads(line.split("=", 1)[1])
    raise RuntimeError(f"benchmark run of {model} failed:\n{proc.stderr[-4000:]}")


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--checkpoints", nargs="+", type=Path, metavar="DIR",
                        help="measure these model folders instead of the synthetic variants; the first is the dense "
                             "reference")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=0, metavar="N",
                        help="also measure prompt tok/s of an N-token prompt (N < 512, the model's context; one "
                             "request, median of the repeats)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="the dtype vLLM serves the bf16 checkpoints as; auto: what `slimserve serve` picks for "
                             "this CPU (bf16 where the ISA computes it natively, else fp32)")
    parser.add_argument("--vllm-defaults", action="store_true",
                        help="run vLLM with its own thread defaults instead of as `slimserve serve` tunes it")
    parser.add_argument("--readme", type=Path, default=Path(__file__).with_name("README.md"))
    parser.add_argument("--heading", default=HEADING,
                        help="the bench/README.md section this run replaces (a subset of variants gets its own)")
    args = parser.parse_args()
    machine = describe_machine()
    dtype, why = choose_dtype(host_cpu_info().flags) if args.dtype == "auto" else (args.dtype, "chosen by --dtype")
    if "dense" not in args.variants:
        args.variants = ["dense", *args.variants]
    env, threads = serving_environment(args.vllm_defaults)
    rows = []
    context = 1024 if args.checkpoints else 512

    def add_row(name: str, model: Path) -> None:
        result = measure(model, args.batches, args.tokens, args.repeats, prefill=args.prefill, dtype=dtype,
                         context=context, env=env)
        summary = compression_summary(model)
        rows.append({"variant": name, "ratio": summary["ratio"], "bytes_ratio": summary["bytes_ratio"],
                     "weights": weight_bytes(model), **result})
        print(json.dumps(rows[-1]), flush=True)

    if args.checkpoints:
        for model in args.checkpoints:
            add_row(model.name, model)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            dense_dir = build_tiny_causal_lm(Path(tmp) / "dense", "llama", **MODEL, weight_std=0.02)
            for variant in args.variants:
                add_row(variant, write_variant(dense_dir, Path(tmp) / variant, variant))
    dense = rows[0]
    header = ["variant", "params removed", "bytes removed", "weights MiB", "peak RSS MiB", "steady RSS MiB"]
    header += [f"b{b} tok/s" for b in args.batches] + [f"b{b} vs dense" for b in args.batches]
    if args.prefill:
        header += [f"prefill {args.prefill} tok/s", "prefill vs dense"]
    header += ["start s", "start vs dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"{row['ratio']:.1%}", f"{row['bytes_ratio']:.1%}", f"{row['weights'] / 2**20:.0f}",
                 f"{row['peak_rss'] / 2**20:.0f}", f"{row['steady_rss'] / 2**20:.0f}"]
        cells += [f"{row[f'b{b}']:.1f}" for b in args.batches]
        cells += [f"{row[f'b{b}'] / dense[f'b{b}']:.2f}x" for b in args.batches]
        if args.prefill:
            cells += [f"{row['prefill']:.0f}", f"{row['prefill'] / dense['prefill']:.2f}x"]
        cells += [f"{row['start']:.1f}", f"{row['start'] / dense['start']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    command = "python bench/decode.py " + shlex.join(sys.argv[1:])
    section = (f"{args.heading}\n\nCommand: `{command.strip()}`\n\n"
               f"{'These model folders' if args.checkpoints else 'Llama hidden 2048, FFN 5632, 8 layers'}, "
               f"bf16 checkpoints served as {dtype} ({why}), "
               f"vllm-cpu 0.32.0, {args.tokens} decoded tokens, median of {args.repeats}; vLLM {threads}. "
               "Machine at the start: "
               f"{machine}; at the end: load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}.\n\n{table}\n")
    update_readme(args.readme, args.heading, section)


if __name__ == "__main__":
    main()
