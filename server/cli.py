"""The ``slimserve`` command line.

Every subcommand is a thin function over a library call that tests use directly
(``../shared/ARCHITECTURE.md``). Each subcommand is declared by one ``_add_<name>``
function below and listed in ``SUBCOMMANDS``; library imports happen inside the handlers
so that ``slimserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(add: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
    """Register an ``_add_<name>`` function that declares one subcommand."""
    SUBCOMMANDS.append(add)
    return add


def build_parser() -> argparse.ArgumentParser:
    # Modules that declare subcommands register them on import.
    from slimserve.server import checkpoint_commands  # noqa: F401

    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimserve`` console script; returns the process exit code."""
    from slimserve.loaders.errors import SlimserveError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SlimserveError as err:
        print(f"slimserve {args.command}: error: {err}", file=sys.stderr)
        return 2


# ---- subcommands -------------------------------------------------------------------------
# Add a subcommand by writing an ``@subcommand``-decorated ``_add_<name>`` below.


@subcommand
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


if __name__ == "__main__":
    sys.exit(main())
