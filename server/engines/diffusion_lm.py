"""A masked-diffusion language model engine in the style of LLaDA.

transformers 5.19 ships no LLaDA or Dream model; its one diffusion LM, DiffusionGemma, is an
encoder-decoder block-diffusion model with its own generation mixin. This engine therefore
implements the LLaDA recipe (Nie et al., 2025) over a stock transformers decoder used
bidirectionally: the prompt is followed by ``max_tokens`` mask tokens, and generation
proceeds block by block from left to right; within a block, each step predicts every masked
position and commits the most confident predictions ("low-confidence remasking"), so that
``steps`` forward passes fill ``block_length`` tokens per block. A finished block is final,
which is what makes streaming possible: the engine yields one text delta per block.

Folder layout (an ordinary Hugging Face folder, so ``from_pretrained`` loads it):

- ``config.json``: a transformers decoder config (any ``model_type`` with a ``*ForCausalLM``
  class, e.g. ``llama``), whose ``architectures`` is ``["SlimserveMaskedDiffusionLM"]`` and which
  carries the marker ``"slimserve_diffusion_lm": {"mask_token_id": int, "steps": int,
  "block_length": int}``. The marker is what ``slimserve serve`` dispatches on.
- weights (``model.safetensors``) of that ``*ForCausalLM`` class; the causal mask is replaced
  by a full bidirectional one at run time.
- a tokenizer containing the mask token, with a chat template for ``/v1/chat/completions``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slimserve.server.engines.base import (
    ChatMessage,
    EngineRequestError,
    StepCallback,
    TextDelta,
    TextEngine,
    TextRequest,
)

MARKER = "slimserve_diffusion_lm"
ARCHITECTURE = "SlimserveMaskedDiffusionLM"


def is_diffusion_lm_config(config: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` describes a slimserve diffusion LM."""
    return MARKER in config


class DiffusionLMEngine(TextEngine):
    """LLaDA-style semi-autoregressive masked-diffusion sampler over a bidirectional decoder."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str, *, mask_token_id: int,
                 steps: int, block_length: int) -> None:
        super().__init__(model_name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.default_steps = steps
        self.default_block_length = block_length

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        if not self.tokenizer.chat_template:
            raise EngineRequestError(
                f"model {self.model_name!r} has no chat template; use /v1/completions", param="messages")
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True)

    def generate_text(self, request: TextRequest, on_step: StepCallback) -> Iterator[TextDelta]:
        block_length = request.block_length or self.default_block_length
        num_blocks = -(-request.max_tokens // block_length)
        steps = max(request.steps or self.default_steps, num_blocks)
        if steps % num_blocks:
            steps += num_blocks - steps % num_blocks
        steps_per_block = steps // num_blocks
        generator = torch.Generator("cpu").manual_seed(request.seed if request.seed is not None else 0)

        prompt_ids = self.tokenizer(request.prompt, return_tensors="pt")["input_ids"]
        prompt_length = prompt_ids.shape[1]
        masks = torch.full((1, num_blocks * block_length), self.mask_token_id, dtype=torch.long)
        sequence = torch.cat([prompt_ids, masks], dim=1)
        # Every position attends to every other one: the decoder runs bidirectionally.
        attention_mask = torch.ones(1, 1, sequence.shape[1], sequence.shape[1], dtype=torch.bool)

        emitted_tokens = 0
        emitted_text = ""
        for block in range(num_blocks):
            start = prompt_length + block * block_length
            end = start + block_length
            for step in range(steps_per_block):
                self._denoise_step(sequence, attention_mask, start, end, steps_per_block - step,
                                   request.temperature, generator)
                on_step(block * steps_per_block + step + 1, steps)
            generated = sequence[0, prompt_length:end].tolist()
            finish_reason, generated = self._finish(generated, request.max_tokens)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if finish_reason is None:
                text = text[:len(text.rstrip("\ufffd"))]  # hold back a split multi-byte character
            text, stopped = _cut_at_stop(text, request.stop)
            if stopped:
                finish_reason = "stop"
            delta = TextDelta(text[len(emitted_text):], len(generated) - emitted_tokens, finish_reason)
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
    def _denoise_step(self, sequence: torch.Tensor, attention_mask: torch.Tensor, start: int, end: int,
                      steps_left: int, temperature: float, generator: torch.Generator) -> None:
        """Predict the masked positions of the block and commit the most confident ones in place."""
        block = sequence[:, start:end]
        masked = block == self.mask_token_id
        remaining = int(masked.sum())
        if remaining == 0:
            return
        logits = self.model(input_ids=sequence, attention_mask=attention_mask).logits[:, start:end].float()
        logits[..., self.mask_token_id] = float("-inf")
        probabilities = torch.softmax(logits, dim=-1)
        if temperature > 0:
            # Gumbel-max sampling; confidence stays the model's probability of the sampled token.
            gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator).clamp_min(1e-20)))
            predicted = (logits / temperature + gumbel).argmax(dim=-1)
        else:
            predicted = logits.argmax(dim=-1)
        confidence = probabilities.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
        # Spread the block's masks evenly over the steps left, committing at least one per step.
        commit = -(-remaining // steps_left)
        chosen = confidence.topk(commit, dim=-1).indices
        block[0, chosen[0]] = predicted[0, chosen[0]]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Truncate ``text`` before the first stop string; report whether one occurred."""
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[:min(positions)], True


def load_diffusion_lm_engine(model_dir: str | Path, model_name: str) -> DiffusionLMEngine:
    """Load a diffusion-LM folder (layout in the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    marker = json.loads((model_dir / "config.json").read_text())[MARKER]
    config = AutoConfig.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return DiffusionLMEngine(model, tokenizer, model_name, mask_token_id=int(marker["mask_token_id"]),
                             steps=int(marker["steps"]), block_length=int(marker["block_length"]))
