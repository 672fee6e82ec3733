"""Token-level perplexity of a dense model or a slimserve checkpoint on held-out text.

This is *token* perplexity (exp of the mean next-token negative log-likelihood over the
model's own tokens), the metric SVD-LLM and ASVD report; it is not lm-eval's *word*
perplexity (which CoSpaDi and ROCKET report) and the two must never be compared. A
slimserve checkpoint runs in transformers with every compressed linear computing its
scheme's reference forward (``loaders/reference.py``) on every token, so the number measures
the compression as the scheme computes it (R-Sparse's masks included), not a serving kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import open_checkpoint
from slimserve.loaders.reference import reference_model
from slimserve.loaders.windows import perplexity_windows

METRIC = "token perplexity (not lm-eval word perplexity)"


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seq_len: int
    method: str
    text: str

    def describe(self) -> str:
        return (f"{self.method}: {METRIC}: {self.perplexity:.2f} over {self.tokens} tokens "
                f"({self.windows} windows of {self.seq_len} tokens, BOS first) on {self.text}")


def method_name(model_dir: str | Path) -> str:
    """``dense`` or the checkpoint's producer (``rocket ratio=0.3 allocation=knapsack``, ``rsparse sparsity=0.5``)."""
    qc = open_checkpoint(model_dir).quantization_config
    if qc is None:
        return "dense"
    producer = qc.get("producer", {})
    extras = " ".join(f"{k}={producer[k]}" for k in ("ratio", "sparsity", "rank", "allocation")
                      if producer.get(k) is not None)
    return f"{producer.get('method', 'slimserve')} {extras}".strip()


def perplexity(model_dir: str | Path, text_file: str | Path, *, seq_len: int = 512, windows: int = 8,
               dtype: torch.dtype = torch.float32) -> PerplexityResult:
    """Token perplexity over ``windows`` consecutive windows of ``seq_len`` tokens from the text's start.

    Each window is BOS followed by ``seq_len`` text tokens, and every text token is scored,
    so the count is ``windows · seq_len`` tokens.
    """
    from transformers import AutoTokenizer

    text_path = Path(text_file)
    if not text_path.is_file():
        raise CompressionError(f"--text {text_file}: file not found")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    chunks = perplexity_windows(tokenizer, text_path.read_text(), windows=windows, seq_len=seq_len,
                                source=f"--text {text_file}")
    return PerplexityResult(perplexity=windows_perplexity(reference_model(model_dir, dtype), chunks),
                            tokens=windows * seq_len, windows=windows, seq_len=seq_len, method=method_name(model_dir),
                            text=text_path.name)


def windows_perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    """Token perplexity of a causal LM over token windows: every token after the first is scored."""
    total_nll, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            chunk = torch.tensor([window])
            logits = model(chunk).logits[0, :-1].float()
            total_nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += len(window) - 1
    return math.exp(total_nll / count)
