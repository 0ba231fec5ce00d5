"""Corpora: split rule, windows, calibration sampling, and refusals of bad corpora."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechslice.corpora import _wiki_articles, calibration_windows, eval_windows, load_corpus
from mechslice.errors import MechsliceError


def test_wiki_split_rule() -> None:
    articles = _wiki_articles()
    assert len(articles) > 9000
    test, train = load_corpus("wiki", "test"), load_corpus("wiki", "train")
    n_test = round(len(articles) * 0.1)
    assert test == "\n\n".join(articles[-n_test:])
    assert train.endswith(articles[-n_test - 1])
    assert articles[-n_test] not in train


def test_text_corpus_splits_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(20)), encoding="utf-8")
    assert load_corpus(f"text:{path}", "test") == "paragraph 18\n\nparagraph 19"
    assert load_corpus(f"text:{path}", "train").startswith("paragraph 0\n\nparagraph 1")


def test_wikitext2_raw_files(tmp_path: Path) -> None:
    (tmp_path / "wiki.test.raw").write_text(" = Valkyria = \n\n Senjō no Valkyria 3 \n", encoding="utf-8")
    assert "Valkyria" in load_corpus(f"wikitext2:{tmp_path}", "test")
    with pytest.raises(MechsliceError, match="no WikiText-2 train file"):
        load_corpus(f"wikitext2:{tmp_path}", "train")


def test_eval_windows_are_non_overlapping() -> None:
    ids = torch.arange(100)
    windows = eval_windows(ids, 16, max_tokens=50)
    assert windows.shape == (3, 16)
    assert torch.equal(windows.flatten(), torch.arange(48))


def test_calibration_windows_are_seeded(embedded) -> None:
    a = calibration_windows(embedded.tokenizer, n_samples=3, seqlen=32, seed=42)
    b = calibration_windows(embedded.tokenizer, n_samples=3, seqlen=32, seed=42)
    c = calibration_windows(embedded.tokenizer, n_samples=3, seqlen=32, seed=7)
    assert a.shape == (3, 32) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("text:/no/such/file.txt", "does not exist"),
        ("bogus", "unknown corpus"),
        ("wikitext2:/nowhere", "no WikiText-2"),
    ],
)
def test_bad_corpus_specs(spec: str, message: str) -> None:
    with pytest.raises(MechsliceError, match=message):
        load_corpus(spec)


def test_empty_corpus_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(MechsliceError, match="empty test split"):
        load_corpus(f"text:{path}")


def test_windows_bad_lengths() -> None:
    with pytest.raises(MechsliceError, match="at least 2 tokens"):
        eval_windows(torch.arange(10), 1)
    with pytest.raises(MechsliceError, match="smaller than one window"):
        eval_windows(torch.arange(100), 32, max_tokens=16)
    with pytest.raises(MechsliceError, match="fewer than one window"):
        eval_windows(torch.arange(10), 32)


def test_eval_windows_warn_when_max_tokens_exceeds_the_split() -> None:
    with pytest.warns(UserWarning, match="exceeds the split's 100 tokens"):
        windows = eval_windows(torch.arange(100), 32, max_tokens=1000)
    assert windows.shape == (3, 32)


def test_slicegpt_sampler_starts_at_documents_and_never_reuses_one(embedded) -> None:
    from mechslice.corpora import corpus_documents

    tok = embedded.tokenizer
    windows = calibration_windows(tok, n_samples=6, seqlen=256, seed=42)
    assert windows.shape == (6, 256) and torch.equal(
        windows, calibration_windows(tok, n_samples=6, seqlen=256)
    )
    starts = {}
    for i, doc in enumerate(corpus_documents("wiki", "train")):
        starts.setdefault(tuple(tok(doc, add_special_tokens=False)["input_ids"][:12]), i)
    firsts = [starts.get(tuple(w[:12].tolist())) for w in windows]
    assert None not in firsts and len(set(firsts)) == 6  # each window opens a different whole document
    offsets = calibration_windows(tok, n_samples=6, seqlen=256, sampler="offsets")
    assert not torch.equal(offsets, windows)
    with pytest.raises(MechsliceError, match="unknown calibration sampler"):
        calibration_windows(tok, n_samples=1, seqlen=8, sampler="bogus")
    with pytest.raises(MechsliceError, match="without reusing a document"):
        calibration_windows(tok, n_samples=100_000, seqlen=64)
