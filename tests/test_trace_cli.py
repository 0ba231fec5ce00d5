"""`mechslice trace`, `entropy` and `shift` end to end on a tiny saved Llama; bad input gives one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from mechslice.cli import main
from mechslice.loading import _cached_embedded
from tests.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded tiny Llama with the embedded tokenizer's vocabulary, saved as a local model folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(tiny_llama_config(vocab_size=49152, max_position_embeddings=512)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(_cached_embedded("smollm2-135m")).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small seeded text corpus (blank-line paragraphs), so the commands need not tokenize the wiki split."""
    words = [
        "the",
        "a",
        "model",
        "layer",
        "token",
        "stream",
        "slice",
        "width",
        "entropy",
        "of",
        "in",
        "with",
        "keeps",
        "residual",
        "basis",
    ]
    rng = torch.Generator().manual_seed(0)
    paragraphs = [
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (120,), generator=rng)) + "."
        for _ in range(60)
    ]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return f"text:{path}"


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_trace_text_table_and_conformance(
    tiny_folder: str, corpus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _json(capsys, ["trace", "--model", tiny_folder, "--text", "The cat sat on the warm mat.", "--json"])
    assert len(p["stages"]) == 2 * 22
    assert p["conformance"]["passed"] and p["conformance"]["shared_d"] == [64]
    assert p["conformance"]["missing"] == [] and p["conformance"]["not_applicable"] == []
    assert p["tokens"] == p["stages"][0]["shape"][0]
    argv = ["trace", "--model", tiny_folder, "--corpus", corpus, "--max-tokens", "256", "--seqlen", "128"]
    assert main([*argv, "--layers", "1"]) == 0
    text = capsys.readouterr().out
    assert "conformance PASS" in text and "E_out" in text and "256 tokens traced" in text


def test_a_bfloat16_trace_checks_conformance_in_float32(
    tiny_folder: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # bfloat16 rounding alone (~1e-2) exceeds conformance's float32 tolerance; the check reloads in float32
    argv = ["trace", "--model", tiny_folder, "--text", "The cat sat on the warm mat.", "--json"]
    p = _json(capsys, [*argv, "--dtype", "bfloat16"])
    assert p["dtype"] == "bfloat16" and p["conformance"]["passed"]
    assert max(p["conformance"]["worst"].values()) <= p["conformance"]["rel_tol"] == 1e-4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "attn.hook_nope"], "unknown stage or hook 'attn.hook_nope'"),
        (["--layers", "7"], "layer index 7 is out of range; this model has layers 0..1"),
        (["--text", ""], "--text is empty"),
        (["--max-tokens", "100000000"], "--max-tokens 100000000 is more than the"),
    ],
)
def test_trace_bad_input(
    tiny_folder: str, corpus: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    source = [] if "--text" in argv else ["--corpus", corpus, "--seqlen", "64", "--max-tokens", "256"]
    assert main(["trace", "--model", tiny_folder, *source, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def _args(corpus: str) -> list[str]:
    return ["--corpus", corpus, "--calib-corpus", corpus, "--max-tokens", "512", "--seqlen", "128",
            "--calib-samples", "4", "--calib-seqlen", "128"]  # fmt: skip


def test_entropy_and_shift_commands(
    tiny_folder: str, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html = tmp_path / "entropy.html"
    argv = ["entropy", "--model", tiny_folder, *_args(corpus), "--sparsities", "0.25", "0.5", "--json"]
    p = _json(capsys, [*argv, "--estimators", "gaussian", "knn", "--include-knn", "--html", str(html)])
    assert [s["d_prime"] for s in p["sparsities"]] == [48, 32]
    layer = p["sparsities"][0]["layers"][0]  # layer 1, the last, feeds the unsliced head at full width
    assert layer["one_minus_s"] == 0.75 and set(layer["estimators"]) == {"gaussian", "knn"}
    assert html.read_text().count("plotly") > 3
    s = _json(capsys, ["shift", "--model", tiny_folder, *_args(corpus), "--sparsity", "0.25", "--json"])
    assert s["overall"]["tokens"] == 4 * 127 and s["overall"]["kl"] >= 0.0
    assert 0.0 <= s["overall"]["top1_agreement"] <= 1.0 and s["d_prime"] == 48


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--estimators", "histogram"], "unknown entropy estimator ['histogram']"),
        (["--estimators", "gaussian", "knn"], "pass include_knn (--include-knn)"),
        (["--samples", "5000"], "--samples 5000 is not in 1..512"),
        (["--sparsities", "1.5"], "sparsity must lie in [0, 1)"),
    ],
)
def test_entropy_bad_input(
    tiny_folder: str, corpus: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["entropy", "--model", tiny_folder, *_args(corpus), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_tracing_the_embedded_model_stays_within_2gb_of_the_model() -> None:
    # A fresh process, so that ru_maxrss is this trace's peak: 2048 tokens in 4x512 windows, every stage.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mechslice.cli",
            "trace",
            "--max-tokens",
            "2048",
            "--no-conformance",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    p = json.loads(out)
    assert p["tokens"] == 2048
    assert p["peak_rss_mb"] - p["rss_model_mb"] < 2048
