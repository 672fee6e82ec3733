"""Calibration text that matches use: several files, chat-formatted JSONL, and the model's own chat turns.

A compressed chat model is used through its chat template, but a novel calibrates it on prose
without a single template token (issue 16: chat answers fail long before novel perplexity
does). ``compress --calib`` therefore takes a list of sources, concatenated in order:

* a plain text file: its text as is;
* a ``.jsonl`` file: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` conversation per
  line, each rendered with the model's chat template, special tokens included (they are part of
  what the served model reads);
* ``self:N``: N single-turn conversations the dense model writes itself, one per built-in
  prompt (``SELF_PROMPTS``, cycled), by seeded sampling (data-free calibration in the spirit of
  LLM-QAT and self-calibration: text from the model's own distribution, its chat format included).

Every source other than one plain file is rendered into a text file in a cache folder (next to
the Gram cache), named by the SHA-256 of its content; calibration then reads that file like any
other, so the Gram cache key (``CalibrationSpec.text_sha256``) changes exactly when the rendered
text does: another file set, another order, another N, seed or chat template. One plain file is
passed through untouched, so existing Gram caches stay valid. The self-generated conversations
are cached too (as chat JSONL, usable as a ``--calib`` source itself), so a rerun generates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from slimserve.errors import CompressionError

SELF_PREFIX = "self:"
# Sampling for self-generated turns: a mild temperature keeps a 135M model's replies on topic
# while still varying them between seeds.
SELF_MAX_NEW_TOKENS = 256
SELF_TEMPERATURE = 0.7
SELF_TOP_P = 0.9
# Generation on CPU is bound by per-step overhead up to a few dozen rows: 32 rows a step were 2.4x the
# tokens/s of 8 on 2 cores (SmolLM2-135M).
SELF_BATCH = 32
# Varied user turns: questions, explanations, instructions, short writing tasks, everyday advice. None is a
# question of the shipped chat-eval set (a test checks), so calibrating on them never sees a scored question.
SELF_PROMPTS = (
    "What is a good name for a pet goldfish?",
    "Explain how rain forms.",
    "Write a short poem about the sea.",
    "Give me three tips for staying focused while studying.",
    "What is 12 times 7?",
    "Describe a cat in two sentences.",
    "Why is the sky blue?",
    "Tell me a short story about a lost key.",
    "How do plants make their food?",
    "List five fruits that are red.",
    "What does a doctor do?",
    "Translate 'good morning' into French.",
    "Summarize the plot of Cinderella.",
    "What are the days of the week?",
    "How can I make a cup of tea?",
    "Explain what a computer program is to a child.",
    "Write a polite email asking for a day off.",
    "What is the difference between weather and climate?",
    "Name three famous painters.",
    "What should I pack for a trip to the beach?",
    "Why do we need to sleep?",
    "Describe your favourite season and why.",
    "How many wheels does a tricycle have?",
    "Give an example of a healthy breakfast.",
    "What is photosynthesis?",
    "Write a haiku about autumn leaves.",
    "What are the primary colours?",
    "How does a bicycle work?",
    "What is the opposite of 'ancient'?",
    "Suggest a name for a pet dog.",
    "Explain why exercise is good for you.",
    "Why do leaves change color in autumn?",
    "Answer in one word: is ice cold or hot?",
    "How do you say 'thank you' in Spanish?",
    "What is a noun? Give two examples.",
    "Write a two-line rhyme about a mouse.",
    "What happens when water freezes?",
    "Give me a recipe for a simple salad.",
    "Who was Isaac Newton?",
    "What is 45 minus 18?",
    "Describe the city of London in three sentences.",
    "How do I stay calm before an exam?",
    "What is the smallest planet in the solar system?",
    "Explain the rules of tic-tac-toe.",
    "Write a thank-you note to a teacher.",
    "What are clouds made of?",
    "List the planets of the solar system in order.",
    "Why do leaves change colour in the autumn?",
    "What is a good way to save money?",
    "Tell me a fun fact about octopuses.",
    "What is the boiling point of water?",
    "Describe a busy market in the morning.",
    "What is the first letter of the word 'garden'?",
    "How does the moon affect the tides?",
    "Write a short dialogue between a shopkeeper and a customer.",
    "What is democracy?",
    "How do bees make honey?",
    "Give me three words that rhyme with 'light'.",
    "What is 9 plus 16?",
    "Explain what a map is used for.",
    "Why should we recycle?",
    "Describe the taste of a lemon.",
    "What is the main language spoken in Brazil?",
    "Write one sentence about friendship.",
)


def default_cache_dir() -> Path:
    """Where rendered calibration text goes when no Gram cache names a folder: the user's cache."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "slimserve" / "calibration"


