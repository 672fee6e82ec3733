"""``slimserve eval chat``: greedy chat answers from real vLLM, scored offline.

The model (a dense folder or a slimserve checkpoint, which vLLM loads through the slimserve
plugin's entry point, exactly as ``slimserve serve`` does) answers every question of a
questions file in one batched ``LLM.chat`` call: the model's chat template applied, greedy,
``max_tokens`` per answer. The scoring and the file format live in ``loaders/chat_eval.py``.

vLLM runs in a child process, which gives it the ``__main__`` guard its CPU workers need and
keeps the engine's global state out of the caller (a test, a benchmark that evaluates several
checkpoints in turn). Its engine core runs inside that child (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
unless the user sets otherwise: an offline batch gains nothing from a second process, and on two
cores the second process's start and polling cost about 28 s per evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.errors import CheckpointError, SlimserveError
from slimserve.loaders.chat_eval import Question, Tally, load_questions, score
from slimserve.loaders.config import read_json_object

DEFAULT_MAX_TOKENS = 24
# Questions and answers are short; the chat template's default system prompt is the longest part.
MAX_MODEL_LEN = 1024
# Environment defaults for a one-shot vLLM child, applied only where the user set nothing (as ``slimserve serve``).
# VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine core in the child itself rather than a second process: on 2
# cores the extra process (its own vLLM import, its polling) cost ~28 s per start at TP 1 (17 s against 45 s for a
# tiny model) and ~16 s at TP 2; the model runs through the same executor, workers and plugin either way.
_VLLM_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

_CHAT_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        args = json.load(f)
    llm = LLM(model=args["model"], dtype=args["dtype"], enforce_eager=True, max_model_len=args["max_model_len"],
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"])
    outs = llm.chat([[{"role": "user", "content": q}] for q in args["questions"]], params, use_tqdm=False)
    with open(sys.argv[2], "w") as f:
        json.dump([{"text": o.outputs[0].text, "tokens": len(o.outputs[0].token_ids),
                    "finish_reason": o.outputs[0].finish_reason} for o in outs], f)
"""


class ChatEvalError(SlimserveError):
    """vLLM could not produce the answers (the engine failed to start or crashed)."""


@dataclass(frozen=True)
class ChatEvalResult:
    """What ``eval chat`` prints and writes: the tallies, the settings and every answer."""

    model: str
    questions_file: str
    overall: Tally
    categories: dict[str, Tally]
    report: dict[str, Any]

    def describe(self) -> str:
        lines = [f"{self.model}: chat accuracy {self.overall.describe()} on {self.questions_file} "
                 f"(greedy, {self.report['settings']['max_tokens']} tokens, {self.report['settings']['dtype']}, "
                 f"{self.report['wall_s']:.0f} s)"]
        lines += [f"  {name:<12} {tally.describe()}" for name, tally in self.categories.items()]
        return "\n".join(lines)


def vllm_child_env() -> dict[str, str]:
    """The environment for a one-shot vLLM child process: this one's, plus the defaults it does not set."""
    return {**_VLLM_ENV_DEFAULTS, **os.environ}


def vllm_chat_answers(model_dir: str | Path, questions: list[str], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                      dtype: str = "float32", timeout: float | None = None) -> list[dict[str, Any]]:
    """Greedy single-turn chat replies from vLLM, one per question: text, token count, finish reason."""
    with tempfile.TemporaryDirectory(prefix="slimserve-chat-eval-") as tmp:
        args_path, out_path = Path(tmp) / "args.json", Path(tmp) / "answers.json"
        args_path.write_text(json.dumps({"model": str(model_dir), "questions": questions, "max_tokens": max_tokens,
                                         "dtype": dtype, "max_model_len": _max_model_len(model_dir)}))
        proc = subprocess.run([sys.executable, "-c", _CHAT_SCRIPT, str(args_path), str(out_path)], env=vllm_child_env(),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.is_file():
            raise ChatEvalError(f"vLLM exited with code {proc.returncode} before answering; its last output:\n"
                                f"{proc.stderr[-4000:]}", file=model_dir)
        return json.loads(out_path.read_text())


def evaluate_chat(model_dir: str | Path, questions_file: str | Path, *, out: str | Path | None = None,
                  max_tokens: int = DEFAULT_MAX_TOKENS, dtype: str = "float32", limit: int | None = None,
                  timeout: float | None = None) -> ChatEvalResult:
    """Answer every question (the first ``limit`` when given) with vLLM, score them, write ``out`` (JSON)."""
    questions = load_questions(questions_file)[:limit]
    _check_chat_template(model_dir)
    start = time.perf_counter()
    replies = vllm_chat_answers(model_dir, [q.question for q in questions], max_tokens=max_tokens, dtype=dtype,
                                timeout=timeout)
    wall = time.perf_counter() - start
    marks, overall, categories = score(questions, [r["text"] for r in replies])
    report = {
        "model": str(Path(model_dir).resolve()),
        "questions_file": str(Path(questions_file).resolve()),
        "questions_sha256": hashlib.sha256(Path(questions_file).read_bytes()).hexdigest(),
        "settings": {"max_tokens": max_tokens, "dtype": dtype, "decoding": "greedy", "limit": limit},
        "wall_s": wall,
        "overall": overall.as_dict(),
        "categories": {name: tally.as_dict() for name, tally in categories.items()},
        "answers": [_answer(q, r, m) for q, r, m in zip(questions, replies, marks)],
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return ChatEvalResult(model=Path(model_dir).name, questions_file=Path(questions_file).name, overall=overall,
                          categories=categories, report=report)


def _answer(question: Question, reply: dict[str, Any], correct: bool) -> dict[str, Any]:
    return {"id": question.id, "category": question.category, "question": question.question,
            "answers": list(question.answers), "match": question.match, "reply": reply["text"],
            "tokens": reply["tokens"], "finish_reason": reply["finish_reason"], "correct": correct}


def _check_chat_template(model_dir: str | Path) -> None:
    """Fail before starting vLLM when the tokenizer has no chat template (base models): nothing to chat with."""
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(str(model_dir)).chat_template is None:
        raise CheckpointError("the tokenizer has no chat template, so it cannot be evaluated as a chat model",
                              file=model_dir, expected="an instruct model (chat_template in tokenizer_config.json "
                                                       "or chat_template.jinja)")


def _max_model_len(model_dir: str | Path) -> int:
    config = read_json_object(Path(model_dir) / "config.json")
    return min(MAX_MODEL_LEN, int(config.get("max_position_embeddings") or MAX_MODEL_LEN))
