"""``slimserve eval chat``: questions file, normalisation, scoring, Wilson interval, and one real vLLM run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimserve.loaders.chat_eval import (
    SHIPPED_QUESTIONS,
    Question,
    QuestionsError,
    is_correct,
    load_questions,
    normalise,
    score,
    stated_number,
    wilson_interval,
)
from slimserve.testing.chat import hf_chat_reply, with_chat_template
from slimserve.testing.models import local_text


def _q(answers: list[str], match: str) -> Question:
    return Question(id="q", category="c", question="?", answers=tuple(answers), match=match)


def test_normalise_drops_case_punctuation_and_articles_and_is_idempotent() -> None:
    assert normalise("  The  Capital is PARIS!  ") == "capital is paris"
    assert normalise("an apple, a pear.") == "apple pear"
    for text in ["The Paris!", "“Quoted” — text…", "a", "H2O.", "New-Delhi"]:
        assert normalise(normalise(text)) == normalise(text)


def test_match_kinds() -> None:
    contains = _q(["Paris"], "contains")
    assert is_correct(contains, "The capital of France is Paris.")
    assert not is_correct(contains, "Parisian food is good")  # whole words only
    assert is_correct(_q(["New Delhi", "Delhi"], "contains"), "It is Delhi.")  # any alias
    exact = _q(["apple"], "exact")
    assert is_correct(exact, "Apple.") and is_correct(exact, "the apple")
    assert not is_correct(exact, "apple pie")
    numeric = _q(["7"], "numeric")
    for reply in ["7", "3 + 4 = 7.", "The answer is seven.", "7.0", "It is 7. Then 8 and 9."]:
        assert is_correct(numeric, reply), reply
    for reply in ["8", "no idea", "3 + 4 = 8. So 7"]:
        assert not is_correct(numeric, reply), reply
    assert stated_number("1,024 bytes") == 1024 and stated_number("-3.5 degrees") == -3.5


def test_wilson_interval_matches_reference_values() -> None:
    # Reference values of the Wilson score interval (z = 1.96) from the closed form in Wilson (1927).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    low, high = wilson_interval(180, 300)
    assert high - low == pytest.approx(0.110, abs=1e-3)  # the ±5.5 points at n = 300, p = 0.6


def test_score_tallies_by_category() -> None:
    questions = [Question("a", "x", "?", ("yes",), "exact"), Question("b", "y", "?", ("2",), "numeric"),
                 Question("c", "x", "?", ("no",), "exact")]
    marks, overall, categories = score(questions, ["Yes.", "3", "no"])
    assert marks == [True, False, True]
    assert (overall.correct, overall.total) == (2, 3)
    assert {k: (t.correct, t.total) for k, t in categories.items()} == {"x": (2, 2), "y": (0, 1)}


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "one JSON object"),
    ('{"id": "a", "category": "c", "question": "?", "answers": []}', "answers"),
    ('{"id": "a", "category": "c", "question": "", "answers": ["x"]}', "question"),
    ('{"id": "a", "category": "c", "question": "?", "answers": ["x"], "match": "fuzzy"}', "unknown match"),
    ('{"id": "a", "category": "c", "question": "?", "answers": ["seventy"], "match": "numeric"}', "not a number"),
    ('{"id": "a", "category": "c", "question": "?", "answers": ["the"]}', "empty once normalised"),
    ('{"id": "a", "category": "c", "question": "?", "answers": ["x"], "hint": "y"}', "unknown fields"),
])
def test_bad_questions_file_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('# comment\n{"id": "ok", "category": "c", "question": "?", "answers": ["x"]}\n\n' + line + "\n")
    with pytest.raises(QuestionsError, match=message) as err:
        load_questions(path)
    assert f"{path}:4" in str(err.value)


def test_duplicate_ids_and_empty_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    row = '{"id": "same", "category": "c", "question": "?", "answers": ["x"]}\n'
    path.write_text(row + row)
    with pytest.raises(QuestionsError, match=r"q.jsonl:2.*duplicate id 'same' \(first on line 1\)"):
        load_questions(path)
    path.write_text("\n# nothing\n")
    with pytest.raises(QuestionsError, match="no questions"):
        load_questions(path)


def test_shipped_questions_are_valid_and_reproducible() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_chat_questions", SHIPPED_QUESTIONS.with_name(
        "make_chat_questions.py"))
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert SHIPPED_QUESTIONS.read_text(encoding="utf-8") == generator.render()
    questions = load_questions(SHIPPED_QUESTIONS)
    counts = {c: sum(q.category == c for q in questions) for c in ("factual", "arithmetic", "instruction")}
    assert len(questions) >= 300 and min(counts.values()) >= 80, counts
    # Every question is answerable by its own accepted answer (the scorer accepts the reference).
    assert all(is_correct(q, q.answers[0]) for q in questions)


def test_package_data_ships_the_questions() -> None:
    import tomllib

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "data/*.jsonl" in config["tool"]["setuptools"]["package-data"]["slimserve.loaders"]


@pytest.mark.slow
def test_eval_chat_real_vllm(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI: vLLM's greedy chat answers score as transformers' templated greedy answers predict.

    The accepted answers of three questions are transformers' own replies and three others accept
    only a word the model never says, so the accuracy is 3/6 only if vLLM applied the chat template
    and decoded greedily exactly as the reference; the saved replies re-score to the same marks.
    """
    from slimserve.server.cli import main

    model = with_chat_template(tiny_llama, tmp_path / "chat_model")
    max_tokens = 4
    mine, never = [], []
    # The random model often emits half a UTF-8 character; its replies that decode cleanly are the references.
    for i, word in enumerate(sorted(set(local_text(0).split()))[::97][:80]):
        reply = hf_chat_reply(model, word, max_tokens)
        if len(mine) < 3 and normalise(reply) and "\ufffd" not in reply:
            mine.append({"id": f"q{i}", "category": "mine", "question": word, "answers": [reply], "match": "exact"})
        elif len(never) < 3:
            never.append({"id": f"q{i}", "category": "never", "question": word, "answers": ["unreachablezzz"],
                          "match": "exact"})
        if len(mine) == len(never) == 3:
            break
    assert len(mine) == len(never) == 3
    rows = mine + never
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"

    assert main(["eval", "chat", str(model), "--questions", str(questions), "--out", str(out),
                 "--max-tokens", str(max_tokens)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["overall"]["correct"] == 3 and report["overall"]["total"] == 6, report["answers"]
    assert report["categories"]["mine"]["correct"] == 3 and report["categories"]["never"]["correct"] == 0
    assert report["overall"]["ci95"] == pytest.approx(list(wilson_interval(3, 6)))
    assert "50.0 % (3/6" in printed
    loaded = load_questions(questions)
    rescored, overall, _ = score(loaded, [a["reply"] for a in report["answers"]])
    assert rescored == [a["correct"] for a in report["answers"]] and overall.correct == 3
    assert all(a["tokens"] <= max_tokens for a in report["answers"])


def test_eval_chat_refuses_a_model_without_chat_template(tiny_llama: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from slimserve.server.cli import main

    assert main(["eval", "chat", str(tiny_llama), "--questions", str(SHIPPED_QUESTIONS)]) == 2
    assert "no chat template" in capsys.readouterr().err
