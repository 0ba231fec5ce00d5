"""Bad inputs across every command, as a table: exit 2, one `error:` line naming the problem, no traceback,
nothing written where the command would write.

Rows run the CLI in-process on a tiny random Llama saved to a folder (the embedded tokenizer, so the corpora
tokenize as for the real model), on the embedded model only where its width matters, and on damaged copies of
a sliced tiny model. `{name}` in a row's argv is a path from `places`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from mechslice.checks import available_memory
from mechslice.cli import main
from mechslice.commands.trace import TRACE_BYTES_PER_SCORE, check_trace_memory
from mechslice.errors import MechsliceError
from mechslice.loading import load_model
from tests.conftest import tiny_llama_config

TINY_CONTEXT = 512  # the sweep's probe windows are 512 tokens
LONG_TEXT = " ".join(["the river runs past seven quiet mountains"] * 100)  # about 700 tokens
NO_SUCH_GPU = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine
FIT_ROWS = ("--calib-samples", "2", "--calib-seqlen", "32")
TINY_SWEEP = [
    "sweep", "--quick", "--device", "cpu", "--dtype", "float32", "--sparsities", "0,0.25", "--tasks", "ppl",
    *FIT_ROWS, "--seqlen", "64", "--max-tokens", "256", "--probe-tokens", "512", "--no-report",
]  # fmt: skip

# (argv, a phrase the error line must hold); slow rows are wrapped in pytest.param(..., marks=slow)
ROWS: list = [
    # --device, --dtype, --model: shared by every model command
    (["info", "--model", "{tiny}", "--device", "tpu"], "unknown device 'tpu'"),
    (["info", "--model", "{tiny}", "--device", NO_SUCH_GPU], f"'{NO_SUCH_GPU}'"),
    pytest.param(
        ["info", "--model", "{tiny}", "--device", "cuda"],
        "no CUDA GPU",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
    ),
    (["ppl", "--model", "{tiny}", "--device", NO_SUCH_GPU], "cuda"),
    (["sweep", "--model", "{tiny}", "--device", "tpu", "--out", "{tmp}/o"], "unknown device"),
    (["info", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["sweep", "--dtype", "float8", "--out", "{tmp}/o"], "invalid choice: 'float8'"),
    (["info", "--model", "no-such-model"], "neither a known name"),
    (["info", "--model", "{file}"], "not a GGUF file"),
    (["info", "--model", "{tmp}"], "has no config.json"),
    (["info", "--model", "{tiny_missing}"], "missing: model.layers.1.mlp.down_proj.weight"),
    ([], "the following arguments are required: COMMAND"),
    # ppl
    (["ppl", "--model", "{tiny}", "--seqlen", "1"], "--seqlen 1 must lie in [2, 512]"),
    (["ppl", "--model", "{tiny}", "--seqlen", "100000"], "the model's context"),
    (["ppl", "--model", "{tiny}", "--seqlen", "abc"], "invalid int value: 'abc'"),
    (["ppl", "--model", "{tiny}", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["ppl", "--model", "{tiny}", "--seqlen", "64", "--corpus", "text:/no/such.txt"], "/no/such.txt"),
    (["ppl", "--model", "{tiny}", "--seqlen", "64", "--corpus", "bogus"], "unknown corpus 'bogus'"),
    (["ppl", "--model", "{tiny}", "--seqlen", "256", "--max-tokens", "100"], "smaller than one window"),
    (["ppl", "--model", "{tiny}", "--split", "bogus"], "invalid choice: 'bogus'"),
    # mc, lm-eval
    (["mc", "--model", "{tiny}", "--task", "bogus"], "unknown task 'bogus'"),
    (["mc", "--model", "{tiny}", "--task", "arc_easy", "--limit", "0"], "limit must be at least 1"),
    (["mc", "--model", "{tiny}", "--task", "arc_easy", "--data", "/no/such.jsonl"], "does not exist"),
    (["mc", "--model", "{tiny}"], "--task"),
    (["lm-eval", "--model", "{tiny}", "--tasks", "arc_easy", "--limit", "0"], "limit must be at least 1"),
    pytest.param(
        ["lm-eval", "--model", "{tiny}", "--tasks", "bogus"], "unknown lm-eval task", marks=pytest.mark.slow
    ),
    # slice
    (["slice", "--model", "{tiny}", "--sparsity", "abc", "--out", "{tmp}/o"], "invalid float value: 'abc'"),
    (["slice", "--model", "{tiny}", "--sparsity", "1.0", "--out", "{tmp}/o"], "sparsity must lie in"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.999", "--out", "{tmp}/o"], "leaves d' = 0"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--round-to", "0", "--out", "{tmp}/o"], "round_to"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2"], "--out"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--out", "{file}/o"], "is a file, not a folder"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--out", "{file}", "--overwrite"], "is a file"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--out", "{sliced}"], "exists; pass --overwrite"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--calib-samples", "0", "--calib-seqlen", "32", "--out", "{tmp}/o"], "at least 1 sample"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--calib-seqlen", "100000", "--out", "{tmp}/o"], "--calib-seqlen 100000"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--device-map", "/no/map.json", "--out", "{tmp}/o"], "device map"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--batch-size", "0", *FIT_ROWS, "--out", "{tmp}/o"], "--batch-size 0"),
    (["slice", "--model", "{tiny}", "--sparsity", "0.2", "--rotation", "bogus", "--out", "{tmp}/o"], "invalid choice"),
    # sweep: everything refused before the model is loaded or the dense model evaluated
    (["sweep", "--model", "{tiny}", "--sparsities", "0,abc", "--out", "{tmp}/o"], "not a comma-separated list"),
    (["sweep", "--model", "{tiny}", "--sparsities", "0.2,0.1", "--out", "{tmp}/o"], "strictly increasing"),
    (["sweep", "--model", "{tiny}", "--sparsities", "0,1.5", "--out", "{tmp}/o"], "must lie in [0, 1)"),
    (["sweep", "--model", "{tiny}", "--sparsities", ",", "--out", "{tmp}/o"], "the sparsity list is empty"),
    (["sweep", "--model", "{tiny}", "--tasks", "bogus", "--out", "{tmp}/o"], "unknown task(s) ['bogus']"),
    (["sweep", "--model", "{tiny}", "--estimators", "bogus", "--out", "{tmp}/o"], "unknown entropy estimator"),
    (["sweep", "--model", "{tiny}", "--estimators", "knn", "--out", "{tmp}/o"], "--include-knn"),
    (["sweep", "--model", "{tiny}", "--mc-limit", "0", "--out", "{tmp}/o"], "limit must be at least 1"),
    (["sweep", "--model", "{tiny}", "--probe-tokens", "100", "--out", "{tmp}/o"], "--probe-tokens 100"),
    (["sweep", "--model", "{tiny}", "--out", "{file}"], "is a file, not a folder"),
    (["sweep", "--model", "{tiny}", "--out", "{file}/o"], "is a file, not a folder"),
    (["sweep", "--model", "{tiny}", "--mc-backend", "bogus", "--out", "{tmp}/o"], "invalid choice"),
    ([*TINY_SWEEP, "--model", "{tiny}", "--out", "{sweep}"], "exists; pass --resume"),
    ([*TINY_SWEEP, "--model", "{tiny}", "--calib-seqlen", "1000", "--out", "{tmp}/o"], "--calib-seqlen 1000"),
    ([*TINY_SWEEP, "--model", "{tiny}", "--dtype", "bfloat16", "--resume", "--out", "{sweep}"], "computed in float32"),
    (["sweep", "--quick", "--probe-tokens", "512", "--out", "{tmp}/o"], "needs more tokens than the width d = 576"),
    # checked before the model is loaded: a model that does not exist is not reached
    (["slice", "--model", "no-such-model", "--sparsity", "0.2", "--out", "{file}/o"], "is a file"),
    (["slice", "--model", "no-such-model", "--sparsity", "0.2", "--batch-size", "0", "--out", "{tmp}/o"], "--batch-size 0"),
    (["sweep", "--model", "no-such-model", "--out", "{file}"], "is a file, not a folder"),
    (["sweep", "--model", "no-such-model", "--mc-limit", "0", "--out", "{tmp}/o"], "limit must be at least 1"),
    (["entropy", "--model", "no-such-model", "--html", "{file}/x.html"], "is a file"),
    (["mc", "--model", "no-such-model", "--task", "piqa", "--batch-size", "0"], "--batch-size 0"),
    (["trace", "--model", "no-such-model", "--batch-size", "0"], "--batch-size 0"),
    (["info", "--model", "no-such-model", "--device", "tpu"], "unknown device"),
    # trace
    (["trace", "--model", "{tiny}", "--text", ""], "--text is empty"),
    (["trace", "--model", "{tiny}", "--text", LONG_TEXT], "more than the model's context of 512"),
    (["trace", "--model", "{tiny}", "--seqlen", "1000"], "--seqlen 1000 must lie in [2, 512]"),
    (["trace", "--model", "{tiny}", "--text", "hi", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["trace", "--model", "{tiny}", "--text", "hi", "--layers", "99"], "layer index 99 is out of range"),
    (["trace", "--model", "{tiny}", "--text", "hi", "--stages", "bogus"], "unknown stage or hook 'bogus'"),
    (["trace", "--model", "{tiny}", "--seqlen", "64", "--max-tokens", "100000000"], "more than the"),
    (["trace", "--model", "{tiny}", "--text", "hi", "--corpus", "bogus"], "not allowed with argument"),
    # entropy, shift
    (["entropy", "--model", "{tiny}", "--estimators", "bogus"], "unknown entropy estimator"),
    (["entropy", "--model", "{tiny}", "--sparsities", "1.5", "--max-tokens", "128", "--seqlen", "64"], "sparsity"),
    (["entropy", "--model", "{tiny}", "--samples", "0", "--max-tokens", "128", "--seqlen", "64"], "--samples 0"),
    (["entropy", "--model", "{tiny}", "--max-tokens", "32", "--seqlen", "32", "--estimators", "gaussian", *FIT_ROWS], "raise --max-tokens above 64"),
    (["entropy", "--model", "{tiny}", "--max-tokens", "128", "--seqlen", "64", "--samples", "50", *FIT_ROWS], "raise --samples above 64"),
    (["entropy", "--model", "{tiny}", "--max-tokens", "128", "--seqlen", "64", "--html", "{file}/x.html"], "is a file, not a folder"),
    (["entropy", "--model", "{tiny}", "--max-tokens", "128", "--seqlen", "64", "--html", "{tmp}"], "is a folder"),
    (["entropy", "--model", "{tiny}", "--max-tokens", "128", "--seqlen", "64", "--calib-seqlen", "1000"], "--calib-seqlen 1000"),
    (["shift", "--model", "{tiny}", "--sparsity", "1.0", "--max-tokens", "128", "--seqlen", "64"], "sparsity must lie in"),
    (["shift", "--model", "{tiny}", "--sparsity", "0.2", "--batch-size", "0"], "--batch-size 0"),
    (["shift", "--model", "{tiny}", "--sparsity", "0.2", "--text", "a", *FIT_ROWS], "at least 2 tokens"),
    (["shift", "--model", "{tiny}", "--text", "hi"], "--sparsity"),
    # fit, predict, report
    (["fit", "/no/such/dir"], "does not exist"),
    (["fit", "{file}"], "is a file, not a results folder"),
    (["fit", "{sweep}/results.json"], "pass its folder {sweep}"),
    (["fit", "{tmp}"], "results.json not found"),
    (["fit", "{bad_json}"], "is not valid JSON"),
    (["fit", "{sweep}", "--acc-key", "bogus"], "invalid choice: 'bogus'"),
    (["predict", "--sparsity", "abc", "--from", "{sweep}"], "invalid float value: 'abc'"),
    (["predict", "--sparsity", "1.5", "--from", "{sweep}"], "sparsity must lie in [0, 1)"),
    (["predict", "--sparsity", "0.3", "--from", "/no/such"], "does not exist"),
    (["predict", "--sparsity", "0.3", "--from", "{file}"], "is a file"),
    (["predict", "--from", "{sweep}"], "--sparsity"),
    (["report", "/no/such"], "does not exist"),
    (["report", "{file}"], "is a file"),
    (["report", "{sweep}", "--out", "{file}/sub/r.html"], "is a file, not a folder"),
    (["report", "{sweep}", "--out", "{tmp}"], "is a folder"),
    (["report", "{sweep}", "--acc-key", "bogus"], "invalid choice"),
    # a sliced folder that was damaged after it was saved
    (["ppl", "--model", "{sliced_deleted}", "--seqlen", "64"], "sha256 does not match"),
    (["ppl", "--model", "{sliced_truncated}", "--seqlen", "64"], "sha256 does not match"),
    (["ppl", "--model", "{sliced_edited}", "--seqlen", "64"], "sha256 does not match"),
    (["ppl", "--model", "{sliced_width}", "--seqlen", "64"], "config.json"),
    (["ppl", "--model", "{sliced_no_record}", "--seqlen", "64"], "no slicing.json"),
    (["ppl", "--model", "{sliced_lost_file}", "--seqlen", "64"], "lacks model.safetensors"),
    (["ppl", "--model", "{old_deleted}", "--seqlen", "64"], "missing: model.layers.1.mlp.down_proj.weight"),
    (["ppl", "--model", "{old_truncated}", "--seqlen", "64"], "could not load sliced model folder"),
    (["ppl", "--model", "{old_width}", "--seqlen", "64"], "wrong shape"),
]  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `root` (hidden ones included) with its size and modification time: a write changes them."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


def _damage(src: Path, dst: Path, how: str, keep_checksums: bool = True) -> Path:
    """A copy of the sliced folder `src` at `dst`, damaged as `how` says (the ways the issue found)."""
    shutil.copytree(src, dst)
    weights, config, record = dst / "model.safetensors", dst / "config.json", dst / "slicing.json"
    if how == "deleted":
        tensors = load_file(weights)
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif how == "edited":  # same names and shapes, other numbers: only the checksum can tell
        tensors = load_file(weights)
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"] * 2
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "width":
        values = json.loads(config.read_text())
        values["hidden_size"] -= 8
        config.write_text(json.dumps(values))
    elif how == "no_record":
        record.unlink()
    elif how == "lost_file":
        weights.unlink()
    # "none": an intact copy
    if not keep_checksums and record.exists():  # a folder saved before checksums were recorded
        values = json.loads(record.read_text())
        values.pop("checksums")
        record.write_text(json.dumps(values))
    return dst


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model folder, a sliced copy, a finished tiny sweep, a plain file and damaged folders."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = load_model(device="cpu", dtype=torch.float32).tokenizer
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=TINY_CONTEXT)
    tiny = root / "tiny"
    LlamaForCausalLM(config).eval().save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    sliced, sweep = root / "sliced", root / "sweep"
    assert main(["slice", "--model", str(tiny), "--device", "cpu", "--sparsity", "0.25", *FIT_ROWS, "--out", str(sliced)]) == 0  # fmt: skip
    assert main([*TINY_SWEEP, "--model", str(tiny), "--out", str(sweep)]) == 0
    file, bad_json = root / "a-file.txt", root / "bad-json"
    file.write_text("not a folder\n")
    bad_json.mkdir()
    (bad_json / "results.json").write_text("{")
    missing = root / "tiny-missing"
    shutil.copytree(tiny, missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    out = {
        "tiny": tiny,
        "sliced": sliced,
        "sweep": sweep,
        "file": file,
        "bad_json": bad_json,
        "tiny_missing": missing,
    }
    for how in ("deleted", "truncated", "edited", "width", "no_record", "lost_file"):
        out[f"sliced_{how}"] = _damage(sliced, root / f"sliced-{how}", how)
    for how in ("deleted", "truncated", "width"):
        out[f"old_{how}"] = _damage(sliced, root / f"old-{how}", how, keep_checksums=False)
    return out


@pytest.mark.parametrize(("argv", "phrase"), ROWS)
def test_bad_input_is_one_error_line_and_writes_nothing(
    argv: list[str], phrase: str, places: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run one row in-process; the fixture folders and the row's own folder must be left as they were."""
    names = {k: str(v) for k, v in places.items()} | {"tmp": str(tmp_path)}
    args = [a.format(**names) for a in argv]
    capsys.readouterr()
    before = _tree(tmp_path), _tree(places["sweep"].parent)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ") and phrase.format(**names) in lines[0], lines[0]
    assert (_tree(tmp_path), _tree(places["sweep"].parent)) == before


