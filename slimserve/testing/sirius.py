"""Plain-PyTorch references of Sirius with a CATS drafter: what the vLLM engine must reproduce.

The drafter rule (``CatsGate``) is written again here in transformers terms, independently of the
plugin's ``CatsActivation``, so a test comparing the two catches a wrong rule as well as wrong
engine plumbing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch


class CatsGate(torch.nn.Module):
    """SiLU keeping each token's ``1 − s`` largest-magnitude activations while ``sparse`` is set, else plain SiLU."""

    def __init__(self, sparsity: float) -> None:
        super().__init__()
        self.sparsity = sparsity
        self.sparse = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.nn.functional.silu(x)
        if not self.sparse:
            return gate
        width = gate.shape[-1]
        keep = max(1, round((1.0 - self.sparsity) * width))
        smallest = gate.abs().topk(width - keep, dim=-1, largest=False).indices
        return gate.scatter(-1, smallest, 0.0)


def sirius_keep_all_reference(model_dir: str | Path, prompts: list[str], *, period: int, sparsity: float,
                              max_tokens: int) -> list[list[int]]:
    """Greedy tokens of Sirius with threshold 0 (every draft kept) and a CATS drafter, in fp32 transformers.

    The prompt is prefilled densely and the full model picks the first token. Each round then drafts
    ``period − 1`` tokens with the sparse model one at a time, attending to the dense K/V of every
    committed position plus the drafter's own K/V of the round; the full model re-runs the round's
    tokens densely (rewriting their K/V) and adds its own next token. With threshold 0 every draft
    is kept, so the output is this schedule exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gates = [CatsGate(sparsity) for _ in model.model.layers]
    for layer, gate in zip(model.model.layers, gates):
        layer.mlp.act_fn = gate
    results = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(tokenizer(prompt, return_tensors="pt").input_ids, use_cache=True)
            cache, last = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens = [last]
            while len(tokens) < max_tokens:
                draft_cache, drafts, token = copy.deepcopy(cache), [], last
                for gate in gates:
                    gate.sparse = True
                for _ in range(period - 1):
                    logits = model(torch.tensor([[token]]), past_key_values=draft_cache, use_cache=True).logits
                    token = int(logits[0, -1].argmax())
                    drafts.append(token)
                for gate in gates:
                    gate.sparse = False
                logits = model(torch.tensor([[last, *drafts]]), past_key_values=cache, use_cache=True).logits
                last = int(logits[0, -1].argmax())
                tokens += [*drafts, last]
            results.append(tokens[:max_tokens])
    return results
