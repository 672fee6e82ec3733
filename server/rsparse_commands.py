"""``slimserve rsparse-compress``: an R-Sparse checkpoint (calibrated thresholds, optional α search).

A subcommand of its own because R-Sparse is budgeted by sparsity (MACs removed per token),
not by parameters removed, and has its own search; ``slimserve compress --method rsparse
--ratio S`` runs the same library call with uniform α.
"""

from __future__ import annotations

import argparse

from slimserve.server.cli import subcommand


@subcommand
def _add_rsparse_compress(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rsparse-compress", help="R-Sparse: rank-aware activation sparsity for decode")
    p.add_argument("src", help="dense Hugging Face model folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of each linear's MACs removed (e.g. 0.5)")
    p.add_argument("--calib", required=True, help="calibration text file (thresholds; the search's fitness text)")
    p.add_argument("--alpha", type=float, default=0.95, help="uniform sparse share α without --search (default 0.95)")
    p.add_argument("--recipe", help="a saved rsparse_recipe.json with per-module α")
    p.add_argument("--search", action="store_true", help="search per-module α (group-wise differential evolution, "
                                                         "fitness = perplexity on --calib); saves rsparse_recipe.json")
    p.add_argument("--population", type=int, default=6, help="search population (default 6)")
    p.add_argument("--generations", type=int, default=2, help="search generations per group (default 2)")
    p.add_argument("--group-size", type=int, default=42, help="modules optimized together (default 42)")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    def run(args: argparse.Namespace) -> int:
        from slimserve.loaders.compress.rsparse import compress_rsparse
        from slimserve.loaders.compress.rsparse_search import SearchSettings

        options = {}
        if args.search:
            options["settings"] = SearchSettings(population=args.population, generations=args.generations,
                                                 group_size=args.group_size)
        out = compress_rsparse(args.src, args.out, sparsity=args.sparsity, calib=args.calib, alpha=args.alpha,
                               recipe=args.recipe, search=args.search, progress=not args.quiet,
                               log=(lambda _m: None) if args.quiet else print, **options)
        print(f"wrote {out}")
        return 0

    p.set_defaults(handler=run)