def test_an_old_folder_without_checksums_still_loads(places: dict[str, Path], tmp_path: Path) -> None:
    old = _damage(places["sliced"], tmp_path / "old", "none", keep_checksums=False)
    new, legacy = (load_model(str(p), device="cpu", dtype=torch.float32) for p in (places["sliced"], old))
    assert "checksums" not in json.loads((old / "slicing.json").read_text())
    ids = torch.arange(16)[None]
    assert torch.equal(new.model(ids).logits, legacy.model(ids).logits)


def test_the_saver_records_a_checksum_per_file(places: dict[str, Path]) -> None:
    sliced = places["sliced"]
    sums = json.loads((sliced / "slicing.json").read_text())["checksums"]
    assert {"model.safetensors", "config.json"} <= set(sums)
    assert sums == {name: hashlib.sha256((sliced / name).read_bytes()).hexdigest() for name in sums}


def test_marginal_entropy_with_few_tokens_does_not_need_the_gaussian(
    places: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """32 tokens < d = 64: the Gaussian estimator could not run, the marginal one can, and is all that is asked."""
    argv = [
        "entropy",
        "--model",
        str(places["tiny"]),
        "--device",
        "cpu",
        "--max-tokens",
        "32",
        "--seqlen",
        "32",
    ]
    assert main([*argv, "--estimators", "marginal", "--sparsities", "0.25", *FIT_ROWS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 32 and set(out["sparsities"][0]["layers"][0]["estimators"]) == {"marginal"}


def test_warnings_speak_in_one_line(
    places: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Python warning reaches the user as one `warning: ...` line, without its category or source line."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: {LONG_TEXT[:200]}" for i in range(20)))
    argv = ["ppl", "--model", str(places["tiny"]), "--device", "cpu", "--corpus", f"text:{corpus}"]
    assert main([*argv, "--seqlen", "32", "--max-tokens", "10000000", "--json"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --max-tokens 10000000 exceeds the split's"), err


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: tens of seconds on a loaded machine
def test_argparse_error_in_a_real_process_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mechslice.cli", "slice", "--sparsity", "abc", "--out", "/tmp/never"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: argument --sparsity: invalid float value: 'abc'; see `mechslice slice --help`"
    ]


def test_a_trace_too_big_for_the_memory_left_is_refused(places: dict[str, Path]) -> None:
    """One window long enough that batch x heads x n^2 scores exceed the RAM available now: refused, not run."""
    lm = load_model(str(places["tiny"]), device="cpu", dtype=torch.float32)
    per_token_pair = lm.dims.h_attn * TRACE_BYTES_PER_SCORE
    n = math.isqrt(available_memory(torch.device("cpu")) // per_token_pair) + 1
    with pytest.raises(MechsliceError, match=r"GB for the attention scores, more than the .* GB available"):
        check_trace_memory(lm, torch.zeros((1, n), dtype=torch.long), batch_size=1)
    check_trace_memory(lm, torch.zeros((4, TINY_CONTEXT), dtype=torch.long), batch_size=4)  # what fits runs


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder, so none is unwritable for it")
def test_a_folder_without_write_permission_is_refused(
    places: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rows = [
        ["slice", "--model", str(places["tiny"]), "--sparsity", "0.2", "--out", str(locked / "o")],
        ["sweep", "--model", str(places["tiny"]), "--out", str(locked)],
        ["report", str(places["sweep"]), "--out", str(locked / "r.html")],
    ]
    for argv in rows:
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith("error: ") and list(locked.iterdir()) == []
