"""Token windows cut from a text: what calibration and perplexity feed a model.

Every window is the tokenizer's BOS followed by ``seq_len`` text tokens (the text itself is
tokenized without special tokens), so a window scores ``seq_len`` tokens and each starts from
the state a document start gives the model. Calibration draws its windows at random from the
whole text; perplexity takes consecutive windows from the text's start, so two runs on one
text score the same tokens.
"""

from __future__ import annotations

import random
from typing import Any

from slimserve.errors import CompressionError

# Characters tokenized for a perplexity window, per token: generous for English text, so that
# only the needed prefix of a long book is tokenized; a shorter yield falls back to the whole text.
_CHARS_PER_TOKEN = 12


def bos_token_id(tokenizer: Any) -> int:
    """The token each window starts with: BOS, or EOS for tokenizers without one (Qwen's)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def perplexity_windows(tokenizer: Any, text: str, *, windows: int, seq_len: int, source: str) -> list[list[int]]:
    """``windows`` consecutive windows of BOS + ``seq_len`` tokens from the text's start.

    ``source`` names the text in the error raised when it is too short (a file, a CLI option).
    """
    needed = windows * seq_len
    ids = tokenizer(text[: needed * _CHARS_PER_TOKEN], add_special_tokens=False).input_ids
    if len(ids) < needed:
        ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < needed:
        raise CompressionError(f"{source}: has {len(ids)} tokens, need {needed} ({windows} windows of {seq_len}); "
                               "use a longer text or a smaller --seq-len")
    bos = bos_token_id(tokenizer)
    return [[bos] + ids[w * seq_len:(w + 1) * seq_len] for w in range(windows)]


def calibration_windows(tokenizer: Any, text: str, *, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """``samples`` distinct windows of BOS + ``seq_len`` tokens, drawn without overlap by ``seed``."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    available = len(ids) // seq_len
    if available < samples:
        raise CompressionError(
            f"calibration text has {len(ids)} tokens, enough for {available} windows of {seq_len}; "
            f"asked for {samples} (use a longer --calib text, fewer --calib-samples or a smaller --calib-seq-len)")
    bos = bos_token_id(tokenizer)
    starts = sorted(random.Random(seed).sample(range(available), samples))
    return [[bos] + ids[i * seq_len:(i + 1) * seq_len] for i in starts]
