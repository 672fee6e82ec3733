"""Sparse-vDiT on CPU: attention per pattern, a searched layer, a transformer step, PSNR.

Everything is timed against dense SDPA in the same run (fp32, compiled FlexAttention):

1. attention alone at a realistic video shape (default 8 frames x 1560 tokens) per pattern;
2. a random-weight Wan transformer at that shape: the search's chosen modes for its first
   step, the fused attention of those layers, and one full transformer forward;
3. a short denoising loop (flow-matching Euler) dense vs. scheduled: PSNR of final latents.

    python bench/vdit_attention.py            # about five minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimserve.attention.kernels import fused_attention, mode_attention
from slimserve.attention.patterns import Mode, PatternParams, VideoLayout, sparsity
from slimserve.plugin.diffusers import apply, search
from slimserve.testing.diffusers import tiny_transformer


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two warm-up calls (compile, mask build)."""
    with torch.no_grad():
        fn()
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(name: str, density: float, seconds: float, dense: float) -> str:
    return f"| {name} | {density:.1%} | {seconds * 1e3:.0f} | {dense / seconds:.2f}x |"


def attention_table(
    layout: VideoLayout, params: PatternParams, head_dims: list[int], heads: int, repeats: int
) -> list[str]:
    lines = ["| kernel | tiles computed | ms | vs dense SDPA |", "|---|---|---|---|"]
    total = -(-layout.seq_len // params.block_size)
    stripe = tuple(range(0, total, total // params.stripe_blocks))[: params.stripe_blocks]
    for dim in head_dims:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, layout.seq_len, dim, generator=g) for _ in range(3))
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
        lines.append(row(f"dense SDPA, d={dim}", 1.0, dense, dense))
        for mode in (Mode.DIAGONAL, Mode.MULTI_DIAGONAL, Mode.STRIPE):
            cols = (stripe,) * heads if mode is Mode.STRIPE else None
            density = 1 - sparsity(mode, layout, params, stripe if mode is Mode.STRIPE else None)
            seconds = timed(lambda: mode_attention(q, k, v, mode, layout, params, cols, "flex"), repeats)
            lines.append(row(f"flex {mode.name.lower()}, d={dim}", density, seconds, dense))
    return lines


def localize(model: torch.nn.Module, sharpness: float = 2.0) -> None:
    """Give a random-weight Wan the local attention trained video DiTs have.

    With random q/k projections every head attends almost uniformly, its output is near zero,
    and the search rightly skips every head. Tying ``to_k`` to ``to_q`` and sharpening the
    q/k norms makes each token attend mostly to itself and its RoPE neighbours, so the modes
    differ in error the way the paper's attention maps suggest.
    """
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn1
            attn.to_k.weight.copy_(attn.to_q.weight)
            attn.to_k.bias.copy_(attn.to_q.bias)
            attn.norm_q.weight.fill_(sharpness)
            attn.norm_k.weight.fill_(sharpness)


def euler(model, inputs: dict, steps: int) -> torch.Tensor:
    """A flow-matching Euler loop from t=1 to 0 (the sampler Wan uses, without shift)."""
    x = inputs["hidden_states"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([sigmas[i] * 1000.0])
            v = model(**{**inputs, "hidden_states": x, "timestep": t}).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x - ref).square().mean().item()
    peak = ref.abs().max().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=60, help="latent height (tokens: height/2 x width/2)")
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="denoising steps searched and compared")
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    layout = VideoLayout(args.frames, (args.height // 2) * (args.width // 2))
    params = PatternParams.for_layout(layout, args.block_size)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} layout={layout} {params}\n")
    print(f"### Attention alone: {layout.seq_len} tokens, {args.heads} heads, fp32\n")
    print("\n".join(attention_table(layout, params, args.head_dims, args.heads, args.repeats)))

    # A random-weight Wan transformer at the same token layout, 2 layers x 4 heads of 64.
    model = tiny_transformer("wan", num_attention_heads=4, attention_head_dim=64, ffn_dim=512, num_layers=2,
                             rope_max_seq_len=1024)
    localize(model)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 4, args.frames, args.height, args.width, generator=g),
        "encoder_hidden_states": torch.randn(1, 16, 16, generator=g),
    }
    sigmas = torch.linspace(1.0, 0.0, args.steps + 1)
    start = time.perf_counter()
    schedule = search(_Loop(model, inputs, args.steps), None, lam=args.lam, eps=args.eps,
                      block_size=args.block_size, backend="flex")
    print(f"\n### Search on a random-weight WanTransformer3DModel (2 layers x 4 heads, d=64), {args.steps} steps,"
          f" lambda={args.lam}, eps={args.eps} ({time.perf_counter() - start:.0f} s)\n")
    print("```\n" + schedule.report() + "\n```")
    for step in range(len(schedule.timesteps)):
        print(f"step {step}: " + " ".join("".join(m.char for m in layer) for layer in schedule.modes[step]))

    print("\n### Searched layers (step 0) and one transformer step\n")
    print("| what | tiles computed | ms | vs dense |", "|---|---|---|---|", sep="\n")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, layout.seq_len, 64, generator=g) for _ in range(3))
    dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
    for layer in range(schedule.num_layers):
        modes, stripes = schedule.modes_at(0, layer), schedule.stripes_at(0, layer)
        density = statistics.mean(1 - sparsity(m, layout, schedule.params, stripes.get(h)) for h, m in enumerate(modes))
        seconds = timed(lambda: fused_attention(q, k, v, modes, layout, schedule.params, stripes, "flex"), args.repeats)
        print(row(f"layer {layer} fused `{''.join(m.char for m in modes)}`", density, seconds, dense))
    step_inputs = {**inputs, "timestep": torch.tensor([sigmas[0] * 1000.0])}
    dense_step = timed(lambda: model(**step_inputs).sample, args.repeats)
    installed = apply(model, schedule, backend="flex")
    sparse_step = timed(lambda: model(**step_inputs).sample, args.repeats)
    layer_density = statistics.mean(
        1 - sparsity(m, layout, schedule.params, schedule.stripes.get((0, layer, h)))
        for layer in range(schedule.num_layers) for h, m in enumerate(schedule.modes_at(0, layer))
    )
    print(row("transformer step 0 (2 layers)", layer_density, sparse_step, dense_step))

    sparse_latents = euler(model, inputs, args.steps)
    installed.remove()
    dense_latents = euler(model, inputs, args.steps)
    print(f"\nPSNR of final latents vs dense ({args.steps} steps): {psnr(sparse_latents, dense_latents):.2f} dB")


class _Loop:
    """The denoising loop presented as one call on an object with ``.transformer``, as a
    pipeline is, so :func:`search` can hook the transformer and drive every step."""

    def __init__(self, model: torch.nn.Module, inputs: dict, steps: int) -> None:
        self.transformer, self.inputs, self.steps = model, inputs, steps

    def __call__(self) -> torch.Tensor:
        return euler(self.transformer, self.inputs, self.steps)


if __name__ == "__main__":
    main()
