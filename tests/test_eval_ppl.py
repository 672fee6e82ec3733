"""``slimserve eval ppl``: token perplexity of dense models and slimserve checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimserve.errors import CompressionError
from slimserve.loaders.compress.run import compress
from slimserve.loaders.eval import METRIC, perplexity
from slimserve.server.cli import main


@pytest.fixture
def tiny(narrow_qwen3: Path) -> Path:
    return narrow_qwen3


@pytest.fixture
def text(text_file: Path) -> Path:
    """Held out: the narrow model is random, never trained on it."""
    return text_file


def test_ppl_of_lossless_checkpoint_equals_dense_and_compression_raises_it(tiny, text, tmp_path):
    dense = perplexity(tiny, text, seq_len=64, windows=2)
    lossless = compress(tiny, tmp_path / "r0", method="svd", ratio=0.0, progress=False)
    lossy = compress(tiny, tmp_path / "r6", method="svd", ratio=0.6, progress=False)
    assert dense.method == "dense" and dense.tokens == 128
    assert perplexity(lossless, text, seq_len=64, windows=2).perplexity == pytest.approx(dense.perplexity, rel=1e-5)
    compressed = perplexity(lossy, text, seq_len=64, windows=2)
    assert compressed.method.startswith("svd ratio=0.6")
    assert compressed.perplexity != pytest.approx(dense.perplexity, rel=1e-3)


def test_cli_names_the_metric(tiny, text, capsys):
    assert main(["eval", "ppl", str(tiny), "--text", str(text), "--seq-len", "32", "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert METRIC in out and "over 64 tokens" in out and out.startswith("dense:")
    assert main(["eval", "ppl", str(tiny), "--text", str(text), "--seq-len", "32", "--windows", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 32


def test_text_too_short_or_missing(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(CompressionError, match="need 4096"):
        perplexity(tiny, short)
    assert main(["eval", "ppl", str(tiny), "--text", str(tmp_path / "nope.txt")]) == 2


def test_rsparse_checkpoint_scores_its_sparse_forward_as_its_compressor_did(tiny, text, tmp_path):
    """The searched recipe's fitness (every token through R-Sparse's masks) is the compressor's number.

    ``eval ppl`` once reconstructed the dense W here and reported the dense model's perplexity.
    """
    from slimserve.loaders.compress.rsparse import RECIPE_FILE, compress_rsparse
    from slimserve.loaders.compress.rsparse_search import SearchSettings

    settings = SearchSettings(population=4, generations=1, group_size=7, windows=2, seq_len=64)
    ckpt = compress_rsparse(tiny, tmp_path / "rs", sparsity=0.5, calib=text, search=True, settings=settings,
                            progress=False, log=lambda _line: None)
    compressor = json.loads((ckpt / RECIPE_FILE).read_text())["search"]["best_ppl"]
    evaluated = perplexity(ckpt, text, seq_len=settings.seq_len, windows=settings.windows)
    dense = perplexity(tiny, text, seq_len=settings.seq_len, windows=settings.windows)
    assert evaluated.method == "rsparse sparsity=0.5"
    assert evaluated.perplexity == pytest.approx(compressor, rel=1e-5)
    assert evaluated.perplexity != pytest.approx(dense.perplexity, rel=1e-3)


def test_dictsparse_checkpoint_scores_its_sparse_product_like_its_dense_reconstruction(tiny, text, tmp_path):
    """The ELL coefficient gather runs on the model's [batch, seq, k] activations, not only on 2-D inputs."""
    from slimserve.loaders.checkpoint import densify, open_checkpoint

    ckpt = compress(tiny, tmp_path / "cospadi", method="cospadi", ratio=0.3, calib=text, calib_samples=4,
                    calib_seq_len=128, progress=False)
    assert "dictsparse" in {spec["scheme"] for spec in open_checkpoint(ckpt).modules.values()}
    sparse = perplexity(ckpt, text, seq_len=64, windows=2).perplexity
    dense = perplexity(densify(ckpt, tmp_path / "dense"), text, seq_len=64, windows=2).perplexity
    assert sparse == pytest.approx(dense, rel=1e-4)


@pytest.mark.slow
def test_real_smollm2_dense_perplexity_matches_assets_note():
    """docs/methods/assets.md: 22.7 measured on Pride and Prejudice (8 x 512 tokens, BOS first)."""
    from slimserve.loaders.assets import austen_text, smollm2_folder

    result = perplexity(smollm2_folder(), austen_text("prideprejudice"))
    assert result.perplexity == pytest.approx(22.7, rel=0.02)
