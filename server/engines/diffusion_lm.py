"""Masked-diffusion language models (LLaDA, Dream) over stock transformers decoders, with SparseD.

transformers 5.19 ships neither LLaDA nor Dream, so their checkpoints are loaded by mapping
their tensor names onto the stock class of the same shape (:func:`load_diffusion_lm_engine`):

- **LLaDA** (``model_type: "llada"``, OLMo-style names ``model.transformer.blocks.N.ff_proj``...)
  is a Llama: RMSNorm, RoPE, SwiGLU, no biases; mask token 126336.
- **Dream** (``model_type: "Dream"``) is a Qwen2 with the same tensor names (q/k/v biases);
  mask token 151666. Dream was trained to predict token ``i`` at position ``i - 1`` (it started
  from an autoregressive Qwen2.5), so its logits are read one position to the left.
- **slimserve's own layout**: any ``*ForCausalLM`` folder whose ``config.json`` carries the marker
  ``"slimserve_diffusion_lm": {"mask_token_id": int, "steps": int, "block_length": int}`` (the
  marker may also name ``"logit_shift"`` and a default ``"sparsed": {"skip", "rho", "block"}``;
  LLaDA and Dream folders may carry it too, to set their defaults).

Sampling is LLaDA's: the prompt is followed by mask tokens and generation proceeds in
semi-autoregressive blocks from left to right; within a block, each step predicts every masked
position and commits the most confident predictions ("low-confidence remasking"). A finished
block is final, which is what streaming sends. Dream decodes the whole generation as one block
unless the request gives ``block_length``.

Every step runs the decoder bidirectionally with unmasked SDPA and no KV cache (nothing is
reused between steps: every position changes), and the LM head only where the block still has
masks. With SparseD on (``plugin/transformers/dlm_attention.py``), each layer chooses its tiles
once per request, at global step ``floor(T * skip) + 1``, and runs block-sparse attention after.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slimserve.attention.sparsed import SparsedParams, SparseKernel
from slimserve.errors import CheckpointError
from slimserve.plugin.transformers.dlm_attention import SparsedRequest, make_bidirectional
from slimserve.server.engines.base import (
    ChatMessage,
    EngineRequestError,
    SparseAttentionStats,
    StepCallback,
    TextDelta,
    TextEngine,
    TextRequest,
)

MARKER = "slimserve_diffusion_lm"
ARCHITECTURE = "SlimserveMaskedDiffusionLM"
LLADA_MODEL_TYPE = "llada"
DREAM_MODEL_TYPE = "Dream"
LLADA_MASK_TOKEN_ID = 126336
DREAM_MASK_TOKEN_ID = 151666
# LLaDA's released generation settings block the answer in 32-token pieces.
LLADA_BLOCK_LENGTH = 32


def is_diffusion_lm_config(config: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` describes a diffusion LM this engine serves."""
    return MARKER in config or config.get("model_type") in (LLADA_MODEL_TYPE, DREAM_MODEL_TYPE)