def prepare_calibration(model_dir: str | Path, sources: str | Path | Sequence[str | Path], *,
                        cache_dir: str | Path | None = None, seed: int = 0, progress: bool = True) -> Path:
    """One calibration text file for ``sources`` (files, ``.jsonl`` chats, ``self:N``), rendered for ``model_dir``.

    A single plain text file is returned as is; anything else is rendered (chat templates applied,
    self turns generated or read from the cache) into ``cache_dir`` and that file's path returned.
    """
    items = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    if not items:
        raise CompressionError("no calibration sources given", field="--calib")
    if len(items) == 1 and not _is_chat(items[0]) and not items[0].startswith(SELF_PREFIX):
        return _existing_file(items[0])
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    parts = []
    for item in items:
        if item.startswith(SELF_PREFIX):
            turns = self_turns(model_dir, _self_count(item), cache_dir=cache, seed=seed, progress=progress)
            tokenizer = tokenizer or _chat_tokenizer(model_dir)
            parts.append(render_chats(tokenizer, turns))
        elif _is_chat(item):
            tokenizer = tokenizer or _chat_tokenizer(model_dir)
            parts.append(render_chats(tokenizer, read_chat_jsonl(_existing_file(item))))
        else:
            parts.append(_existing_file(item).read_text(encoding="utf-8"))
    text = "".join(parts)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    label = "+".join(_label(item) for item in items)[:80]
    path = cache / f"calib-{label}-{digest[:16]}.txt"
    if not path.is_file():
        _write_atomic(path, text)
    return path


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a chat JSONL file; a malformed line is reported with its file and line."""
    conversations = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise CompressionError(f"not valid JSON: {err.msg} at column {err.colno}", file=where) from None
        messages = item.get("messages") if isinstance(item, dict) else None
        if not isinstance(messages, list) or not messages:
            raise CompressionError("each line needs a non-empty 'messages' list", file=where, field="messages",
                                   expected='{"messages": [{"role": "user", "content": "..."}, ...]}')
        for index, message in enumerate(messages):
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise CompressionError(f"message {index} is not a role/content pair", file=where, field="messages",
                                       expected='{"role": "user", "content": "..."}')
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise CompressionError("no conversations", file=path, expected='one {"messages": [...]} object per line')
    return conversations


def render_chats(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]) -> str:
    """The conversations as the model reads them: each through the chat template, concatenated."""
    return "".join(tokenizer.apply_chat_template(list(c), tokenize=False) for c in conversations)


def self_turns(model_dir: str | Path, count: int, *, cache_dir: str | Path, seed: int = 0,
               max_new_tokens: int = SELF_MAX_NEW_TOKENS, progress: bool = True) -> list[list[dict[str, str]]]:
    """``count`` single-turn conversations written by the model itself, read from the cache when there.

    The cache file (chat JSONL) is keyed by the model folder, ``count``, ``seed``, the prompts and
    the sampling settings, so any change regenerates.
    """
    settings = {"model": str(Path(model_dir).resolve()), "count": count, "seed": seed, "prompts": SELF_PROMPTS,
                "max_new_tokens": max_new_tokens, "temperature": SELF_TEMPERATURE, "top_p": SELF_TOP_P,
                "batch": SELF_BATCH}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"self-{count}-seed{seed}-{key}.jsonl"
    if path.is_file():
        return read_chat_jsonl(path)
    turns = generate_self_turns(model_dir, count, seed=seed, max_new_tokens=max_new_tokens, progress=progress)
    _write_atomic(path, "".join(json.dumps({"messages": t}, ensure_ascii=False) + "\n" for t in turns))
    return turns


def generate_self_turns(model_dir: str | Path, count: int, *, seed: int = 0,
                        max_new_tokens: int = SELF_MAX_NEW_TOKENS, progress: bool = True) -> list[list[dict[str, str]]]:
    """Sample the dense model's replies to the first ``count`` built-in prompts (cycled), in float32 on CPU.

    Deterministic for a seed: the global torch RNG is seeded inside a forked RNG state (the
    caller's is left as it was) and the batches run in a fixed order.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = _chat_tokenizer(model_dir)
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    if tokenizer.pad_token is None:  # padded positions are masked out, so any token serves
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = [SELF_PROMPTS[i % len(SELF_PROMPTS)] for i in range(count)]
    turns = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for start in tqdm(range(0, count, SELF_BATCH), desc=f"self-calibration ({count} turns)",
                          disable=not progress):
            batch = prompts[start:start + SELF_BATCH]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in batch]
            encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            output = model.generate(**encoded, do_sample=True, temperature=SELF_TEMPERATURE, top_p=SELF_TOP_P,
                                    top_k=0, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
            for prompt, row in zip(batch, output[:, encoded.input_ids.shape[1]:]):
                reply = tokenizer.decode(row, skip_special_tokens=True).strip()
                turns.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])
    return turns


def _chat_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.chat_template is None:
        raise CompressionError("chat calibration (a .jsonl file or self:N) needs the model's chat template, and "
                               "its tokenizer has none", file=model_dir, field="--calib",
                               expected="an instruct model, or plain text files")
    return tokenizer


def _self_count(item: str) -> int:
    count = item[len(SELF_PREFIX):]
    if not count.isdigit() or int(count) <= 0:
        raise CompressionError(f"{item!r}: self-generated calibration is written self:N with N a positive number "
                               "of chat turns", field="--calib")
    return int(count)


def _is_chat(item: str) -> bool:
    return item.lower().endswith(".jsonl")


def _existing_file(item: str) -> Path:
    path = Path(item)
    if not path.is_file():
        raise CompressionError(f"--calib {item}: calibration file not found", field="--calib")
    return path


def _label(item: str) -> str:
    name = item.replace(":", "") if item.startswith(SELF_PREFIX) else Path(item).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
