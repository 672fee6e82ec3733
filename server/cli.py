"""The ``slimserve`` command line.

Every subcommand is a thin function over a library call that tests use directly. A module
that declares subcommands (this one: ``serve``, ``vdit-search``; ``checkpoint_commands``;
``demo``) lists them in its ``SUBCOMMANDS`` tuple of ``_add_<name>`` functions, and
``build_parser`` adds them in that order; the command modules never import this one, so
there is no import cycle. Library imports happen inside the handlers so that
``slimserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from slimserve.server import checkpoint_commands, demo

if TYPE_CHECKING:
    from slimserve.plugin.vllm.sirius_settings import SiriusSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (*SUBCOMMANDS, *checkpoint_commands.SUBCOMMANDS, *demo.SUBCOMMANDS):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimserve`` console script; returns the process exit code."""
    from slimserve.errors import SlimserveError

    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" goes to the engine unchanged, split off before argparse sees it:
    # argparse drops a "--" that directly follows a positional, so `serve MODEL -- --headless` (the
    # multi-node worker's form) lost its separator and then refused vLLM's flags as unknown.
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    args.engine_args = argv[split + 1:]
    if split < len(argv) and args.command != "serve":
        parser.error(f"`slimserve {args.command}` takes no engine arguments after --")
    try:
        return int(args.handler(args) or 0)
    except SlimserveError as err:
        print(f"slimserve {args.command}: error: {err}", file=sys.stderr)
        return 2


# ---- subcommands -------------------------------------------------------------------------
# Add a subcommand by writing an ``_add_<name>`` below and listing it in ``SUBCOMMANDS``.


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from slimserve.server.config import (
        ALL_INTERFACES,
        API_KEY_ENV,
        LOOPBACK,
        add_limit_flags,
        config_from_flags,
        default_host,
        resolve_api_key,
    )

    parser = subparsers.add_parser(
        "serve", help="serve a model folder over an OpenAI-compatible HTTP API",
        description="Causal LMs run on vLLM's OpenAI server (arguments after -- go to vLLM, e.g. "
                    "-- --dtype float32); diffusers pipelines and diffusion LMs run on slimserve's FastAPI app.")
    parser.add_argument("model", help="model folder")
    parser.add_argument("--host", default=None,
                        help=f"listen address (default {LOOPBACK}; {ALL_INTERFACES} when an API key is set)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes; visible to every local user in "
                             f"the process list, so prefer ${API_KEY_ENV} or --api-key-file")
    parser.add_argument("--api-key-file", default=None,
                        help=f"file holding the API key (a mounted secret); else ${API_KEY_ENV} is read")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: folder name)")
    add_limit_flags(parser)  # slimserve's app only; vLLM's limits are its own flags after --
    parser.add_argument("--kv-cache-gib", type=int, default=None,
                        help="vLLM's KV cache on CPU, in GiB (sets VLLM_CPU_KVCACHE_SPACE; default 4)")
    parser.add_argument("--no-cpu-tuning", dest="tune_cpu", action="store_false", default=None,
                        help="keep vLLM's CPU defaults instead of choosing dtype by ISA, thread binding and "
                             "LD_PRELOAD (Intel OpenMP, tcmalloc) for this host")
    parser.add_argument("--sirius-period", type=int, default=None,
                        help="turn on Sirius (causal LMs): the full model checks the sparse drafts every K tokens "
                             "(default 16 when another --sirius option is given)")
    parser.add_argument("--sirius-threshold", type=float, default=None,
                        help="Sirius keeps a draft token the full model gives probability >= T (default 0.1)")
    parser.add_argument("--sirius-lossless", action="store_true", default=None,
                        help="Sirius keeps only drafts equal to the full model's greedy token (exact output)")
    parser.add_argument("--sirius-sparse", default=None, metavar="cats:S",
                        help="Sirius drafts with CATS-style MLP activation sparsity S on any checkpoint "
                             "(default: the checkpoint's R-Sparse layers)")

    def handler(args: argparse.Namespace) -> int:
        from slimserve.server.launch import serve

        api_key = args.api_key or resolve_api_key(args.api_key_file)
        return serve(args.model, served_model_name=args.served_model_name, host=default_host(args.host, api_key),
                     port=args.port, config=config_from_flags(args, api_key), extra_args=args.engine_args,
                     sirius=sirius_settings(args), kv_cache_gib=args.kv_cache_gib,
                     tune_cpu=args.tune_cpu is not False)

    parser.set_defaults(handler=handler)


def sirius_settings(args: argparse.Namespace) -> SiriusSettings | None:
    """Sirius's settings from the serve options, or None when no ``--sirius-*`` option was given."""
    from slimserve.plugin.vllm.sirius_settings import DEFAULT_PERIOD, DEFAULT_THRESHOLD, SiriusSettings

    if (args.sirius_period is None and args.sirius_threshold is None and not args.sirius_lossless
            and args.sirius_sparse is None):
        return None
    return SiriusSettings(period=args.sirius_period or DEFAULT_PERIOD,
                          threshold=DEFAULT_THRESHOLD if args.sirius_threshold is None else args.sirius_threshold,
                          lossless=bool(args.sirius_lossless), sparse=args.sirius_sparse)


def _add_vdit_search(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "vdit-search", help="search a Sparse-vDiT attention schedule for a diffusers video pipeline",
        description="Runs the pipeline once on calibration prompts, picks one attention mode per "
                    "(step, layer, head), saves sparse_vdit_schedule.json next to the model and prints "
                    "the mode histogram per layer and the theoretical attention-FLOP reduction.")
    parser.add_argument("model", help="diffusers pipeline folder (Wan, HunyuanVideo or CogVideoX)")
    parser.add_argument("--prompt", action="append", required=True, help="calibration prompt (repeatable)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the density cost")
    parser.add_argument("--epsilon", type=float, default=1.0, help="keep full attention when every cost exceeds this")
    parser.add_argument("--block-size", type=int, default=128, help="attention tile size")
    parser.add_argument("--backend", default="auto", help="auto, flex, flex_eager, sdpa or xformers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="schedule file or folder (default: the model folder)")

    def handler(args: argparse.Namespace) -> int:
        from slimserve.plugin.diffusers.runtime import search_folder

        sizes = {"num_frames": args.num_frames, "height": args.height, "width": args.width,
                 "guidance_scale": args.guidance_scale}
        schedule, path = search_folder(
            args.model, args.prompt, out=args.out, seed=args.seed, lam=args.lam, eps=args.epsilon,
            block_size=args.block_size, backend=args.backend, num_inference_steps=args.steps,
            **{k: v for k, v in sizes.items() if v is not None},
        )
        print(schedule.report())
        print(f"wrote {path}")
        return 0

    parser.set_defaults(handler=handler)


SUBCOMMANDS = (_add_serve, _add_vdit_search)


if __name__ == "__main__":
    sys.exit(main())