class DiffusionLMEngine(TextEngine):
    """Semi-autoregressive low-confidence-remasking sampler over a bidirectional decoder.

    ``steps=None`` means one step per generated token (the setting SparseD and LLaDA report);
    ``block_length=None`` means the whole generation is one block (Dream's sampler).
    ``logit_shift`` is 1 for models that predict a position from its left neighbour (Dream).
    """

    def __init__(self, model: Any, tokenizer: Any, model_name: str, *, mask_token_id: int,
                 steps: int | None, block_length: int | None, logit_shift: int = 0,
                 sparsed: SparsedParams | None = None, sparse_kernel: SparseKernel = "auto") -> None:
        super().__init__(model_name)
        self.model = make_bidirectional(model.eval())
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.default_steps = steps
        self.default_block_length = block_length
        self.logit_shift = logit_shift
        self.default_sparsed = sparsed
        self.sparse_kernel = sparse_kernel

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        if not self.tokenizer.chat_template:
            raise EngineRequestError(
                f"model {self.model_name!r} has no chat template; use /v1/completions", param="messages")
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True)

    def schedule(self, request: TextRequest) -> tuple[int, int, int]:
        """``(block_length, num_blocks, steps)`` the sampler runs for ``request``, defaults applied.

        Steps are rounded up to a whole number per semi-autoregressive block, at least one each:
        ``max_tokens=300, block_length=1, steps=1`` runs 300 forward passes, not 1.
        """
        block_length = request.block_length or self.default_block_length or request.max_tokens
        num_blocks = -(-request.max_tokens // block_length)
        steps = max(request.steps or self.default_steps or num_blocks * block_length, num_blocks)
        if steps % num_blocks:
            steps += num_blocks - steps % num_blocks
        return block_length, num_blocks, steps

    def forward_passes(self, request: TextRequest) -> int:
        """Every denoising step runs the whole decoder once, so the passes are the rounded-up steps."""
        return self.schedule(request)[2]

    def max_positions(self) -> int | None:
        """The decoder's position table (RoPE was trained up to it): prompt, masks and all must fit."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return int(positions) if positions else None

    def generate_text(self, request: TextRequest, on_step: StepCallback) -> Iterator[TextDelta]:
        block_length, num_blocks, steps = self.schedule(request)
        steps_per_block = steps // num_blocks
        generator = torch.Generator("cpu").manual_seed(request.seed if request.seed is not None else 0)

        prompt_ids = self.tokenizer(request.prompt, return_tensors="pt")["input_ids"]
        prompt_length = prompt_ids.shape[1]
        if self.logit_shift and prompt_length == 0:
            raise EngineRequestError("this model reads each token's logits from the token before it; "
                                     "the prompt must not be empty", param="prompt")
        positions = self.max_positions()
        if positions is not None and prompt_length + num_blocks * block_length > positions:
            # The server checked prompt + max_tokens; whole blocks of masks can reach past that.
            raise EngineRequestError(
                f"the prompt ({prompt_length} tokens) plus {num_blocks} blocks of {block_length} masks exceed the "
                f"model's {positions} positions; lower block_length or max_tokens", param="block_length")
        masks = torch.full((1, num_blocks * block_length), self.mask_token_id, dtype=torch.long)
        sequence = torch.cat([prompt_ids, masks], dim=1)
        params = self.default_sparsed if request.sparsed is None else request.sparsed or None
        sparsed = None if params is None else SparsedRequest(params, prompt_length, steps,
                                                             kernel=self.sparse_kernel)

        emitted_tokens = 0
        emitted_text = ""
        for block in range(num_blocks):
            start = prompt_length + block * block_length
            end = start + block_length
            for step in range(steps_per_block):
                global_step = block * steps_per_block + step
                if sparsed is not None:
                    sparsed.step = global_step
                self._denoise_step(sequence, start, end, steps_per_block - step, request.temperature, generator,
                                   sparsed)
                on_step(global_step + 1, steps)
            generated = sequence[0, prompt_length:end].tolist()
            finish_reason, generated = self._finish(generated, request.max_tokens)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if finish_reason is None:
                text = text[:len(text.rstrip("\ufffd"))]  # hold back a split multi-byte character
            text, stopped = _cut_at_stop(text, request.stop)
            if stopped:
                finish_reason = "stop"
            stats = None
            if finish_reason is not None and sparsed is not None:
                stats = SparseAttentionStats(sparsed.density(), sparsed.selection_seconds, len(sparsed.layers))
            delta = TextDelta(text[len(emitted_text):], len(generated) - emitted_tokens, finish_reason, stats)
            emitted_tokens, emitted_text = len(generated), text
            yield delta
            if finish_reason is not None:
                return

    def _finish(self, generated: list[int], max_tokens: int) -> tuple[str | None, list[int]]:
        """Cut the committed tokens at EOS or at ``max_tokens``; say why generation ends, if it does."""
        eos = self.tokenizer.eos_token_id
        if eos in generated:
            return "stop", generated[:generated.index(eos)]
        if len(generated) >= max_tokens:
            return "length", generated[:max_tokens]
        return None, generated

    @torch.inference_mode()
    def _denoise_step(self, sequence: torch.Tensor, start: int, end: int, steps_left: int, temperature: float,
                      generator: torch.Generator, sparsed: SparsedRequest | None) -> None:
        """Predict the block's masked positions and commit the most confident ones in place."""
        block = sequence[0, start:end]
        masked = (block == self.mask_token_id).nonzero().squeeze(-1)
        if masked.numel() == 0:
            return
        hidden = self.model.base_model(input_ids=sequence, use_cache=False, sparsed=sparsed).last_hidden_state
        # Logits only where tokens are still masked (a vocabulary-wide GEMM per position is the LM head's cost).
        logits = self.model.get_output_embeddings()(hidden[0, start - self.logit_shift + masked]).float()
        logits[:, self.mask_token_id] = float("-inf")
        if temperature > 0:
            # Gumbel-max sampling; confidence stays the model's probability of the sampled token.
            gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator).clamp_min(1e-20)))
            predicted = (logits / temperature + gumbel).argmax(dim=-1)
        else:
            predicted = logits.argmax(dim=-1)
        confidence = torch.softmax(logits, dim=-1).gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
        # Spread the block's masks evenly over the steps left, committing at least one per step.
        commit = -(-masked.numel() // steps_left)
        chosen = confidence.topk(commit).indices
        block[masked[chosen]] = predicted[chosen]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Truncate ``text`` before the first stop string; report whether one occurred."""
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[:min(positions)], True


# --- loading ---------------------------------------------------------------------------------------------------

def llada_to_llama_config(raw: dict[str, Any], config_file: Path) -> Any:
    """The ``LlamaConfig`` of a LLaDA ``config.json``; variants a Llama cannot express are refused by field."""
    from transformers import LlamaConfig

    required = {"layer_norm_type": "rms", "block_type": "llama", "rope": True, "alibi": False,
                "include_bias": False, "scale_logits": False, "input_emb_norm": False, "attention_layer_norm": False}
    for name, expected in required.items():
        if name in raw and raw[name] != expected:
            raise CheckpointError(f"LLaDA variant not supported: {raw[name]!r}", file=config_file, field=name,
                                  expected=repr(expected))
    if raw.get("include_qkv_bias"):
        raise CheckpointError("LLaDA with q/k/v biases is not supported", file=config_file,
                              field="include_qkv_bias", expected="false")
    if raw.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise CheckpointError(f"LLaDA activation {raw['activation_type']!r} is not supported", file=config_file,
                              field="activation_type", expected="'silu' or 'swiglu'")
    for name in ("d_model", "n_heads", "n_layers"):
        if name not in raw:
            raise CheckpointError("missing", file=config_file, field=name, expected="an integer")
    heads, width = int(raw["n_heads"]), int(raw["d_model"])
    intermediate = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4)) * width
    return LlamaConfig(
        vocab_size=int(raw.get("embedding_size") or raw["vocab_size"]), hidden_size=width,
        intermediate_size=int(intermediate), num_hidden_layers=int(raw["n_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(raw.get("n_kv_heads") or heads), head_dim=width // heads,
        max_position_embeddings=int(raw.get("max_sequence_length", 4096)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(raw.get("rope_theta", 10000.0)), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=bool(raw.get("weight_tying", False)), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"), hidden_act="silu",
    )


def dream_to_qwen2_config(raw: dict[str, Any]) -> Any:
    """The ``Qwen2Config`` of a Dream ``config.json`` (Dream's keys are Qwen2's)."""
    from transformers import Qwen2Config

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
            "tie_word_embeddings", "eos_token_id", "pad_token_id", "bos_token_id", "rope_scaling")
    return Qwen2Config(**{key: raw[key] for key in keys if key in raw and raw[key] is not None})


_LLADA_BLOCK_NAMES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
}
_LLADA_TOP_NAMES = {"model.transformer.wte.weight": "model.embed_tokens.weight",
                    "model.transformer.ln_f.weight": "model.norm.weight",
                    "model.transformer.ff_out.weight": "lm_head.weight"}
_LLADA_BLOCK = re.compile(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)")


def llada_tensor_name(name: str) -> str | None:
    """LLaDA's tensor name in Llama's naming (None for a name LLaDA's Llama-style block does not have).

    LLaDA's MLP is ``ff_out(act(ff_proj(x)) * up_proj(x))``, so ``ff_proj`` is Llama's gate.
    """
    if name in _LLADA_TOP_NAMES:
        return _LLADA_TOP_NAMES[name]
    match = _LLADA_BLOCK.fullmatch(name)
    if match is None or match.group(2) not in _LLADA_BLOCK_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_LLADA_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no weights", file=model_dir, expected="model.safetensors or a sharded index")
    return files


def load_mapped_model(model_dir: Path, config: Any, rename: Callable[[str], str | None]) -> torch.nn.Module:
    """A stock ``*ForCausalLM`` for ``config`` with the folder's tensors renamed into it.

    Every model tensor must come from the folder (a tied LM head excepted) and every folder
    tensor must land somewhere, so a wrong mapping fails at load, naming the tensor.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                target = rename(name)
                if target is None or target not in expected:
                    raise CheckpointError("tensor has no place in the model", file=path, tensor=name,
                                          expected=f"a tensor of a {type(model).__name__} after renaming")
                tensor = tensors.get_tensor(name).to(torch.float32)
                if tuple(tensor.shape) != tuple(expected[target].shape):
                    raise CheckpointError(f"wrong shape {list(tensor.shape)}", file=path, tensor=name,
                                          expected=str(list(expected[target].shape)))
                state[target] = tensor
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing, first {missing[0]!r}", file=model_dir,
                              expected="every tensor of the model")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Buffers that are not saved (RoPE's inverse frequencies) were created on the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def load_diffusion_lm_engine(model_dir: str | Path, model_name: str,
                             sparse_kernel: SparseKernel = "auto") -> DiffusionLMEngine:
    """Load a LLaDA, Dream or slimserve diffusion-LM folder (layouts in the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    raw = json.loads(config_file.read_text())
    marker = raw.get(MARKER, {})
    model_type = raw.get("model_type")
    if model_type == LLADA_MODEL_TYPE:
        model = load_mapped_model(model_dir, llada_to_llama_config(raw, config_file), llada_tensor_name)
        defaults: dict[str, Any] = {"mask_token_id": raw.get("mask_token_id", LLADA_MASK_TOKEN_ID),
                                    "block_length": LLADA_BLOCK_LENGTH}
    elif model_type == DREAM_MODEL_TYPE:
        model = load_mapped_model(model_dir, dream_to_qwen2_config(raw), lambda name: name)
        defaults = {"mask_token_id": raw.get("mask_token_id", DREAM_MASK_TOKEN_ID), "logit_shift": 1}
    else:
        if "mask_token_id" not in marker:
            raise CheckpointError("no mask token", file=config_file, field=f"{MARKER}.mask_token_id",
                                  expected="the id of the tokenizer's mask token")
        config = AutoConfig.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32)
        defaults = {}
    settings = {**defaults, **marker}
    sparsed = settings.get("sparsed")
    return DiffusionLMEngine(
        model, load_tokenizer(model_dir), model_name, mask_token_id=int(settings["mask_token_id"]),
        steps=settings.get("steps"), block_length=settings.get("block_length"),
        logit_shift=int(settings.get("logit_shift", 0)),
        sparsed=None if sparsed is None else SparsedParams(**sparsed), sparse_kernel=sparse_kernel)


def load_tokenizer(model_dir: Path) -> Any:
    """The folder's tokenizer; a custom tokenizer class (Dream's) falls back to its ``tokenizer.json``.

    No remote code is run: Dream's ``DreamTokenizer`` is a Qwen2 byte-level BPE whose vocabulary
    and special tokens are all in ``tokenizer.json``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ValueError, OSError):
        if not (model_dir / "tokenizer.json").exists():
            raise
        settings = json.loads((model_dir / "tokenizer_config.json").read_text())
        special = {key: settings[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
                   if isinstance(settings.get(key), str)}
        return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                       chat_template=settings.get("chat_template"), **special)
