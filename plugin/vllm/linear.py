"""The vLLM linear method for slimserve checkpoints: per-shard schemes, TP-aware factor loading.

A vLLM linear layer may fuse several checkpoint modules (``qkv_proj`` = q, k, v;
``gate_up_proj`` = gate, up), each compressed with its own scheme and rank. Every scheme
computes ``y_i = second_i(x · first_iᵀ)``: the first factor is a dense ``[r_i, in]`` matrix
(V for lowrank, the dictionary for dictsparse, the weight itself for dense) and the second
is scheme-specific (U, the sparse coefficients, identity). Because the shards of a fused
layer share their input, all first factors are stacked into one prepacked GEMM; then each
shard's second op writes its slice of the output. A runner without a first factor
(``rsparse``, whose mask tests the input itself) gets the layer input x instead; a layer whose
shards all use a scheme listed in ``LAYER_RUNNERS`` (rsparse; nm; lowrank_sparse when the shards' S stack;
lowrank, and dictsparse with bitmask coefficients, where their dense factors are plain bf16 rows or bf16 panels)
gets one runner for all of them.

Parameters are declared in ``create_weights`` from the scheme's ``TensorSpec`` list. A stored
tensor is a flat buffer holding that suffix for every shard that has it (ranks differ per
shard, so the shards cannot share one 2-D shape), and the weight loader narrows each loaded
tensor to this rank's slice: column-parallel layers split along the spec's ``out_dim``,
row-parallel layers along its ``in_dim``; tensors without that axis are replicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.utils import set_weight_attrs

from slimserve.errors import CheckpointError
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.schemes.base import TensorSpec
from slimserve.plugin.kernels.gemm import factor_linear, prepacked_linear
from slimserve.plugin.vllm.heap import LoadingLayers
from slimserve.plugin.vllm.shards import LAYER_RUNNERS, SHARD_RUNNERS

QKV_SHARD_IDS = {"q": 0, "k": 1, "v": 2}


@dataclass
class _Slot:
    """Where one shard's tensor of one suffix lives in the flat parameter, and how to slice it."""

    module: str
    spec: TensorSpec  # local (per-rank) shape
    offset: int
    out_start: int
    in_start: int
    split_out: bool
    split_in: bool
    loaded: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.spec.shape:
            n *= d
        return n


@dataclass
class _Plan:
    """What ``apply`` runs: one stacked first-factor GEMM, then each shard's second op on its slice.

    A part whose z range is ``None`` belongs to a runner without a first factor: its op reads
    the layer input x. ``first`` is None when no shard has a first factor.
    """

    first: Callable[[torch.Tensor], torch.Tensor] | None
    parts: list[tuple[int | None, int | None, int, int, Callable[[torch.Tensor], torch.Tensor] | None]] = field(
        default_factory=list)
    out_features: int = 0


def _check_input_split(module: str, spec: dict[str, Any], local_spec: dict[str, Any]) -> None:
    """Refuse a row-parallel split whose ranks' slices do not tile every tensor's input axis exactly.

    Each rank loads a contiguous slice of every tensor's in-axis. Where that axis is compressed
    (``nm``: in·kept/group values and their packed positions a row) a rank's slice must be whole
    groups and whole bytes of positions, so an N:M module splits only at multiples of its group.
    """
    scheme = SCHEMES[spec["scheme"]]
    parts = spec["in_features"] // local_spec["in_features"]
    for full, local in zip(scheme.tensor_specs(spec), scheme.tensor_specs(local_spec)):
        if full.in_dim is not None and full.shape[full.in_dim] != parts * local.shape[local.in_dim]:
            pattern = f" ({spec['kept']}:{spec['group']})" if "group" in spec else ""
            raise CheckpointError(
                f"cannot split {full.shape[full.in_dim]} columns{pattern} over {parts} tensor-parallel ranks of "
                f"{local_spec['in_features']} inputs", tensor=f"{module}.{full.suffix}",
                field=f"quantization_config.modules.{module}",
                expected="a tensor-parallel size whose per-rank input slices are whole groups (and whole bytes of "
                         "positions)")


