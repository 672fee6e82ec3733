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


if __name__ == "__main__":
    sys.exit(main())
