"""``compress --calib`` sources: several files, chat JSONL through the chat template, and ``self:N`` turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimserve.errors import CompressionError
from slimserve.loaders.chat_eval import SHIPPED_QUESTIONS
from slimserve.loaders.checkpoint import open_checkpoint
from slimserve.loaders.compress import calib_sources
from slimserve.loaders.compress.calib_sources import (
    SELF_PROMPTS,
    generate_self_turns,
    prepare_calibration,
    read_chat_jsonl,
    render_chats,
    self_turns,
)
from slimserve.loaders.compress.calibration import calibration_spec, collect_grams, load_or_collect_grams
from slimserve.server.cli import main
from slimserve.testing.chat import TINY_CHAT_TEMPLATE, with_chat_template

SAMPLES, SEQ_LEN = 8, 64
CHATS = [[{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
          {"role": "assistant", "content": "Blue."}]]


@pytest.fixture(scope="module")
def chat_model(narrow_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(narrow_llama, tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def halves(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    text = text_file.read_text()
    folder = tmp_path_factory.mktemp("halves")
    first, second = folder / "a.txt", folder / "b.txt"
    first.write_text(text[: len(text) // 2])
    second.write_text(text[len(text) // 2:])
    return first, second, text


def test_one_plain_file_passes_through_unchanged(text_file: Path, narrow_llama: Path, tmp_path: Path) -> None:
    # Existing Gram caches (keyed by the file's bytes and name) stay valid.
    assert prepare_calibration(narrow_llama, [str(text_file)], cache_dir=tmp_path) == text_file
    assert not list(tmp_path.iterdir())
    with pytest.raises(CompressionError, match="missing.txt: calibration file not found"):
        prepare_calibration(narrow_llama, [str(tmp_path / "missing.txt")], cache_dir=tmp_path)


def test_several_files_equal_their_concatenation(narrow_llama: Path, halves: tuple[Path, Path, str],
                                                 tmp_path: Path) -> None:
    first, second, whole = halves
    rendered = prepare_calibration(narrow_llama, [first, second], cache_dir=tmp_path)
    assert rendered.parent == tmp_path and rendered.read_text() == whole
    joined = tmp_path / "joined.txt"
    joined.write_text(whole)
    grams, tokens = collect_grams(narrow_llama, rendered, samples=SAMPLES, seq_len=SEQ_LEN, progress=False)
    reference, reference_tokens = collect_grams(narrow_llama, joined, samples=SAMPLES, seq_len=SEQ_LEN,
                                                progress=False)
    assert tokens == reference_tokens and grams.keys() == reference.keys()
    for name in grams:
        torch.testing.assert_close(grams[name], reference[name], rtol=0, atol=0)
    # The cache key follows the text: another order or another file set is another key, the same set the same.
    spec = calibration_spec(narrow_llama, rendered, samples=SAMPLES, seq_len=SEQ_LEN, seed=0)
    swapped = prepare_calibration(narrow_llama, [second, first], cache_dir=tmp_path)
    tripled = prepare_calibration(narrow_llama, [first, second, first], cache_dir=tmp_path)
    keys = {calibration_spec(narrow_llama, p, samples=SAMPLES, seq_len=SEQ_LEN, seed=0).text_sha256
            for p in (rendered, swapped, tripled)}
    assert len(keys) == 3
    assert prepare_calibration(narrow_llama, [first, second], cache_dir=tmp_path) == rendered
    assert spec.text_name.startswith("calib-a+b-")


def test_chat_jsonl_is_rendered_with_the_template(chat_model: Path, narrow_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS) + "\n")
    assert read_chat_jsonl(chats) == CHATS
    rendered = prepare_calibration(chat_model, [chats], cache_dir=tmp_path / "cache")
    tokenizer = AutoTokenizer.from_pretrained(str(chat_model))
    expected = "".join(tokenizer.apply_chat_template(c, tokenize=False) for c in CHATS)
    assert rendered.read_text() == expected == render_chats(tokenizer, CHATS)
    assert rendered.read_text().startswith("<s>user\nWhat is the capital of France?</s>\n<s>assistant\nParis.</s>\n")
    # The template's special tokens reach the calibration windows as the special tokens themselves.
    assert tokenizer.bos_token_id in tokenizer(expected, add_special_tokens=False).input_ids
    # Another template renders another text, so the Gram cache computed under the first is not reused.
    other = with_chat_template(narrow_llama, tmp_path / "other", TINY_CHAT_TEMPLATE.replace("\n", ": ", 1))
    rerendered = prepare_calibration(other, [chats], cache_dir=tmp_path / "cache")
    assert rerendered.read_text() != rendered.read_text()
    specs = [calibration_spec(chat_model, p, samples=1, seq_len=8, seed=0) for p in (rendered, rerendered)]
    assert specs[0].text_sha256 != specs[1].text_sha256


def test_chat_sources_need_a_template_and_well_formed_lines(narrow_llama: Path, chat_model: Path,
                                                            tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    for source in (chats, "self:2"):
        with pytest.raises(CompressionError, match="needs the model's chat template"):
            prepare_calibration(narrow_llama, [source], cache_dir=tmp_path)
    for bad, message in [('{"messages": []}', "non-empty 'messages'"), ("[1]", "non-empty 'messages'"),
                         ('{"messages": [{"role": "user"}]}', "message 0 is not a role/content pair"),
                         ("{oops", "not valid JSON")]:
        chats.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + bad + "\n")
        with pytest.raises(CompressionError, match=message) as err:
            prepare_calibration(chat_model, [chats], cache_dir=tmp_path)
        assert f"{chats}:2" in str(err.value)
    for bad in ("self:0", "self:x", "self:"):
        with pytest.raises(CompressionError, match="self:N with N a positive number"):
            prepare_calibration(chat_model, [bad], cache_dir=tmp_path)


def test_self_turns_are_n_seeded_and_cached(chat_model: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    turns = generate_self_turns(chat_model, 10, seed=0, max_new_tokens=12, progress=False)
    assert len(turns) == 10
    assert [t[0] for t in turns] == [{"role": "user", "content": p} for p in SELF_PROMPTS[:10]]
    assert all(t[1]["role"] == "assistant" and t[1]["content"] for t in turns)
    assert generate_self_turns(chat_model, 10, seed=0, max_new_tokens=12, progress=False) == turns
    assert generate_self_turns(chat_model, 10, seed=1, max_new_tokens=12, progress=False) != turns
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched

    cached = self_turns(chat_model, 3, cache_dir=tmp_path, seed=0, max_new_tokens=12, progress=False)
    assert len(cached) == 3 and len(list(tmp_path.glob("self-3-seed0-*.jsonl"))) == 1

    def no_generation(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a cached self:N must not generate again")

    monkeypatch.setattr(calib_sources, "generate_self_turns", no_generation)
    assert self_turns(chat_model, 3, cache_dir=tmp_path, seed=0, max_new_tokens=12, progress=False) == cached
    with pytest.raises(AssertionError, match="must not generate"):  # another N is another cache entry
        self_turns(chat_model, 4, cache_dir=tmp_path, seed=0, max_new_tokens=12, progress=False)


def test_compress_cli_mixes_sources_and_records_them(chat_model: Path, text_file: Path, tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    cache = tmp_path / "cache" / "grams.safetensors"
    out = tmp_path / "out"
    args = ["compress", str(chat_model), str(out), "--method", "svd-llm", "--ratio", "0.3", "--calib",
            str(text_file), str(chats), "self:2", "--calib-cache", str(cache), "--calib-samples", str(SAMPLES),
            "--calib-seq-len", str(SEQ_LEN), "--quiet"]
    assert main(args) == 0
    calibration = open_checkpoint(out).quantization_config["producer"]["calibration"]
    assert calibration["text"].startswith("calib-calib+chats+self2-")
    rendered = cache.parent / calibration["text"]
    text = rendered.read_text()
    assert text.startswith(text_file.read_text()) and "<s>assistant\nParis.</s>" in text
    assert text.count("<s>user\n") == len(CHATS) + 2 and len(list(cache.parent.glob("self-2-seed0-*.jsonl"))) == 1
    # A rerun reuses the Gram cache: it was computed from the same rendered text.
    spec = load_or_collect_grams(chat_model, rendered, cache, samples=SAMPLES, seq_len=SEQ_LEN, progress=False).spec
    assert spec.text_sha256 == calibration["sha256"]


def test_self_calibration_prompts_are_not_scored_chat_questions() -> None:
    """Calibrating on a question `eval chat` scores would flatter the compressed model's accuracy."""
    scored = {json.loads(line)["question"].strip().lower() for line in SHIPPED_QUESTIONS.read_text().splitlines()}
    assert len(set(SELF_PROMPTS)) == len(SELF_PROMPTS)
    assert not scored & {prompt.strip().lower() for prompt in SELF_PROMPTS}
