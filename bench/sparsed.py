"""SparseD attention vs unmasked fp32 SDPA, one layer and one whole diffusion-LM request, in the same run.

``layer``: one bidirectional layer at SmolLM2-135M's attention width (9 query heads, 3 key/value
heads, head_dim 64), prompt = length - 128 generated tokens, block 128. For each length:
unmasked SDPA, then per rho the kept density, tile selection (once per request and layer), the
plan build, and the steady-state sparse call of the engine's gathered kernel as a ratio to SDPA.
Up to ``--flex-up-to`` tokens it also times compiled FlexAttention on the same tiles (its first
call compiles, once per sequence length).

``crossover``: the gathered kernel at one length over kept densities (random tiles with the same
count per query block, as SparseD keeps), to place the dense fallback threshold.

``request``: one whole request through ``DiffusionLMEngine`` (4-layer SmolLM2-width bidirectional
Llama with random weights, 128 generated tokens, 64 steps, LLaDA blocks of 32, temperature 0),
dense vs SparseD, with the fraction of decoded tokens that agree.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sparsed.py layer --lengths 2048 4096 8192 12288
    OMP_NUM_THREADS=2 .venv/bin/python bench/sparsed.py crossover --lengths 4096
    OMP_NUM_THREADS=2 .venv/bin/python bench/sparsed.py request --lengths 4096 --rhos 0.2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe_machine  # bench/ is on sys.path when run as a script

from slimserve.attention.sparsed import (
    SparsedParams,
    gathered_attention,
    kept_block_rows,
    select_tiles,
    sparse_attention,
    tile_block_mask,
    tile_density,
)

HEADS, KV_HEADS, HEAD_DIM, GENERATED = 9, 3, 64, 128


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Mean wall time of ``fn`` after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def random_qkv(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    return tuple(torch.randn(1, heads, length, HEAD_DIM, generator=generator)  # type: ignore[return-value]
                 for heads in (HEADS, KV_HEADS, KV_HEADS))


def bench_layer(args: argparse.Namespace) -> None:
    print("| tokens | rho | kept density | SDPA ms | gathered ms | speed-up | flex ms (speed-up) | flex compile s "
          "| select ms | plan ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        q, k, v = random_qkv(length)
        dense = seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.repeats)
        for rho in args.rhos:
            keep, select = timed(lambda: select_tiles(q, k, length - GENERATED, SparsedParams(rho=rho,
                                                                                              block=args.block)))
            rows, plan = timed(lambda: kept_block_rows(keep, KV_HEADS))
            gathered = seconds(lambda: gathered_attention(q, k, v, rows, args.block), args.repeats)
            flex, compile_s = "-", "-"
            if length <= args.flex_up_to:
                mask = tile_block_mask(keep, args.block, length, eager=False)
                _, first = timed(lambda: sparse_attention(q, k, v, mask))
                flex_s = seconds(lambda: sparse_attention(q, k, v, mask), args.repeats)
                flex, compile_s = f"{flex_s * 1e3:.0f} ({dense / flex_s:.2f}x)", f"{first:.1f}"
            print(f"| {length} | {rho} | {tile_density(keep):.3f} | {dense * 1e3:.0f} | {gathered * 1e3:.0f} | "
                  f"{dense / gathered:.2f}x | {flex} | {compile_s} | {select * 1e3:.0f} | {plan * 1e3:.1f} |",
                  flush=True)


def bench_crossover(args: argparse.Namespace) -> None:
    print("| tokens | kept blocks per query block | kept density | SDPA ms | gathered ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        q, k, v = random_qkv(length)
        blocks = -(-length // args.block)
        dense = seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.repeats)
        generator = torch.Generator().manual_seed(1)
        for density in args.densities:
            kept = max(1, round(density * blocks))
            order = torch.rand(1, HEADS, blocks, blocks, generator=generator).argsort(-1)[..., :kept]
            keep = torch.zeros(1, HEADS, blocks, blocks, dtype=torch.bool).scatter_(-1, order, True)
            rows = kept_block_rows(keep, KV_HEADS)
            gathered = seconds(lambda: gathered_attention(q, k, v, rows, args.block), args.repeats)
            print(f"| {length} | {kept} | {kept / blocks:.3f} | {dense * 1e3:.0f} | {gathered * 1e3:.0f} | "
                  f"{dense / gathered:.2f}x |", flush=True)


def smollm2_width_engine(workdir: Path, layers: int) -> object:
    """A ``DiffusionLMEngine`` over a random-weight Llama with SmolLM2-135M's widths and ``layers`` layers."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimserve.server.engines.diffusion_lm import DiffusionLMEngine
    from slimserve.testing.models import train_tokenizer

    train_tokenizer(workdir)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|mdm_mask|>"]})
    tokenizer.eos_token = None  # random weights: never stop early, so every run does all its steps
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HEAD_DIM, max_position_embeddings=32768, tie_word_embeddings=True)
    return DiffusionLMEngine(LlamaForCausalLM(config), tokenizer, "bench",
                             mask_token_id=tokenizer.convert_tokens_to_ids("<|mdm_mask|>"), steps=None,
                             block_length=None)


def bench_request(args: argparse.Namespace) -> None:
    from slimserve.server.engines.base import TextRequest
    from slimserve.server.engines.diffusion_lm import DiffusionLMEngine
    from slimserve.testing.models import local_text

    recorded: dict[str, torch.Tensor] = {}
    original = DiffusionLMEngine._denoise_step

    def recording_step(self: DiffusionLMEngine, sequence: torch.Tensor, *rest: object) -> None:
        original(self, sequence, *rest)
        recorded["sequence"] = sequence

    DiffusionLMEngine._denoise_step = recording_step  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as workdir:
        engine = smollm2_width_engine(Path(workdir), args.layers)
    text = local_text()
    print("| prompt tokens | rho | dense s | SparseD s | speed-up | kept density | selection s | token agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        ids = engine.tokenizer(text * (1 + length // 200))["input_ids"][:length]  # type: ignore[attr-defined]
        prompt = engine.tokenizer.decode(ids)  # type: ignore[attr-defined]
        prompt_tokens = engine.count_tokens(prompt)  # type: ignore[attr-defined]

        def run(sparsed: SparsedParams | bool) -> tuple[torch.Tensor, float, object]:
            request = TextRequest(prompt=prompt, max_tokens=GENERATED, temperature=0.0, steps=args.steps,
                                  block_length=args.block_length, sparsed=sparsed)
            deltas, elapsed = timed(lambda: list(engine.generate_text(request,  # type: ignore[attr-defined]
                                                                      lambda done, total: None)))
            return recorded["sequence"][0, -GENERATED:].clone(), elapsed, deltas[-1].sparse_attention

        dense_tokens, dense_s, _ = run(False)
        for rho in args.rhos:
            tokens, sparse_s, stats = run(SparsedParams(rho=rho, block=args.block))
            agreement = float((tokens == dense_tokens).float().mean())
            print(f"| {prompt_tokens} | {rho} | {dense_s:.1f} | {sparse_s:.1f} | {dense_s / sparse_s:.2f}x | "
                  f"{stats.kept_density:.3f} | {stats.selection_seconds:.1f} | {agreement:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["layer", "crossover", "request"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flex-up-to", type=int, default=4096, help="compiled FlexAttention up to this length")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(describe_machine())
    {"layer": bench_layer, "crossover": bench_crossover, "request": bench_request}[args.mode](args)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
