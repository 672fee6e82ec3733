"""The optional CUDA backends on one GPU, each against its dense counterpart in the same run.

1. ``nm``: 2:4 bf16 weights on the sparse tensor cores (``NMMatmul``) against the dense weight's
   ``F.linear`` (cuBLAS), at the linear shapes of a 7B and a 70B Llama, from decode to prefill;
2. R-Sparse: the triton kernel (``segmented_sparse_mm``, gate | up sharing x, about half the
   input channels active) against the dense product, at decode;
3. Sparse-vDiT: each pattern through compiled FlexAttention against dense SDPA (flash) at Wan
   2.1's 480p shape (21 latent frames of 1560 tokens, 12 heads of 128);
4. SparseD: kept tiles through compiled FlexAttention and the gathered kernel against dense SDPA
   at LLaDA-8B's width (32 heads of 128).

Times are triton's ``do_bench`` medians (L2 flushed between calls), bf16 throughout.

    python bench/cuda_backends.py           # a few minutes on one H200, most of it compiling
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from slimserve.attention.kernels import mode_attention
from slimserve.attention.patterns import Mode, PatternParams, VideoLayout, sparsity
from slimserve.attention.sparsed import (
    SparsedParams,
    gathered_attention,
    kept_block_rows,
    select_tiles,
    sparse_attention,
    tile_block_mask,
    tile_density,
)
from slimserve.loaders.schemes.nm import nm_mask, pack_nm
from slimserve.plugin.kernels import rsparse
from slimserve.plugin.kernels.nm import NMMatmul
from slimserve.plugin.kernels.rsparse import TritonBlocks, masked_segments, segmented_sparse_mm

#: (model, projection, out, in) for the linear layers timed: a Llama-2-7B and a Llama-3-70B layer.
LINEAR_SHAPES = [
    ("7B", "q_proj", 4096, 4096), ("7B", "gate_up_proj", 22016, 4096), ("7B", "down_proj", 4096, 11008),
    ("70B", "q_proj", 8192, 8192), ("70B", "gate_up_proj", 57344, 8192), ("70B", "down_proj", 8192, 28672),
]


#: R-Sparse triton tiles swept (inputs x out x steps per program); the first is the kernel's default.
TILES = [TritonBlocks(), TritonBlocks(32, 128, 1), TritonBlocks(32, 64, 8), TritonBlocks(64, 64, 4),
         TritonBlocks(32, 256, 4), TritonBlocks(16, 128, 16), TritonBlocks(64, 128, 8)]


def milliseconds(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def nm_table(tokens: list[int]) -> None:
    """``F.linear`` on the 2:4 tensor, as ``NMMatmul`` runs it.

    PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only, so on Hopper cuSPARSELt is the one backend.
    """
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    print("\n### 2:4 weights on the sparse tensor cores vs dense cuBLAS (bf16)\n")
    print("| layer | shape | tokens | dense ms | 2:4 ms | speed-up | rel. error |")
    print("|---|---|---|---|---|---|---|")
    chosen: set[str] = set()
    for model, name, out_features, in_features in LINEAR_SHAPES:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        weight *= nm_mask(weight, 2, 4)
        tensors = pack_nm(weight, 2, 4)
        chosen.add(type(NMMatmul(tensors["values"], tensors["positions"], 2, 4).tensor_cores).__name__)
        del tensors
        cusparselt = SparseSemiStructuredTensorCUSPARSELT.from_dense(weight)
        for count in tokens:
            x = torch.randn(count, in_features, device="cuda", dtype=torch.bfloat16)
            dense = milliseconds(lambda: F.linear(x, weight))
            sparse = milliseconds(lambda: F.linear(x, cusparselt))
            error = relative_error(F.linear(x, cusparselt), F.linear(x, weight))
            print(f"| {model} {name} | {out_features}x{in_features} | {count} | {dense:.3f} | {sparse:.3f} | "
                  f"{dense / sparse:.2f}x | {error:.1e} |", flush=True)
    print(f"\nNMMatmul built {', '.join(sorted(chosen))}")


def rsparse_table(tokens: list[int]) -> None:
    print("\n### R-Sparse triton kernel vs the dense product (bf16, gate | up of a 7B layer, ~50 % channels)\n")
    print("| tokens | tile (inputs x out x steps) | dense ms | triton ms | speed-up | active channels |")
    print("|---|---|---|---|---|---|")
    in_features, splits = 4096, [11008, 11008]
    weight_t = torch.randn(in_features, sum(splits), device="cuda", dtype=torch.bfloat16) / in_features**0.5
    norms = torch.stack([w.float().norm(dim=1) for w in weight_t.split(splits, dim=1)])
    default = rsparse.TRITON_BLOCKS
    for count in tokens:
        x = torch.randn(count, in_features, device="cuda", dtype=torch.bfloat16)
        thresholds = [float((x.float().abs() * n).median()) for n in norms]
        active = float(((x.float().abs() * norms[0]) > thresholds[0]).float().mean())
        dense = milliseconds(lambda: x @ weight_t)
        expected, _ = masked_segments(x, weight_t, norms, thresholds, splits)
        for blocks in TILES:
            rsparse.TRITON_BLOCKS = blocks
            y, _ = segmented_sparse_mm(x, weight_t, norms, thresholds, splits)
            assert relative_error(y, expected) < 1e-2, blocks
            sparse = milliseconds(lambda: segmented_sparse_mm(x, weight_t, norms, thresholds, splits))
            print(f"| {count} | {blocks.inputs}x{blocks.out}x{blocks.steps} | {dense:.3f} | {sparse:.3f} | "
                  f"{dense / sparse:.2f}x | {active:.0%} |", flush=True)
    rsparse.TRITON_BLOCKS = default


def vdit_table() -> None:
    layout = VideoLayout(21, 1560)
    params = PatternParams.for_layout(layout, block_size=128)
    print(f"\n### Sparse-vDiT patterns, compiled FlexAttention vs dense SDPA ({layout.seq_len} tokens, 12x128, bf16)\n")
    print("| kernel | tiles computed | ms | speed-up | rel. error vs masked SDPA |")
    print("|---|---|---|---|---|")
    q, k, v = (torch.randn(1, 12, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = milliseconds(lambda: F.scaled_dot_product_attention(q, k, v))
    print(f"| dense SDPA | 100% | {dense:.2f} | 1.00x | - |")
    total = -(-layout.seq_len // params.block_size)
    stripe = tuple(range(0, total, total // params.stripe_blocks))[: params.stripe_blocks]
    for mode in (Mode.DIAGONAL, Mode.MULTI_DIAGONAL, Mode.STRIPE):
        cols = (stripe,) * 12 if mode is Mode.STRIPE else None
        density = 1 - sparsity(mode, layout, params, stripe if mode is Mode.STRIPE else None)
        with torch.no_grad():
            seconds = milliseconds(lambda: mode_attention(q, k, v, mode, layout, params, cols, "flex"))
            error = relative_error(mode_attention(q, k, v, mode, layout, params, cols, "flex"),
                                   mode_attention(q, k, v, mode, layout, params, cols, "sdpa"))
        print(f"| flex {mode.name.lower()} | {density:.1%} | {seconds:.2f} | {dense / seconds:.2f}x | {error:.1e} |",
              flush=True)


def sparsed_table(lengths: list[int], rhos: list[float]) -> None:
    heads, block = 32, 128
    print(f"\n### SparseD kept tiles vs dense SDPA ({heads}x128 heads, block {block}, bf16)\n")
    print("| tokens | rho | kept density | SDPA ms | flex ms | speed-up | gathered ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for length in lengths:
        q, k, v = (torch.randn(1, heads, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dense = milliseconds(lambda: F.scaled_dot_product_attention(q, k, v))
        for rho in rhos:
            keep = select_tiles(q, k, length - 256, SparsedParams(rho=rho, block=block))
            mask = tile_block_mask(keep, block, length, eager=False)
            rows = kept_block_rows(keep, heads)
            with torch.no_grad():
                flex = milliseconds(lambda: sparse_attention(q, k, v, mask))
                gathered = milliseconds(lambda: gathered_attention(q, k, v, rows, block))
            print(f"| {length} | {rho} | {tile_density(keep):.3f} | {dense:.2f} | {flex:.2f} | {dense / flex:.2f}x | "
                  f"{gathered:.2f} | {dense / gathered:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["nm", "rsparse", "vdit", "sparsed"],
                        choices=["nm", "rsparse", "vdit", "sparsed"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.3])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
          f"2:4 through {'cuSPARSELt' if torch.backends.cusparselt.is_available() else 'CUTLASS'}")
    if "nm" in args.parts:
        nm_table(args.tokens)
    if "rsparse" in args.parts:
        rsparse_table([t for t in args.tokens if t <= 16])
    if "vdit" in args.parts:
        vdit_table()
    if "sparsed" in args.parts:
        sparsed_table(args.lengths, args.rhos)


if __name__ == "__main__":
    main()
