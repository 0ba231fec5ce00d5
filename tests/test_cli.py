"""CLI conventions: JSON output, exit 0 on success, exit 2 with one `error:` line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mechslice.cli import main
from mechslice.precision import dtype_name, resolve_dtype


@pytest.mark.slow
def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--dtype", "bfloat16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16"
    assert (info["d"], info["n_layers"], info["h_attn"], info["v"], info["h_dim"], info["m"]) == (
        576,
        30,
        9,
        3,
        64,
        1536,
    )
    assert all(row["matches"] for row in info["weights"])
    assert {row["symbol"] for row in info["weights"]} >= {
        "W_q",
        "W_k",
        "W_v",
        "W_o",
        "W_gate",
        "W_up",
        "W_down",
    }


@pytest.mark.slow
def test_ppl_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ppl", "--seqlen", "256", "--max-tokens", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("model", "dtype", "corpus", "split", "seqlen", "tokens", "nll", "ppl", "tokens_per_s"):
        assert key in out
    assert out["tokens"] == 2 * 255 and out["ppl"] > 1


def test_outputs_record_the_dtype_and_info_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    auto, why = resolve_dtype("auto", "cpu")  # bfloat16 on a CPU with bf16 units, float32 elsewhere
    assert main(["info", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["dtype"], info["dtype_reason"]) == (dtype_name(auto), why)
    assert main(["info", "--device", "cpu", "--dtype", "float32"]) == 0
    assert "dtype float32 (as asked)" in capsys.readouterr().out
    ppl = ["ppl", "--device", "cpu", "--seqlen", "64", "--max-tokens", "128", "--json"]
    for flags, expected in (([], dtype_name(auto)), (["--dtype", "float32"], "float32")):
        assert main([*ppl, *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["dtype"] == expected and out["tokens"] == 2 * 63


@pytest.mark.parametrize(
    "argv",
    [
        ["ppl", "--seqlen", "1"],
        ["ppl", "--seqlen", "100000"],
        ["ppl", "--seqlen", "256", "--max-tokens", "100"],
        ["ppl", "--corpus", "text:/no/such/file.txt"],
        ["info", "--model", "unknown-model"],
    ],
)
def test_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_process_exit_code_and_single_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mechslice.cli", "ppl", "--corpus", f"text:{empty}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_info_names_the_embedded_model_in_full(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--dtype", "float32", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model_description"] == "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float"
