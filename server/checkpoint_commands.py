"""CLI subcommands over the checkpoint library: compress, eval, convert, densify, validate, inspect."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def _add_compress(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="compress a dense HF model folder into a slimserve checkpoint")
    p.add_argument("src", help="dense Hugging Face model folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", default="svd",
                   help="svd: plain truncated SVD (uncalibrated); svd-llm: whitened SVD; cospadi: whitened sparse "
                        "dictionary learning; rocket: eigenbasis + sparse coefficients + ridge refit; rsparse: "
                        "R-Sparse rank-aware activation sparsity (budgeted by --sparsity); oats: low-rank + "
                        "row-sparse; sparsegpt, wanda: pruning, row-sparse to --ratio or N:M to --pattern "
                        "(default: svd)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of decoder-linear bytes (or, with --budget params, "
                                                    "parameters) removed (0.3 keeps 70%%)")
    budget.add_argument("--rank", type=int, help="svd only: one fixed rank for every decoder linear")
    budget.add_argument("--sparsity", type=float, help="rsparse only: fraction of each linear's MACs removed per "
                                                       "decoded token (e.g. 0.5)")
    budget.add_argument("--pattern", help="sparsegpt and wanda only: N:M, N weights kept of every M consecutive "
                                          "inputs (e.g. 2:4, 4:8); with --ratio instead they prune row-sparse")
    p.add_argument("--budget", default="bytes", choices=["bytes", "params"],
                   help="what --ratio counts: bytes stored, values and indices (default), or float parameters "
                        "with indices not counted, as the papers count (for comparison tables)")
    p.add_argument("--allocation", default="uniform",
                   help="uniform: every linear loses --ratio; knapsack: profile every linear and pick per-layer "
                        "levels for the least summed error under the global budget (default: uniform)")
    p.add_argument("--calib", nargs="+",
                   help="calibration sources, concatenated (required by svd-llm, cospadi, rocket, rsparse, sparsegpt, "
                        "wanda): plain text files, chat .jsonl files ({\"messages\": [...]} per line, rendered with "
                        "the model's chat template) and self:N (N chat turns the dense model writes itself)")
    p.add_argument("--calib-cache", help="safetensors file caching the calibration Grams; reused when the model, "
                                         "text and settings match")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration window sampling and CoSpaDi initialization")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each decoder layer on the outputs of the already-compressed layers below it "
                        "(block-sequential, as SparseGPT does) instead of the dense model's")
    p.add_argument("--heal-steps", type=int, default=0,
                   help="then heal: distil the dense model into the stored factors for this many steps on --calib "
                        "(see `slimserve heal`; default 0: no healing)")
    p.add_argument("--heal-lr", type=float, default=1e-4, help="healing learning rate (AdamW; default 1e-4)")
    p.add_argument("--heal-seq-len", type=int, default=256, help="healing tokens per window (default 256)")
    p.add_argument("--heal-batch", type=int, default=4, help="healing windows per step (default 4)")
    p.add_argument("--rank-share", type=float,
                   help="oats only: share of each layer's byte allowance given to the low-rank factors U·V, the rest "
                        "to the sparse S (default 0.3, the paper's rank ratio). More rank leaves S sparser and "
                        "prefill faster, at a perplexity cost (docs/methods/lowrank_sparse.md has the measured trade)")
    rsparse = p.add_argument_group("rsparse")
    rsparse.add_argument("--alpha", type=float, default=0.95, help="uniform sparse share α without --search")
    rsparse.add_argument("--recipe", help="a saved rsparse_recipe.json with per-module α")
    rsparse.add_argument("--search", action="store_true",
                         help="search per-module α (group-wise differential evolution from the best uniform α of "
                              "0.9/0.95/1, fitness = perplexity on --calib); saves rsparse_recipe.json")
    rsparse.add_argument("--population", type=int, default=6, help="search population (default 6)")
    rsparse.add_argument("--generations", type=int, default=2, help="search generations per group (default 2)")
    rsparse.add_argument("--group-size", type=int, default=42, help="modules optimized together (default 42)")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    def run(args: argparse.Namespace) -> int:
        from slimserve.errors import CompressionError
        from slimserve.loaders.compress.calib_sources import prepare_calibration
        from slimserve.loaders.compress.run import check_rank_share

        check_rank_share(args.method, args.rank_share)  # before any calibration work
        if args.calib:  # several files, chats or self:N become one text file (cached beside the Grams)
            args.calib = prepare_calibration(args.src, args.calib, seed=args.seed, progress=not args.quiet,
                                             cache_dir=Path(args.calib_cache).parent if args.calib_cache else None)
        if (args.method == "rsparse") != (args.sparsity is not None):
            raise CompressionError("R-Sparse is budgeted by MACs removed per token: use --method rsparse with "
                                   "--sparsity S (and only then)")
        if args.method == "rsparse":
            return _run_rsparse(args)
        from slimserve.loaders.compress.prune import PRUNE_METHODS, prune

        if args.pattern is not None and args.method not in PRUNE_METHODS:
            raise CompressionError(f"--pattern is N:M pruning, which --method {args.method} does not do: use "
                                   "--method sparsegpt|wanda with --pattern N:M", field="--pattern")
        if args.pattern is not None:
            out = prune(args.src, args.out, method=args.method, pattern=args.pattern, calib=args.calib,
                        calib_cache=args.calib_cache, seed=args.seed, calib_samples=args.calib_samples,
                        calib_seq_len=args.calib_seq_len, progress=not args.quiet)
            print(f"wrote {out}")
            return 0
        from slimserve.loaders.compress.run import REPORT_JSON, compress

        # With healing, the unhealed checkpoint is written beside OUT first and removed once healed.
        target = Path(args.out).with_name(Path(args.out).name + ".unhealed") if args.heal_steps else args.out
        out = compress(args.src, target, method=args.method, ratio=args.ratio, rank=args.rank, calib=args.calib,
                       calib_cache=args.calib_cache, allocation=args.allocation, budget=args.budget, seed=args.seed,
                       calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                       sequential=args.sequential, rank_share=args.rank_share, progress=not args.quiet)
        if args.heal_steps:
            from slimserve.loaders.heal import HealSettings, heal

            if args.calib is None:
                raise CompressionError("--heal-steps distils on the calibration text: give --calib FILE")
            settings = HealSettings(steps=args.heal_steps, lr=args.heal_lr, seq_len=args.heal_seq_len,
                                    batch=args.heal_batch, seed=args.seed)
            out = heal(target, args.out, teacher=args.src, text=args.calib, settings=settings,
                       progress=not args.quiet).path
            shutil.rmtree(target)
        print(f"wrote {out} (per-layer report: {out / REPORT_JSON})")
        return 0

    p.set_defaults(handler=run)


def _run_rsparse(args: argparse.Namespace) -> int:
    from slimserve.errors import CompressionError
    from slimserve.loaders.compress.rsparse import compress_rsparse
    from slimserve.loaders.compress.rsparse_search import SearchSettings

    if args.calib is None:
        raise CompressionError("--method rsparse calibrates its thresholds: give --calib FILE (plain text)")
    options = {}
    if args.search:
        options["settings"] = SearchSettings(population=args.population, generations=args.generations,
                                             group_size=args.group_size)
    out = compress_rsparse(args.src, args.out, sparsity=args.sparsity, calib=args.calib, alpha=args.alpha,
                           recipe=args.recipe, search=args.search, progress=not args.quiet,
                           log=(lambda _m: None) if args.quiet else print, **options)
    print(f"wrote {out}")
    return 0


def _add_heal(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("heal", help="distil the dense model into a compressed checkpoint's stored factors")
    p.add_argument("ckpt", help="slimserve checkpoint to heal")
    p.add_argument("out", help="output folder for the healed checkpoint (resumable state is saved beside it)")
    p.add_argument("--teacher", required=True, help="the dense HF model folder the checkpoint was compressed from")
    p.add_argument("--text", required=True, help="plain-text file to distil on (its last 10%% is held out)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window after BOS (default 256)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seed", type=int, default=0, help="training window sampling (default 0)")
    p.add_argument("--eval-every", type=int, default=50, help="print the held-out loss every N steps (default 50)")
    p.add_argument("--save-every", type=int, default=50, help="save the resumable state every N steps (default 50)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of a last-hidden-state MSE added to the logit KL (default 0: KL only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.heal-state.pt up to --steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from slimserve.loaders.heal import HealSettings, heal

        settings = HealSettings(steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch=args.batch, seed=args.seed,
                                eval_every=args.eval_every, save_every=args.save_every,
                                hidden_weight=args.hidden_weight)
        result = heal(args.ckpt, args.out, teacher=args.teacher, text=args.text, settings=settings,
                      resume=args.resume, progress=not args.quiet)
        print(f"wrote {result.path} (held-out KL {result.held_out[0][1]:.4f} -> {result.held_out[-1][1]:.4f}; "
              f"{result.held_out_written:.4f} as written)")
        return 0

    p.set_defaults(handler=run)


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a dense model or a slimserve checkpoint")
    kinds = p.add_subparsers(dest="eval_kind", required=True)
    ppl = kinds.add_parser("ppl", help="token perplexity on held-out text (not lm-eval word perplexity)")
    ppl.add_argument("model", help="dense HF model folder or slimserve checkpoint")
    ppl.add_argument("--text", required=True, help="held-out plain-text file")
    ppl.add_argument("--seq-len", type=int, default=512, help="tokens per window after BOS (default: 512)")
    ppl.add_argument("--windows", type=int, default=8, help="consecutive windows from the text's start (default: 8)")
    ppl.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        from slimserve.loaders.eval import perplexity

        result = perplexity(args.model, args.text, seq_len=args.seq_len, windows=args.windows)
        print(json.dumps(result.__dict__) if args.json else result.describe())
        return 0

    ppl.set_defaults(handler=run)

    chat = kinds.add_parser("chat", help="chat accuracy: greedy vLLM answers to a questions file, exact/numeric "
                                         "match, 95%% Wilson interval")
    chat.add_argument("model", help="dense HF instruct model folder or slimserve checkpoint (needs a chat template)")
    chat.add_argument("--questions", default=None,
                      help="questions file, JSON Lines (format in loaders/chat_eval.py; default: the shipped set)")
    chat.add_argument("--out", default=None, help="write the JSON report (every question, reply and mark) here")
    chat.add_argument("--max-tokens", type=int, default=24, help="tokens generated per answer (default: 24)")
    chat.add_argument("--dtype", default="float32", help="vLLM dtype (default: float32, the same on every CPU)")
    chat.add_argument("--limit", type=int, default=None, help="only the first N questions")

    def run_chat(args: argparse.Namespace) -> int:
        from slimserve.loaders.chat_eval import SHIPPED_QUESTIONS
        from slimserve.server.chat_eval import evaluate_chat

        result = evaluate_chat(args.model, args.questions or SHIPPED_QUESTIONS, out=args.out,
                               max_tokens=args.max_tokens, dtype=args.dtype, limit=args.limit)
        print(result.describe())
        if args.out:
            print(f"wrote {args.out}")
        return 0

    chat.set_defaults(handler=run_chat)


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert another project's compressed checkpoint")
    p.add_argument("--from", dest="source_format", required=True, choices=["rocket", "svd-llm", "lowrank-sparse", "nm",
                                                                        "compressed-tensors"])
    p.add_argument("src", help="ROCKET: its *_sep model folder; SVD-LLM: a state dict (.pt or .safetensors); nm: a "
                               "dense HF folder whose zeros follow N:M; compressed-tensors: a sparse-24-bitmask or "
                               "sparse-bitmask folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--base", help="SVD-LLM only: the original dense HF model folder (config, tokenizer)")
    p.add_argument("--pattern", help="nm only: N:M (N kept of every M inputs); default: detected per module")

    def run(args: argparse.Namespace) -> int:
        from slimserve.errors import CheckpointError
        from slimserve.loaders.converters import convert_lowrank_sparse, convert_rocket, convert_svdllm

        if args.pattern is not None and args.source_format != "nm":
            raise CheckpointError(f"--pattern is for --from nm, not --from {args.source_format}", field="--pattern")
        if args.source_format in ("nm", "compressed-tensors"):
            return _run_convert_nm(args)
        if args.source_format == "rocket":
            out = convert_rocket(args.src, args.out)
        else:
            if not args.base:
                raise CheckpointError(f"--base is required with --from {args.source_format}", field="--base",
                                      expected="the original dense HF model folder")
            out = (convert_lowrank_sparse if args.source_format == "lowrank-sparse" else convert_svdllm)(
                args.src, args.out, args.base)
        print(f"wrote {out}")
        return 0

    p.set_defaults(handler=run)


def _run_convert_nm(args: argparse.Namespace) -> int:
    """``--from nm`` / ``--from compressed-tensors``; nm also says which linears stayed dense."""
    from slimserve.loaders.checkpoint import open_checkpoint
    from slimserve.loaders.converters import convert_compressed_tensors, convert_nm

    if args.source_format == "compressed-tensors":
        print(f"wrote {convert_compressed_tensors(args.src, args.out)}")
        return 0
    out = convert_nm(args.src, args.out, args.pattern)
    producer = open_checkpoint(out).quantization_config["producer"]
    print(f"wrote {out}: nm modules by pattern {producer['modules_per_pattern']}; kept dense (no N:M pattern): "
          f"{', '.join(producer['dense_modules']) or 'none'}")
    return 0


def _add_densify(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("densify", help="write an ordinary dense HF checkpoint of the reconstructed weights")
    p.add_argument("ckpt")
    p.add_argument("out")

    def run(args: argparse.Namespace) -> int:
        from slimserve.loaders.checkpoint import densify

        print(f"wrote {densify(args.ckpt, args.out)}")
        return 0

    p.set_defaults(handler=run)


def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="check a slimserve checkpoint; exit 0 or print what is wrong")
    p.add_argument("ckpt")

    def run(args: argparse.Namespace) -> int:
        from slimserve.loaders.checkpoint import validate_checkpoint

        ckpt = validate_checkpoint(args.ckpt)
        print(f"{args.ckpt}: ok ({len(ckpt.modules)} modules)")
        return 0

    p.set_defaults(handler=run)


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="per-layer scheme, ranks, parameter and byte counts, overall ratio")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        from slimserve.loaders.checkpoint import compression_summary, human_bytes, open_checkpoint, summarize

        ckpt = open_checkpoint(args.ckpt)
        rows = summarize(ckpt)
        total = compression_summary(args.ckpt)
        if args.json:
            print(json.dumps({"modules": [r.__dict__ for r in rows], "total": total}, indent=1))
            return 0
        print(f"{'module':<44} {'scheme':<10} {'shape':<13} {'fields':<20} {'params':>10} {'kept':>6} {'bytes':>11} "
              f"{'kept':>6}")
        for r in rows:
            fields = " ".join(f"{k}={v}" for k, v in r.fields.items())
            shape = f"{r.shape[0]}x{r.shape[1]}"
            print(f"{r.name:<44} {r.scheme:<10} {shape:<13} {fields:<20} {r.stored_params:>10} "
                  f"{r.stored_params / r.dense_params:>6.1%} {human_bytes(r.stored_bytes):>11} "
                  f"{r.stored_bytes / r.dense_bytes:>6.1%}")
        print(f"decoder linears: {total['stored_params']:,} of {total['dense_params']:,} parameters kept; "
              f"compression ratio {total['ratio']:.1%} (parameters removed), {total['bytes_ratio']:.1%} of bytes "
              f"removed with indices counted ({human_bytes(total['stored_bytes'])} stored)")
        producer = (ckpt.quantization_config or {}).get("producer", {})
        if producer.get("ratio") is not None:
            # Checkpoints written before --budget existed counted parameters.
            print(f"produced by {producer.get('method')} --ratio {producer['ratio']} "
                  f"--budget {producer.get('budget', 'params')}")
        return 0

    p.set_defaults(handler=run)


SUBCOMMANDS = (_add_compress, _add_heal, _add_eval, _add_convert, _add_densify, _add_validate, _add_inspect)
