"""Sparse × dense product for row-sparse coefficients stored as BITMASK (packed values + bit mask).

``y[n, o] = Σ_{j set in mask[o]} z[n, j] · values[o, rank of j]``: each output row streams its s
packed values and ceil(k/8) mask bytes (the layout in ``loaders/schemes/sparse_rows.py``). On CPU
this is the compiled kernel ``bitmask_cpu.cpp`` (AVX-512 expand loads, AVX2 placement tables, or
scalar; float32 or bf16 values); elsewhere, or without a compiler, the PyTorch reference.

On CPUs with AMX, bf16 batches (2 tokens and more, prefill included) run on the tile unit: the kernel
expands 16 rows at a time into a dense strip in cache and multiplies it there (``amx_strips.h``); one
token expands 4 rows at a time in registers and dots them with ``vdpbf16ps``, faster there than the tile
unit. On CPUs with AVX512_BF16 and no tile unit (AMD Zen 4) bf16 steps below ``DENSE_FROM_TOKENS``,
one token included, expand rows in registers and dot them with 1, 4 or 8 tokens at a time by
``vdpbf16ps`` (``vector_rows.h``). AVX2
hosts multiply only what C stores while it is at most ``STORED_MAX_DENSITY`` full: from ``PANELS_FROM_TOKENS``
tokens each stored value against tokens packed in panels of 48 (``vector_rows.h``); denser C decodes rows in cache
and multiplies them by slimserve's
register-tiled GEMM (``tile_gemm``). Elsewhere many-token steps take the other road past ``DENSE_FROM_TOKENS``
tokens: strips of C (up to 4 MiB, at least 256 rows; bf16 where the CPU has bf16 dot products, else float32) are
decoded into one buffer that stays in cache and each is multiplied by ATen's GEMM, which past the measured
crossover (docs/methods/cpu_kernels.md) is faster than the batch loop; nothing dense is kept.

Registered as the operator ``slimserve::bitmask_matmul`` (``ops.py``) so torch.compile (vLLM's default on CPU)
treats it as one opaque call, with the token count known inside it.
"""

from __future__ import annotations

import torch

from slimserve.loaders.schemes.sparse_rows import bitmask_product
from slimserve.plugin.kernels.cpp import load_cpu_extension
from slimserve.plugin.kernels.gemm import (
    ROWS_GEMM_FROM_TOKENS,
    Bf16PanelsLinear,
    Bf16RowsLinear,
    bf16_panels_linear,
    shard_products,
    to_panels,
)
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.kernels.precision import stored_values

#: From this many tokens a call of a build without AVX2 panels decodes C in strips and runs dense GEMMs on them.
#: Measured with the AVX2 build on an AMD EPYC (fp32, 2 threads, [5632, 1547] at s = 773,
#: docs/methods/cpu_kernels.md): the batch loop wins through 96 tokens (16.2 against 17.7 ms), the strips from 128
#: (21.0 against 29.3). Where bf16 batches take the AMX tile unit it does not apply. On AMD Zen 4 (bf16 dot loop) the
#: loop wins below it and the two are level from it: [11264, 2048] at density 0.43, 64 tokens 9.4 against 11.0 ms,
#: 128 tokens 18.3 against 19.5, 500 tokens 79.7 against 76.0.
DENSE_FROM_TOKENS = 128
#: From this many tokens AVX2 builds run the loop over C's stored values on panels of 48 tokens instead of the batch
#: loop. AMD EPYC (Zen 3), 2 threads, bf16 values, density 0.43, [5632, 2048], fastest of seven interleaved calls, ms
#: panels / batch loop (vLLM's float32 oneDNN GEMM): 16 tokens 5.69 / 5.13 (4.96), 24 tokens 6.92 / 8.96 (6.66),
#: 32 tokens 5.94 / 7.80 (6.55), 48 tokens 6.29 / 9.40 (9.16).
PANELS_FROM_TOKENS = 24
#: AVX2 builds multiply only C's stored values while C is at most this full; denser C takes the strips, whose
#: register-tiled GEMM (``tile_gemm`` in vector_rows.h) multiplies the zeros too but runs near the FMA units' peak.
#: Same host and measure, ms panels / strips (dense) on [5632, 2048]: density 0.5, 64 tokens 9.03 / 10.95 (12.44),
#: 512 tokens 55.1 / 68.0 (75.9); density 0.64 (SparseGPT at 30 % bytes) 10.4 / 10.7 (10.5) at 64, 36.9 / 35.8 (40.0)
#: at 256, 80.6 / 75.3 (86.6) at 512; density 0.74, 99.2 / 79.1 (90.5) at 512. (Rows two at a time over the union of
#: their columns, one load of x for two FMAs, lost to the panels at every density up to 0.5 and count from 64 to 512
#: tokens once these wrote y without a transposed copy, and went.)
STORED_MAX_DENSITY = 0.5


