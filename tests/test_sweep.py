"""The sweep: records per sparsity, atomic results, resume that recomputes nothing finished, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from analyses.predictors import dense_prediction
from analyses.results import RESULTS_FILE as RESULTS
from analyses.sweep import SweepSettings, run_sweep, settings_from
from mechslice.cli import main
from mechslice.errors import MechsliceError
from mechslice.precision import dtype_name, resolve_dtype
from tests.conftest import DEAD_PID, sweep_settings


def test_sweep_records_and_resume(
    tiny_folder: Path, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = sweep_settings(corpus)
    results = run_sweep(settings, tmp_path, str(tiny_folder), "cpu", progress=False, log=lambda _: None)
    records = results["records"]
    assert [r["sparsity"] for r in records] == [0.0, 0.25, 0.5]
    assert [r["d_prime"] for r in records] == [64, 48, 32]
    assert records[0]["effective_sparsity"] == 0.0 and records[0]["shift"]["overall"]["kl"] == pytest.approx(
        0
    )
    assert records[2]["shift"]["overall"]["kl"] > 0
    assert all(len(r["entropy"]["gaussian"]["ratio_per_layer"]) == 2 for r in records)
    # The stated signal: the mean over the layers it names (issue 12, defect 3), on the normalised stream
    # (defect 4), with the effective-rank ratio beside it; the dense record compares a stream with itself.
    for rec in records[1:]:
        entropy, g = rec["entropy"], rec["entropy"]["gaussian"]
        assert entropy["stream"] == "normalised" and entropy["d_sliced_per_layer"] == [rec["d_prime"], 64]
        used = [g["ratio_per_layer"][int(k)] for k in g["ratio_layers"]]
        assert g["ratio_mean"] == pytest.approx(sum(used) / len(used))
        assert sorted(g["ratio_layers"] + list(g["excluded_layers"])) == ["0", "1"]
        assert len(g["unit_sensitivity_per_layer"]) == 2
        assert 0 < entropy["effective_rank"]["ratio_mean"] < 1.5
    assert records[0]["entropy"]["gaussian"]["ratio_mean"] == pytest.approx(1.0)
    spectra = json.loads((tmp_path / records[1]["spectra_file"]).read_text())
    assert {row["name"] for row in spectra} >= {"resid_pre.0", "resid_mid.1", "resid_final"}
    assert all(len(row["eigenvalues"]) == 64 for row in spectra)
    on_disk = json.loads((tmp_path / RESULTS).read_text())
    assert on_disk["records"] == records
    # the default dtype, auto, is recorded as what it resolved to on this machine
    assert on_disk["settings"]["dtype"] == dtype_name(resolve_dtype("auto", "cpu")[0])
    # The dense record keeps each layer's covariance spectrum of the normalised stream, what the dense-only
    # predictor reads: every normalised token has squared norm d = 64, so a spectrum sums to at most 64 n/(n-1).
    dense_spectra = records[0]["stream_spectra"]
    assert dense_spectra["stream"] == "normalised" and dense_spectra["tokens"] == 128
    assert [len(lam) for lam in dense_spectra["eigenvalues"]] == [64, 64]
    assert all(0 < sum(lam) <= 64 * 128 / 127 + 1e-9 for lam in dense_spectra["eigenvalues"])
    at_25, at_50 = dense_prediction(on_disk).points
    assert (at_25.d_prime, at_50.d_prime) == (48, 32)
    assert at_50.ln_ppl_measured == pytest.approx(math.log(records[2]["ppl"]))
    assert at_50.detail["excluded"]["1"] == "not sliced (d' = d)"  # the head is left at width d
    # A folder without them: one clear line; with --model, one pass measures them as the sweep did.
    del on_disk["records"][0]["stream_spectra"]
    (tmp_path / RESULTS).write_text(json.dumps(on_disk))
    argv = ["predict", "--method", "dense", "--from", str(tmp_path), "--json"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: no dense spectra in {tmp_path}/{RESULTS}")
    assert main([*argv, "--model", str(tiny_folder), "--device", "cpu"]) == 0
    remeasured = json.loads(capsys.readouterr().out)["points"]
    assert [p["ln_ppl"] for p in remeasured] == pytest.approx([at_25.ln_ppl, at_50.ln_ppl], rel=1e-9)

    # An interrupted run: the last sparsity never finished. Resuming recomputes only that one.
    on_disk["records"] = records[:2]
    (tmp_path / RESULTS).write_text(json.dumps(on_disk))
    messages: list[str] = []
    resumed = run_sweep(
        settings, tmp_path, str(tiny_folder), "cpu", resume=True, progress=False, log=messages.append
    )
    assert resumed["records"][:2] == records[:2]  # finished records untouched, timings included
    assert resumed["records"][2]["sparsity"] == 0.5
    assert "2 sparsities already" in messages[0]
    assert not list(tmp_path.glob(".*.tmp"))

    with pytest.raises(MechsliceError, match="pass --resume"):
        run_sweep(settings, tmp_path, str(tiny_folder), "cpu", progress=False, log=lambda _: None)
    with pytest.raises(MechsliceError, match="other settings"):
        run_sweep(
            sweep_settings(corpus, ppl_seqlen=32),
            tmp_path,
            str(tiny_folder),
            "cpu",
            resume=True,
            progress=False,
        )


def test_resume_refuses_another_model(tiny_folder: Path, corpus: str, tmp_path: Path) -> None:
    settings = sweep_settings(corpus, sparsities=(0.0,))
    run_sweep(settings, tmp_path, str(tiny_folder), "cpu", progress=False, log=lambda _: None)
    results = json.loads((tmp_path / RESULTS).read_text())
    results["model_fingerprint"] = "0000000000000000"
    (tmp_path / RESULTS).write_text(json.dumps(results))
    with pytest.raises(MechsliceError, match="made with model"):
        run_sweep(settings, tmp_path, str(tiny_folder), "cpu", resume=True, progress=False)


def test_dtype_setting_runs_refuses_another_dtype_and_old_files_resume(
    tiny_folder: Path, corpus: str, tmp_path: Path
) -> None:
    def sweep(out: str, resume: bool = False, **kw: object) -> list[dict]:
        settings = sweep_settings(corpus, **kw)
        return run_sweep(settings, tmp_path / out, str(tiny_folder), "cpu", resume, False, lambda _: None)[
            "records"
        ]

    fp32 = sweep("fp32", sparsities=(0.0,), dtype="float32")
    bf16 = sweep("bf16", sparsities=(0.0, 0.5), dtype="bfloat16")
    # bfloat16 weights (8 mantissa bits) move a random model's perplexity a little, never exactly nothing
    assert bf16[0]["ppl"] != fp32[0]["ppl"] and bf16[0]["ppl"] == pytest.approx(fp32[0]["ppl"], rel=0.05)
    assert bf16[1]["d_prime"] == 32 and math.isfinite(bf16[1]["ppl"])
    results = json.loads((tmp_path / "fp32" / RESULTS).read_text())
    assert results["settings"]["dtype"] == "float32"
    with pytest.raises(
        MechsliceError, match="computed in bfloat16, this run would compute in float32; pass "
    ):
        sweep("bf16", resume=True, sparsities=(0.0, 0.5), dtype="float32")
    # a file written before the dtype setting existed was made in float32, the old default: it resumes as such
    del results["settings"]["dtype"]
    (tmp_path / "fp32" / RESULTS).write_text(json.dumps(results))
    with pytest.raises(MechsliceError, match=r"computed in float32, .* pass --dtype float32 to resume"):
        sweep("fp32", resume=True, sparsities=(0.0,), dtype="bfloat16")
    assert sweep("fp32", resume=True, sparsities=(0.0,), dtype="float32") == fp32


def test_a_file_that_predates_the_faithfulness_settings_resumes_only_as_what_it_was(
    tiny_folder: Path, corpus: str, tmp_path: Path
) -> None:
    settings = sweep_settings(corpus, sparsities=(0.0,), dtype="float32")
    first = run_sweep(settings, tmp_path, str(tiny_folder), "cpu", progress=False, log=lambda _: None)
    results = json.loads((tmp_path / RESULTS).read_text())
    for key in ("slice_head", "calib_sampler", "entropy_stream", "include_knn"):
        del results["settings"][key]  # as written before the faithfulness fixes
    (tmp_path / RESULTS).write_text(json.dumps(results))
    # the old code sliced the head, drew calibration at offsets and measured entropy on the raw stream: a
    # default run would mix those numbers with today's, so it is refused, naming every such setting
    with pytest.raises(MechsliceError, match="calib_sampler, entropy_stream, include_knn, slice_head"):
        run_sweep(settings, tmp_path, str(tiny_folder), "cpu", resume=True, progress=False)
    old = sweep_settings(
        corpus,
        sparsities=(0.0,),
        dtype="float32",
        slice_head=True,
        calib_sampler="offsets",
        entropy_stream="raw",
        include_knn=True,
    )
    again = run_sweep(old, tmp_path, str(tiny_folder), "cpu", resume=True, progress=False, log=lambda _: None)
    assert again["records"] == first["records"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "float8"}, "unknown dtype"),
        ({"sparsities": ()}, "empty"),
        ({"sparsities": (0.2, 0.1)}, "strictly increasing"),
        ({"sparsities": (0.0, 1.0)}, r"lie in \[0, 1\)"),
        ({"tasks": ("ppl", "no_such_task")}, "unknown task"),
        ({"estimators": ("entropy-o-meter",)}, "unknown entropy estimator"),
    ],
)
def test_badsweep_settings(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(MechsliceError, match=message):
        settings_from(SweepSettings(), **overrides)


def test_sweep_cli_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["sweep", "--sparsities", "0.3,0.1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: sparsities must be strictly increasing")
    assert main(["sweep", "--tasks", "ppl,nope", "--out", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_sweep_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real model through the whole pipeline: slice, perplexity, a task, entropy, shift, fits, report."""
    # Two sparsities beside the dense model: the fewest a law can be fitted on (one leaves no residual dof).
    argv = ["sweep", "--quick", "--sparsities", "0,0.15,0.3", "--tasks", "ppl,arc_easy", "--mc-limit", "8"]
    argv += [
        "--max-tokens",
        "1024",
        "--calib-samples",
        "4",
        "--probe-tokens",
        "1024",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = json.loads((tmp_path / RESULTS).read_text())["records"]
    assert records[-1]["d_prime"] == 400 and records[-1]["ppl"] > records[0]["ppl"] > 1
    assert records[-1]["tasks"]["arc_easy"]["n"] == 8
    assert Path(payload["report"]).exists() and Path(payload["fits"]).exists()
    assert payload["dtype"] == json.loads((tmp_path / RESULTS).read_text())["settings"]["dtype"] != "auto"


def test_leftovers_of_a_killed_sweep_are_removed_and_the_resumed_results_are_identical(
    tiny_folder: Path, corpus: str, tmp_path: Path
) -> None:
    """Killed while writing s = 0.25: a 0-byte and a half-written temp results file and a temp spectra file.
    The resumed run removes them, never reads them, and ends with exactly the uninterrupted run's numbers."""
    settings = sweep_settings(corpus, sparsities=(0.0, 0.25))

    def sweep(out: Path, resume: bool = False) -> list[dict]:
        records = run_sweep(settings, out, str(tiny_folder), "cpu", resume, False, lambda _: None)["records"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    whole = sweep(tmp_path / "whole")
    killed = tmp_path / "killed"
    (killed / "spectra").mkdir(parents=True)
    on_disk = json.loads((tmp_path / "whole" / RESULTS).read_text())
    (killed / RESULTS).write_text(json.dumps({**on_disk, "records": on_disk["records"][:1]}))
    stale = [
        killed / ".results.json.k3j5l2m1.tmp",
        killed / f".results.json.{DEAD_PID}-x1y2z3w4.tmp",
        killed / "spectra" / f".s0.250.json.{DEAD_PID}-q9w8e7r6.tmp",
    ]
    stale[0].write_text("")
    stale[1].write_text(json.dumps(on_disk)[:500])
    stale[2].write_text("[")
    with pytest.warns(UserWarning, match="leftover"):
        resumed = sweep(killed, resume=True)
    assert not any(p.exists() for p in stale)
    assert resumed == whole
    for name in ("spectra/s0.250.json",):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
