"""One compressed layer as one operator call against its factors one call each, on SmolLM2's shapes.

Where the dense factors of compressed layers are plain bf16 rows (CPUs with AVX512_BF16 and no AMX),
a low-rank layer runs as ``LowRankRows`` and a bitmask dictsparse layer as ``DictionaryBitmaskRows``;
where a host serves float32 and keeps them as bf16 panels (AVX2 only), as ``LowRankPanels`` and
``DictionaryBitmaskPanels``: one call each. Before, ``SlimserveLinearMethod.apply`` ran the stacked
first factor and then, per shard, a slice, a copy, the second product and a store, each through the
dispatcher. This times both ways of the same products in one process (weights cache-resident, so the
difference is the calls, not the bytes) and checks that they agree bit for bit. Shapes: SmolLM2-135M's
q/k/v, gate/up and o with the low-rank ranks of its 30 %-of-bytes checkpoint; dictsparse with twice as
many atoms as rank, at 25 % density.

    OMP_NUM_THREADS=2 python bench/layer_calls.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from machine import describe_machine  # bench/ is on sys.path when run as a script

from slimserve.loaders.schemes import sparse_rows
from slimserve.plugin.kernels.bitmask import BitmaskMatmul, DictionaryBitmaskPanels, DictionaryBitmaskRows
from slimserve.plugin.kernels.gemm import Bf16PanelsLinear, Bf16RowsLinear, LowRankPanels, LowRankRows

Product = Callable[[torch.Tensor], torch.Tensor]
#: (layer, output width per shard, low-rank rank per shard); 576 inputs each
LAYERS = (("q/k/v", (576, 192, 192), (180, 60, 60)), ("gate/up", (1536, 1536), (260, 260)), ("o", (576,), (180,)))
IN_FEATURES = 576


def apart(first: Product, seconds: Sequence[Product], widths: Sequence[int], outs: Sequence[int]) -> Product:
    """The layer as ``SlimserveLinearMethod.apply`` ran it before: first factor, then each shard on its slice."""
    def run(x: torch.Tensor) -> torch.Tensor:
        z = first(x)
        y = torch.empty(x.shape[0], sum(outs), dtype=x.dtype)
        z0 = o0 = 0
        for second, width, out in zip(seconds, widths, outs):
            y[:, o0:o0 + out] = second(z[:, z0:z0 + width].contiguous())
            z0 += width
            o0 += out
        return y
    return run


def rows_ways(v: torch.Tensor, us: list[torch.Tensor], ranks: Sequence[int], dictionary: torch.Tensor,
              coefficients: list[BitmaskMatmul], atoms: Sequence[int],
              outs: Sequence[int]) -> dict[str, tuple[Product, Product]]:
    """Per scheme, (apart, one call) with the dense factors as plain bf16 rows (bf16 serving)."""
    return {"lowrank": (apart(Bf16RowsLinear(v), [Bf16RowsLinear(u) for u in us], ranks, outs), LowRankRows(v, us)),
            "dictsparse": (apart(Bf16RowsLinear(dictionary), coefficients, atoms, outs),
                           DictionaryBitmaskRows(dictionary, coefficients))}


def panels_ways(v: torch.Tensor, us: list[torch.Tensor], ranks: Sequence[int], dictionary: torch.Tensor,
                coefficients: list[BitmaskMatmul], atoms: Sequence[int],
                outs: Sequence[int]) -> dict[str, tuple[Product, Product]]:
    """Per scheme, (apart, one call) with the dense factors as bf16 panels (float32 serving)."""
    return {"lowrank": (apart(Bf16PanelsLinear(v), [Bf16PanelsLinear(u) for u in us], ranks, outs),
                        LowRankPanels(v.float(), [u.float() for u in us])),
            "dictsparse": (apart(Bf16PanelsLinear(dictionary), coefficients, atoms, outs),
                           DictionaryBitmaskPanels(dictionary.float(), coefficients))}


def microseconds(product: Product, x: torch.Tensor, calls: int, repeats: int) -> float:
    """Median µs a call over ``repeats`` rounds of ``calls`` calls, after one round of warm-up."""
    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(calls):
            product(x)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    probe = torch.zeros(8, IN_FEATURES, dtype=torch.bfloat16)
    if LowRankRows.usable(probe, [probe]) and DictionaryBitmaskRows.usable(probe, [probe]):
        dtype, ways_of = torch.bfloat16, rows_ways
    elif LowRankPanels.usable([probe.float()], [probe.float()]) and DictionaryBitmaskPanels.usable([probe.float()]):
        dtype, ways_of = torch.float32, panels_ways
    else:
        raise SystemExit("this host keeps dense factors on oneDNN (AMX, or no kernel build): no one-call layers here")
    print(describe_machine())
    print(f"\n{dtype} inputs, factors as {'plain bf16 rows' if dtype == torch.bfloat16 else 'bf16 panels'}")
    print("\n| layer | tokens | lowrank apart / one call µs | dictsparse apart / one call µs |\n|---|---|---|---|")
    for name, outs, ranks in LAYERS:
        us = [torch.randn(out, rank).bfloat16() for out, rank in zip(outs, ranks)]
        v = torch.randn(sum(ranks), IN_FEATURES).bfloat16()
        atoms = [2 * rank for rank in ranks]
        coefficients = []
        for out, k in zip(outs, atoms):
            values, mask = sparse_rows.dense_to_bitmask(torch.randn(out, k), k // 4)
            coefficients.append(BitmaskMatmul(values.bfloat16().to(dtype), mask, k))
        dictionary = torch.randn(sum(atoms), IN_FEATURES).bfloat16()
        ways = ways_of(v, us, ranks, dictionary, coefficients, atoms, outs)
        for tokens in args.tokens:
            x = torch.randn(tokens, IN_FEATURES).to(dtype)
            cells = []
            for scheme, (separate, one_call) in ways.items():
                if not torch.equal(separate(x), one_call(x)):
                    raise SystemExit(f"{scheme} {name}: the one-call layer differs from its factors one call each")
                before = microseconds(separate, x, args.calls, args.repeats)
                after = microseconds(one_call, x, args.calls, args.repeats)
                cells.append(f"{before:.1f} / {after:.1f} ({before / after:.2f}x)")
            print(f"| {name} | {tokens} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
