"""vLLM runner of ``rsparse`` shards: dense prefill on the prepacked GEMM, R-Sparse decode.

R-Sparse needs the layer input itself (the mask is a per-token test on ``x``), so this runner
has no first factor: linear.py hands it ``x`` directly (``first_factor = None``).

Serving mode (default): prompt tokens (prefill) run the dense W through ``prepacked_linear``, the
prepacked oneDNN GEMM vLLM's own dense layers use (or, on a host that serves a bf16 checkpoint as
float32, W kept in bf16 on slimserve's tiled strips, within about 10 % of that GEMM); decode tokens
(of requests whose query length in the step is 1) run R-Sparse with the kernel that reads only
active weight rows; the shards of a fused layer (q | k | v, gate | up) run side by side in one kernel call. A step that
mixes a new prompt with running decodes computes its decode rows sparse as well, so every
token gets the same treatment whatever vLLM batches it with. Prefill is compute-bound, where skipping rows buys little
and the paper's accuracy protocol keeps the prompt dense; decode is memory-bound, where it
pays. Setting ``SLIMSERVE_RSPARSE_SPARSE_PREFILL=1`` in the server's environment makes every
token sparse (the accuracy "every token" protocol); steps of more than ``KERNEL_MAX_TOKENS``
tokens then multiply each shard's masked input by its Wᵀ in a plain matmul, since their union
of active channels is nearly all of them.

Token kinds come from vLLM's forward context (the attention metadata's ``max_query_len`` and
``query_start_loc``), not from the token count: a decode step of 8 requests has 8 tokens.

Memory: W is held twice, packed for prefill and column-major (``weight_t``) for decode. On a host that
serves a bf16 checkpoint as float32 (AVX2) the prefill copy stays bf16 (``prepacked_linear``), a quarter of
the two copies' float32 bytes saved.

The whole forward is the operator ``slimserve::rsparse_linear`` (``plugin/kernels/ops.py``): under vLLM's default
torch.compile mode a traced Python branch on the step's token kinds would be frozen at
trace time, and the C++ kernel cannot be traced at all, so the op is opaque to the compiler
and decides per step at run time. The op finds its layer by name in vLLM's forward context
(``no_compile_layers``, which is the compilation config's ``static_forward_context``, where
vLLM's own attention layers live), so the layers belong to their engine and go with it.

Modes: ``serving`` (above), ``dense`` (every token dense) and ``sparse`` (every token sparse).
Sirius sets ``dense`` on every layer when it loads, and ``sparse`` only while its drafter runs
(``set_mode``): a verification pass is dense even for a request that had no drafts in that
step, which token-kind detection would take for a decode.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from slimserve.plugin.kernels.gemm import prepacked_linear
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.kernels.rsparse import cpu_extension, low_rank_operands, masked_segments, segmented_sparse_mm

SPARSE_PREFILL_ENV = "SLIMSERVE_RSPARSE_SPARSE_PREFILL"
# Above this many tokens the union of active channels covers nearly every row (each token
# keeps about half), so streaming rows one by one loses to the packed dense GEMM.
KERNEL_MAX_TOKENS = 16
# Name prefix of R-Sparse layers in vLLM's static forward context (attention layers use their module path).
CONTEXT_PREFIX = "slimserve_rsparse."
_ROWS_KEY = "slimserve_rsparse_decode_rows"

Mode = Literal["serving", "dense", "sparse"]


def decode_rows() -> torch.Tensor | bool:
    """Which tokens of the current vLLM step are decode tokens (their request's query length is 1).

    ``True``: all of them (a pure decode step); ``False``: none (prefill steps, and vLLM's
    profiling and warm-up runs, which have no attention metadata); otherwise the row indices
    of the decode tokens in a step that mixes them with (chunked) prefill. Computed once per
    step from the attention metadata's ``max_query_len`` and ``query_start_loc`` and kept in
    the step's forward context (``additional_kwargs``, which vLLM creates fresh for every
    forward), so every layer of that step reuses it.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return False
    context = get_forward_context()
    if _ROWS_KEY in context.additional_kwargs:
        return context.additional_kwargs[_ROWS_KEY]
    meta = context.attn_metadata
    if isinstance(meta, list):
        meta = meta[0] if meta else None
    if isinstance(meta, dict):
        meta = next(iter(meta.values()), None)
    rows: torch.Tensor | bool = False
    if meta is not None and getattr(meta, "max_query_len", 0) == 1:
        rows = True
    elif meta is not None and getattr(meta, "query_start_loc", None) is not None:
        starts = meta.query_start_loc.cpu()
        single = (starts[1:] - starts[:-1]) == 1
        if single.any():
            rows = starts[:-1][single].long()
    context.additional_kwargs[_ROWS_KEY] = rows
    return rows