def _cpu_kernel():
    return load_cpu_extension("slimserve_bitmask_cpu", "bitmask_cpu.cpp")


def _bitmask_matmul_shape(z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return z.new_empty(z.shape[0], values.shape[0])


@register_op("bitmask_matmul", fake=_bitmask_matmul_shape)
def bitmask_matmul(z: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``z [N, k] · Cᵀ`` for C given as ``values [out, s]`` + ``mask [out, ceil(k/8)]``; ``[N, out]`` in z's dtype."""
    ext = _cpu_kernel() if z.device.type == "cpu" else None
    if ext is None:
        return bitmask_product(z, values, mask)
    on_tile_unit = z.dtype == values.dtype == torch.bfloat16 and ext.amx_usable()
    if ext.isa() == "avx2" and z.shape[0] >= PANELS_FROM_TOKENS:
        if values.shape[1] > STORED_MAX_DENSITY * z.shape[1]:
            return ext.bitmask_matmul_strips(z, values, mask).to(z.dtype)
        return ext.bitmask_matmul_kept(z, values, mask).to(z.dtype)
    if z.shape[0] >= DENSE_FROM_TOKENS and not on_tile_unit:
        return ext.bitmask_matmul_strips(z, values, mask).to(z.dtype)
    return ext.bitmask_matmul(z, values, mask).to(z.dtype)


class BitmaskMatmul:
    """``y = z · Cᵀ`` for ``C [out, k]`` stored as packed values + bit mask, prepared once at load."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, atoms: int) -> None:
        # Build (or load) the kernel now, at model load, not inside the first traced forward.
        self.ext = _cpu_kernel() if values.device.type == "cpu" else None
        self.values = stored_values(values.contiguous(), self.ext.isa() if self.ext is not None else None)
        self.mask = mask.contiguous()
        self.atoms = atoms

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.bitmask_matmul(z, self.values, self.mask)


def _dictionary_layer_shape(x: torch.Tensor, dictionary: torch.Tensor, values: list[torch.Tensor],
                            masks: list[torch.Tensor], atoms: list[int]) -> torch.Tensor:
    """The output of both one-call dictsparse operators (the dictionary as rows, or as panels)."""
    return x.new_empty(x.shape[0], sum(v.shape[0] for v in values))


@register_op("bitmask_matmul_dictionary", fake=_dictionary_layer_shape)
def bitmask_matmul_dictionary(x: torch.Tensor, dictionary: torch.Tensor, values: list[torch.Tensor],
                              masks: list[torch.Tensor], atoms: list[int]) -> torch.Tensor:
    """``(x Dᵀ) Cᵢᵀ`` per shard into its columns, ``[N, Σ outs]`` bf16: D ``[Σ atoms, in]`` plain bf16 rows (a fused
    layer's stacked), shard i's C a bitmask (``values[i]``, ``masks[i]``) over its ``atoms[i]`` atoms, in order."""
    ext = _cpu_kernel()
    if x.shape[0] < min(ROWS_GEMM_FROM_TOKENS, DENSE_FROM_TOKENS):
        return ext.bitmask_matmul_dictionary(x, dictionary, values, masks, atoms)
    return shard_products(torch.mm(x, dictionary.t()), atoms,
                          lambda i, part: bitmask_matmul(part.contiguous(), values[i], masks[i]))


class DictionaryBitmaskRows:
    """``f(x) = [C₁ (x D₁ᵀ) | C₂ (x D₂ᵀ) | …]`` on one ``bitmask_matmul_dictionary`` call: a dictsparse layer's
    dictionaries as plain bf16 rows (where ``Bf16RowsLinear`` takes them) and its coefficients as bitmasks, so a
    fused layer crosses the dispatcher once, as ``LowRankRows`` does for a low-rank one. AMD EPYC (Zen 4), 2
    threads, SmolLM2's shapes (576 inputs) with 2 x rank atoms at 25 % density, cache-resident, µs apart / one call
    (bench/layer_calls.py): q/k/v 75.6 / 25.1 at one token and 114.1 / 52.3 at 8, gate/up 103.8 / 64.3 and 203.0 /
    149.5, o 33.2 / 18.0 and 52.1 / 39.6; on the benchmark Llama's large layers it moved within the VM's spread."""

    def __init__(self, dictionary: torch.Tensor, coefficients: list[BitmaskMatmul]) -> None:
        """Keeps ``dictionary`` and the coefficients' tensors as given: the caller hands over tensors no one else
        holds."""
        self.dictionary = dictionary.contiguous()
        self.values = [c.values for c in coefficients]
        self.masks = [c.mask for c in coefficients]
        self.atoms = [c.atoms for c in coefficients]
        self.out_features = sum(v.shape[0] for v in self.values)

    @staticmethod
    def usable(dictionary: torch.Tensor, coefficient_values: list[torch.Tensor]) -> bool:
        """Where ``Bf16RowsLinear`` takes the dictionary and every shard's C has bf16 values on a build with the
        fused call: asked of the loaded tensors, before any copy is made for the layer."""
        if not (Bf16RowsLinear.usable(dictionary)
                and all(v.dtype == torch.bfloat16 and v.device == dictionary.device for v in coefficient_values)):
            return False
        return hasattr(_cpu_kernel(), "bitmask_matmul_dictionary")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.bitmask_matmul_dictionary(x, self.dictionary, self.values, self.masks, self.atoms)


@register_op("dictionary_bitmask_panels", fake=_dictionary_layer_shape)
def dictionary_bitmask_panels(x: torch.Tensor, dictionary_panels: torch.Tensor, values: list[torch.Tensor],
                              masks: list[torch.Tensor], atoms: list[int]) -> torch.Tensor:
    """``(x Dᵀ) Cᵢᵀ`` per shard into its columns, ``[N, Σ outs]`` float32, for float32 x: D kept as bf16 panels
    (``to_panels``; a fused layer's stacked), shard i's C a bitmask (``values[i]``, ``masks[i]``) over its
    ``atoms[i]`` atoms, in order. Steps that ``bitmask_matmul`` runs on its few-token loops take them for every shard
    in one extension call; longer steps take ``bitmask_matmul``'s roads shard by shard."""
    z = bf16_panels_linear(x, dictionary_panels, sum(atoms))
    ext = _cpu_kernel()
    if ext is not None and x.shape[0] < min(PANELS_FROM_TOKENS, DENSE_FROM_TOKENS):
        return ext.bitmask_matmul_shards(z, values, masks, atoms)
    return shard_products(z, atoms, lambda i, part: bitmask_matmul(part.contiguous(), values[i], masks[i]))


class DictionaryBitmaskPanels:
    """``f(x) = [C₁ (x D₁ᵀ) | C₂ (x D₂ᵀ) | …]`` on one ``dictionary_bitmask_panels`` call, for a host that serves
    float32 and keeps the dictionaries as bf16 panels (AVX2): the float32 counterpart of ``DictionaryBitmaskRows``.
    Apart, a fused q/k/v crossed the dispatcher 14 times a step (D, the output, and per shard a slice, a copy, C's
    product and a store)."""

    def __init__(self, dictionary: torch.Tensor, coefficients: list[BitmaskMatmul]) -> None:
        """``dictionary`` (a fused layer's stacked) float32 with values bf16 holds (``usable``); the coefficients'
        tensors are kept as given: the caller hands over tensors no one else holds."""
        self.dictionary_panels = to_panels(dictionary.to(torch.bfloat16))
        self.values = [c.values for c in coefficients]
        self.masks = [c.mask for c in coefficients]
        self.atoms = [c.atoms for c in coefficients]
        self.out_features = sum(v.shape[0] for v in self.values)

    @staticmethod
    def usable(dictionaries: list[torch.Tensor]) -> bool:
        """Where ``Bf16PanelsLinear`` takes every shard's dictionary and the kernel build has the shards call."""
        if not all(Bf16PanelsLinear.usable(d) for d in dictionaries):
            return False
        return hasattr(_cpu_kernel(), "bitmask_matmul_shards")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.dictionary_bitmask_panels(x, self.dictionary_panels, self.values, self.masks,
                                                             self.atoms)