class SlimserveLinearMethod(LinearMethodBase):
    """Linear method for one vLLM layer whose checkpoint modules use slimserve schemes."""

    def __init__(self, shard_modules: Sequence[str], shard_specs: Sequence[dict[str, Any]]) -> None:
        self.shard_modules = list(shard_modules)
        self.shard_specs = [dict(s) for s in shard_specs]

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if len(output_partition_sizes) != len(self.shard_specs):
            raise CheckpointError(
                f"layer has {len(output_partition_sizes)} output shards but the checkpoint lists "
                f"{len(self.shard_specs)} modules {self.shard_modules}")
        LoadingLayers.created()
        tp_rank = getattr(layer, "tp_rank", 0)
        kv_replicas = getattr(layer, "num_kv_head_replicas", 1)
        is_qkv = isinstance(layer, QKVParallelLinear)
        row_parallel = isinstance(layer, RowParallelLinear)
        slots: dict[str, list[_Slot | None]] = {}
        sizes: dict[str, int] = {}
        shards = zip(self.shard_modules, self.shard_specs, output_partition_sizes)
        for i, (module, spec, local_out) in enumerate(shards):
            full_out, full_in = spec["out_features"], spec["in_features"]
            split_out = local_out != full_out
            split_in = input_size_per_partition != full_in
            if (split_out and full_out % local_out) or (split_in and full_in % input_size_per_partition):
                raise CheckpointError(
                    f"module {module} is [{full_out}, {full_in}] but this layer's partition is "
                    f"[{local_out}, {input_size_per_partition}]", field=f"quantization_config.modules.{module}")
            shard_rank = tp_rank // kv_replicas if (is_qkv and i > 0) else tp_rank
            # full_in_features: for a scheme whose tensors address the input axis but cannot be split along
            # it (lowrank_sparse's S), which it then loads whole on every rank.
            local_spec = dict(spec, out_features=local_out, in_features=input_size_per_partition,
                              full_in_features=full_in)
            if split_in:
                _check_input_split(module, dict(spec, full_in_features=full_in), local_spec)
            for tspec in SCHEMES[spec["scheme"]].tensor_specs(local_spec):
                shard_slots = slots.setdefault(tspec.suffix, [None] * len(self.shard_specs))
                # A tensor's in-axis may be compressed (nm stores in·kept/group values a row): a rank's slice
                # starts at the rank times the slice's extent on that axis, not times input_size_per_partition.
                in_extent = tspec.shape[tspec.in_dim] if tspec.in_dim is not None else 0
                shard_slots[i] = _Slot(
                    module=module, spec=tspec, offset=sizes.get(tspec.suffix, 0),
                    out_start=shard_rank * local_out, in_start=tp_rank * in_extent,
                    split_out=split_out and tspec.out_dim is not None and not row_parallel,
                    split_in=split_in and tspec.in_dim is not None,
                )
                sizes[tspec.suffix] = sizes.get(tspec.suffix, 0) + shard_slots[i].numel
        for suffix, total in sizes.items():
            # One flat buffer per suffix: index tensors take the widest dtype any shard's scheme asks for.
            index_dtypes = [s.spec.index_dtype for s in slots[suffix]
                            if s is not None and s.spec.index_dtype is not None]
            dtype = max(index_dtypes, key=lambda d: d.itemsize) if index_dtypes else params_dtype
            param = torch.nn.Parameter(torch.empty(total, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._make_loader(layer, slots[suffix])})
            layer.register_parameter(suffix, param)
        layer.slimserve_slots = slots

    def _make_loader(self, layer: torch.nn.Module, shard_slots: list[_Slot | None]) -> Callable[..., None]:
        def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
            if shard_id is None:
                shard_id = getattr(loaded, "shard_id", None)
            index = QKV_SHARD_IDS[shard_id] if isinstance(shard_id, str) else int(shard_id or 0)
            slot = shard_slots[index] if index < len(shard_slots) else None
            if slot is None:
                raise CheckpointError("unexpected tensor for this module's scheme",
                                      tensor=f"{self.shard_modules[min(index, len(self.shard_modules) - 1)]}.?",
                                      expected="only tensors of scheme "
                                               f"{self.shard_specs[min(index, len(self.shard_specs) - 1)]['scheme']}")
            tensor = loaded
            spec = slot.spec
            if slot.split_out:
                tensor = tensor.narrow(spec.out_dim, slot.out_start, spec.shape[spec.out_dim])
            if slot.split_in:
                tensor = tensor.narrow(spec.in_dim, slot.in_start, spec.shape[spec.in_dim])
            if tuple(tensor.shape) != spec.shape:
                raise CheckpointError(f"has shape {list(loaded.shape)}", tensor=f"{slot.module}.{spec.suffix}",
                                      expected=f"a tensor whose rank-local slice is {list(spec.shape)}")
            param.data[slot.offset:slot.offset + slot.numel].view(spec.shape).copy_(tensor)
            slot.loaded = True

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check every factor arrived, then build the stacked first GEMM and per-shard second ops."""
        slots: dict[str, list[_Slot | None]] = layer.slimserve_slots
        for suffix, shard_slots in slots.items():
            for slot in shard_slots:
                if slot is not None and not slot.loaded:
                    raise CheckpointError("missing from the checkpoint", tensor=f"{slot.module}.{suffix}",
                                          expected=f"a {slot.spec.kind} tensor for scheme "
                                                   f"{self.shard_specs[self.shard_modules.index(slot.module)]['scheme']}")
        shard_tensors = []
        for i in range(len(self.shard_specs)):
            tensors = {}
            for suffix, shard_slots in slots.items():
                slot = shard_slots[i]
                if slot is not None:
                    flat = getattr(layer, suffix).data
                    tensors[suffix] = flat[slot.offset:slot.offset + slot.numel].view(slot.spec.shape)
            shard_tensors.append(tensors)
        schemes = {spec["scheme"] for spec in self.shard_specs}
        layer_runner = LAYER_RUNNERS.get(next(iter(schemes))) if len(schemes) == 1 else None
        whole = layer_runner(shard_tensors, self.shard_specs) if layer_runner is not None else None
        if whole is not None:
            runners = [whole]
        else:
            runners = [SHARD_RUNNERS[spec["scheme"]](t, spec) for t, spec in zip(shard_tensors, self.shard_specs)]
        firsts: list[torch.Tensor] = []
        seconds: list[tuple[int, Callable[[torch.Tensor], torch.Tensor] | None, int]] = []
        for runner in runners:
            if runner.first_factor is not None:
                firsts.append(runner.first_factor)
            width = None if runner.first_factor is None else runner.first_factor.shape[0]
            seconds.append((width, runner.second, runner.out_features))
        first_linear = factor_linear
        if any(getattr(runner, "first_factor_is_dense_weight", False) for runner in runners):
            first_linear = prepacked_linear
        plan = _Plan(first=first_linear(torch.cat(firsts) if len(firsts) > 1 else firsts[0]) if firsts else None)
        z0 = o0 = 0
        for width, second, out_features in seconds:
            if width is None:
                plan.parts.append((None, None, o0, o0 + out_features, second))
            else:
                plan.parts.append((z0, z0 + width, o0, o0 + out_features, second))
                z0 += width
            o0 += out_features
        plan.out_features = o0
        layer.slimserve_plan = plan
        # The runners hold what they need (packed copies or views); drop the flat load buffers.
        for suffix in slots:
            setattr(layer, suffix, torch.nn.Parameter(torch.empty(0, dtype=getattr(layer, suffix).dtype),
                                                      requires_grad=False))
        del layer.slimserve_slots
        LoadingLayers.loaded()  # returns the load buffers just dropped (heap.py)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        plan: _Plan = layer.slimserve_plan
        leading = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        z = plan.first(x2) if plan.first is not None else None
        if len(plan.parts) == 1 and plan.parts[0][4] is not None:
            y = plan.parts[0][4](z if z is not None else x2)
        else:
            y = torch.empty(x2.shape[0], plan.out_features, dtype=x2.dtype, device=x2.device)
            for z0, z1, o0, o1, second in plan.parts:
                if z0 is None:
                    y[:, o0:o1] = second(x2)
                elif second is None:
                    y[:, o0:o1] = z[:, z0:z1]
                else:
                    y[:, o0:o1] = second(z[:, z0:z1].contiguous())
        if bias is not None:
            y = y + bias
        return y.reshape(*leading, plan.out_features)