def _rsparse_linear_shape(x: torch.Tensor, layer: str, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@register_op("rsparse_linear", fake=_rsparse_linear_shape)
def rsparse_linear(x: torch.Tensor, layer: str, out_features: int) -> torch.Tensor:
    """The R-Sparse layer named ``layer`` in vLLM's forward context applied to ``x [N, in]``."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        raise RuntimeError(f"R-Sparse layer {layer} ran outside a vLLM forward context (set_forward_context)")
    return get_forward_context().no_compile_layers[layer].forward(x)


def context_layers(static_forward_context: Mapping[str, Any]) -> list[RSparseLayer]:
    """Every R-Sparse layer of one engine, from its compilation config's ``static_forward_context``."""
    return [layer for name, layer in static_forward_context.items() if name.startswith(CONTEXT_PREFIX)]


def set_mode(layers: Iterable[RSparseLayer], mode: Mode) -> None:
    """Put ``layers`` in ``mode`` (read by the operator at run time, so compiled graphs follow it)."""
    for layer in layers:
        layer.mode = mode


class RSparseLayer:
    """The rsparse shards of one vLLM layer (q | k | v, gate | up, or one), run side by side.

    Per shard s: ``y_s = W_s(x ⊙ m_s) + U_s(S_s V_sᵀ(x ⊙ (1−m_s)))`` on decode steps,
    ``y_s = W_s x`` on prefill steps. The shards' Wᵀ sit side by side in one ``weight_t``, so
    the sparse products of a fused layer are one kernel call (each shard keeps its own channel
    norms and threshold) and its dense prefill is one packed GEMM.
    """

    first_factor = None

    def __init__(self, shards: Sequence[Mapping[str, torch.Tensor]], specs: Sequence[Mapping[str, Any]]) -> None:
        # A copy either way: the flat load buffers are freed after loading.
        self.weight_t = torch.cat([t["weight_t"] for t in shards], dim=1).contiguous()
        self.col_norms = torch.stack([t["col_norm"].float() for t in shards]).contiguous()
        # α = 0 keeps no exact channel: an infinite threshold makes its segment read no row.
        self.thresholds = [float(spec["threshold"]) if float(spec["alpha"]) > 0.0 else math.inf for spec in specs]
        self.splits = [t["weight_t"].shape[1] for t in shards]
        self.dense = prepacked_linear(self.weight_t.t())
        if not self.weight_t.is_cuda:
            cpu_extension()  # build the decode kernel at load (vLLM's warm-up runs only prefill), logged
        # per shard (S·Vᵀ, U), or None without a low-rank part; the kernel adds it in the same pass
        self.low_rank = [low_rank_operands(t["vs"], t["u"]) if "vs" in t and "u" in t else None for t in shards]
        self.out_features = sum(self.splits)
        sparse_prefill = os.environ.get(SPARSE_PREFILL_ENV, "0") not in ("", "0")
        self.mode: Mode = "sparse" if sparse_prefill else "serving"
        # Tokens this layer computed each way: Sirius's tests check that only its drafter runs sparse.
        self.rows = {"dense": 0, "sparse": 0}
        self.name = self._register()

    def _register(self) -> str:
        """Enter this layer in the static forward context of the vLLM config being loaded; returns its name.

        vLLM loads a model inside ``set_current_vllm_config``; the name is the layer's load order,
        the same in every worker, so compiled graphs (which hold the name) match across ranks.
        """
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        if config is None:
            raise RuntimeError("R-Sparse layers are built while vLLM loads a model (inside set_current_vllm_config)")
        context = config.compilation_config.static_forward_context
        name = f"{CONTEXT_PREFIX}{len(context_layers(context))}"
        context[name] = self
        return name

    @classmethod
    def shard(cls, tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> RSparseLayer:
        """A layer of one shard (an rsparse shard fused with shards of other schemes)."""
        return cls([tensors], [spec])

    def second(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimserve.rsparse_linear(x, self.name, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "serving":
            rows = decode_rows()
        else:
            rows = self.mode == "sparse"
        if rows is True:
            self.rows["sparse"] += x.shape[0]
            return self.sparse(x)
        y = self.dense(x)
        self.rows["dense"] += x.shape[0]
        if rows is not False:  # a step mixing prefill and decode: decode tokens stay sparse
            y[rows] = self.sparse(x[rows])
            self.rows["sparse"] += len(rows)
            self.rows["dense"] -= len(rows)
        return y

    def sparse(self, x: torch.Tensor) -> torch.Tensor:
        """The R-Sparse product of every token of ``x [N, in]``, every shard."""
        product = segmented_sparse_mm if x.shape[0] <= KERNEL_MAX_TOKENS else masked_segments
        return product(x, self.weight_t, self.col_norms, self.thresholds, self.splits, low_rank=self.low_rank)[0]
