"""Token-level perplexity of a dense model or a slimserve checkpoint on held-out text.

This is *token* perplexity (exp of the mean next-token negative log-likelihood over the
model's own tokens), the metric SVD-LLM and ASVD report; it is not lm-eval's *word*
perplexity (which CoSpaDi and ROCKET report) and the two must never be compared. A
slimserve checkpoint is reconstructed to dense weights in memory (as ``densify`` would) and
run with transformers, so the number measures the compression, not a serving kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slimserve.loaders.checkpoint import iter_tensors, open_checkpoint
from slimserve.errors import CompressionError

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


def load_dense_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers causal LM with dense weights; slimserve modules are reconstructed in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = open_checkpoint(model_dir)
    if ckpt.quantization_config is None:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    config_dict = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {name: t.to(dtype) for name, t in iter_tensors(ckpt) if ckpt.module_of(name) is None}
    state.update({f"{m}.weight": ckpt.reconstruct(m).to(dtype) for m in ckpt.modules})
    missing = set(model.state_dict()) - set(state)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise CompressionError(f"{model_dir}: no stored weights for {sorted(missing)[:3]} after reconstruction")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def method_name(model_dir: str | Path) -> str:
    """``dense`` or the producer recorded in the checkpoint (``rocket ratio=0.3 allocation=knapsack``)."""
    qc = open_checkpoint(model_dir).quantization_config
    if qc is None:
        return "dense"
    producer = qc.get("producer", {})
    extras = " ".join(f"{k}={producer[k]}" for k in ("ratio", "rank", "allocation") if producer.get(k) is not None)
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
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    needed = windows * seq_len
    text = text_path.read_text()
    ids = tok(text[: needed * 12], add_special_tokens=False).input_ids
    if len(ids) < needed:
        ids = tok(text, add_special_tokens=False).input_ids
    if len(ids) < needed:
        raise CompressionError(f"--text {text_file}: has {len(ids)} tokens, need {needed} "
                               f"({windows} windows of {seq_len}); use a longer text or a smaller --seq-len")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    model = load_dense_model(model_dir, dtype)
    total_nll = 0.0
    with torch.inference_mode():
        for w in range(windows):
            chunk = torch.tensor([[bos] + ids[w * seq_len:(w + 1) * seq_len]])
            logits = model(chunk).logits[0, :-1].float()
            total_nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
    return PerplexityResult(perplexity=math.exp(total_nll / needed), tokens=needed, windows=windows,
                            seq_len=seq_len, method=method_name(model_dir), text=text_path.name)
