"""Law fitting and prediction: the statistics, Props. 2 and 3 on synthetic sweeps, files, and the CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyses.chance import AT_CHANCE, at_chance_note
from analyses.fits import fit_line, loo_errors
from analyses.laws import (
    entropy_predictions,
    fit_results,
    law_points,
    ppl_from_entropy_ratio,
    predict,
    write_fits,
)
from analyses.paper import PAPER_TABLE3
from analyses.results import check_same_model, load_results
from mechslice.cli import main
from mechslice.errors import MechsliceError
from tests.conftest import law_results

D = 576
PPL0 = 12.0
ACC0 = {"arc_easy": 0.5, "piqa": 0.6, "hellaswag": 0.4}
SLOPES = {"ppl": -1.1, "arc_easy": -1.5, "piqa": -0.8, "hellaswag": -1.0}


def make_results(
    nominal: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), noise: float = 0.0, seed: int = 0
) -> dict[str, Any]:
    """A sweep of the d = 576 model following the laws exactly, plus optional noise (`law_results`)."""
    return law_results(nominal, D, PPL0, SLOPES["ppl"], ACC0, SLOPES, noise=noise, seed=seed)


def write_results(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


# ---------------------------------------------------------------- statistics


def test_exact_line_is_recovered_exactly() -> None:
    s = np.array([0.0, 0.1, 0.25, 0.3, 0.5])
    fit = fit_line(s, 0.96 - 1.08 * s)
    # Float64 least squares on O(1) numbers: errors are a few ulps, far below 1e-12.
    assert fit.a == pytest.approx(-1.08, abs=1e-12)
    assert fit.b == pytest.approx(0.96, abs=1e-12)
    assert fit.rmse < 1e-12 and fit.loo_rmse is not None and fit.loo_rmse < 1e-12
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.a_ci is not None and fit.a_ci[1] - fit.a_ci[0] < 1e-10


def test_noisy_line_true_values_inside_confidence_intervals() -> None:
    rng = np.random.default_rng(0)
    s = np.linspace(0.0, 0.5, 12)
    fit = fit_line(s, 1.0 - 1.1 * s + rng.normal(0.0, 0.02, size=s.shape))
    assert fit.a_ci is not None and fit.b_ci is not None
    assert fit.a_ci[0] < -1.1 < fit.a_ci[1]
    assert fit.b_ci[0] < 1.0 < fit.b_ci[1]
    assert fit.a != pytest.approx(-1.1, abs=1e-6)  # noise did move the estimate


def test_confidence_interval_coverage_uses_t_distribution() -> None:
    # With n=5 (3 dof) a normal quantile would cover only ~86%; t_{0.975,3} = 3.18 covers 95%.
    # 2000 seeded trials: binomial sd of the coverage ~0.5%, so [0.93, 0.97] is a 4-sigma band.
    rng = np.random.default_rng(1)
    s = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    hits = 0
    for _ in range(2000):
        fit = fit_line(s, 1.0 - s + rng.normal(0.0, 0.05, size=5))
        hits += fit.a_ci[0] < -1.0 < fit.a_ci[1]
    assert 0.93 < hits / 2000 < 0.97


def test_two_points_give_none_not_nan() -> None:
    fit = fit_line([0.0, 0.5], [1.0, 0.4])
    assert fit.a == pytest.approx(-1.2) and fit.b == pytest.approx(1.0)
    assert fit.a_ci is None and fit.b_ci is None and fit.sigma is None
    assert fit.loo_rmse is None and fit.loo_max_abs is None
    assert fit.prediction_interval(0.3) is None
    json.dumps(fit.to_dict(), allow_nan=False)  # raises on NaN or inf


def test_leave_one_out_by_hand() -> None:
    # (0,0),(1,1),(2,0): without (0,0) the line is y = 2 - s (predicts 2, error -2); without (1,1) it is y = 0
    # (error +1); without (2,0) it is y = s (predicts 2, error -2).
    assert loo_errors([0, 1, 2], [0, 1, 0]) == pytest.approx([-2.0, 1.0, -2.0])
    fit = fit_line([0, 1, 2], [0, 1, 0])
    assert fit.loo_rmse == pytest.approx(math.sqrt(3.0))
    assert fit.loo_max_abs == pytest.approx(2.0)


def test_leave_one_out_matches_hat_matrix_identity() -> None:
    # For least squares the LOO residual is e_i / (1 - h_ii), h_ii = 1/n + (s_i - mean)^2 / Sxx.
    rng = np.random.default_rng(2)
    s, y = rng.uniform(0, 0.6, 7), rng.normal(size=7)
    a, b = np.polyfit(s, y, 1)
    h = 1 / 7 + (s - s.mean()) ** 2 / np.sum((s - s.mean()) ** 2)
    assert loo_errors(s, y) == pytest.approx((y - (a * s + b)) / (1 - h), rel=1e-9)


def test_leave_one_out_undefined_when_a_fold_has_one_sparsity() -> None:
    assert loo_errors([0.0, 0.2, 0.2], [1.0, 0.8, 0.7]) is None


def test_prediction_interval_widens_away_from_data() -> None:
    rng = np.random.default_rng(3)
    s = np.linspace(0.0, 0.4, 6)
    fit = fit_line(s, 1.0 - s + rng.normal(0.0, 0.02, size=6))

    def width(x: float) -> float:
        lo, hi = fit.prediction_interval(x)
        assert lo < fit.predict(x) < hi
        return hi - lo

    s_mean = float(s.mean())
    assert width(s_mean) < width(0.4) < width(0.6) < width(0.9)
    # Symmetric about the mean sparsity.
    assert width(s_mean - 0.1) == pytest.approx(width(s_mean + 0.1), rel=1e-12)


def test_degenerate_inputs_are_refused() -> None:
    with pytest.raises(MechsliceError, match="two different sparsities"):
        fit_line([0.3, 0.3, 0.3], [1.0, 0.9, 0.8])
    with pytest.raises(MechsliceError, match="non-finite"):
        fit_line([0.0, 0.1], [1.0, float("nan")])


# ---------------------------------------------------------------- the laws


def test_fit_results_recovers_both_laws_on_effective_sparsity() -> None:
    table = fit_results(make_results())
    assert [r.dataset for r in table.rows] == ["ppl", "arc_easy", "piqa", "hellaswag"]
    for row in table.rows:
        assert row.fit.a == pytest.approx(SLOPES[row.dataset], abs=1e-10)
        assert row.fit.b == pytest.approx(1.0 if row.dataset == "ppl" else 0.0, abs=1e-10)
        assert row.fit.n == 6
    ppl = table.row("ppl")
    assert (ppl.points.s[0], ppl.points.y[0]) == (0.0, 1.0)  # the dense point is in the fit
    assert ppl.fit.s_max == pytest.approx(1 - 288 / 576)
    # Effective, not nominal: nominal 0.1 gives d' = 512 (multiple of 8), s = 1 - 512/576.
    assert ppl.points.s[1] == pytest.approx(1 - 512 / 576)
    assert table.row("arc_easy").paper["Llama-3-8B-Instruct"].a == -2.14
    assert table.row("hellaswag").paper == {}
    # The literal line y = 1 - s misses a slope of -1.1 by 0.1*s.
    expected = math.sqrt(np.mean((0.1 * ppl.points.s) ** 2))
    assert ppl.literal_rmse == pytest.approx(expected, rel=1e-9)


def test_acc_key_selects_acc_norm() -> None:
    table = fit_results(make_results(), acc_key="acc_norm")
    assert table.acc_key == "acc_norm"
    assert table.row("arc_easy").fit.a == pytest.approx(0.5 * SLOPES["arc_easy"], abs=1e-10)
    with pytest.raises(MechsliceError, match="accuracy key"):
        fit_results(make_results(), acc_key="f1")


def test_records_without_a_metric_are_left_out_and_undefined_ones_listed() -> None:
    results = make_results()
    results["records"][2]["ppl"] = None
    results["records"][3]["tasks"]["piqa"]["acc"] = 0.0
    assert len(law_points(results, "ppl").s) == 5
    piqa = law_points(results, "piqa")
    assert len(piqa.s) == 5 and piqa.excluded == [results["records"][3]["effective_sparsity"]]


def test_dataset_with_one_sparsity_is_skipped_not_fatal() -> None:
    results = make_results()
    for rec in results["records"][1:]:
        del rec["tasks"]["hellaswag"]
    table = fit_results(results)
    assert "hellaswag" in table.skipped
    assert [r.dataset for r in table.rows] == ["ppl", "arc_easy", "piqa"]


def _zero_acc(results: dict[str, Any], task: str, records: range) -> list[float]:
    """Set `task`'s acc to 0 (with the stderr 0 a rate gives) in `records`; return their sparsities."""
    for i in records:
        results["records"][i]["tasks"][task].update(acc=0.0, stderr=0.0)
    return [results["records"][i]["effective_sparsity"] for i in records]


def test_zero_accuracies_are_named_in_fits_and_a_one_point_task_cannot_be_fitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ARC-e loses two of five sparsities to acc = 0 (ln 0); PIQA keeps one: no residual dof, so no fit.
    results = make_results(noise=0.01)
    dropped = _zero_acc(results, "arc_easy", range(2, 4))
    _zero_acc(results, "piqa", range(1, 5))
    folder = write_results(tmp_path / "run", results)
    assert main(["fit", str(folder)]) == 0
    out = capsys.readouterr().out
    where = ", ".join(f"{s:.3f}" for s in dropped)
    note = f"s = {where} dropped (acc = 0, where ln(acc / acc0) is undefined); 3 of 5 sparsities > 0 have a"
    assert note in out
    assert (
        "skipped piqa: cannot be fitted: s = " in out and "1 of 5 sparsities > 0 has a defined value" in out
    )
    with (folder / "fits.csv").open() as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert rows["arc_easy"]["n_dropped"] == "2" and note in rows["arc_easy"]["dropped"]
    assert rows["piqa"]["a"] == "" and rows["piqa"]["not_fitted"].startswith("cannot be fitted: s = ")
    assert rows["ppl"]["n_dropped"] == "0" and rows["ppl"]["dropped"] == ""
    fits = json.loads((folder / "fits.json").read_text())
    assert fits["skipped"]["piqa"] == rows["piqa"]["not_fitted"]

    # predict offers no number for PIQA, says why, and names ARC-e's dropped points.
    assert main(["predict", "--sparsity", "0.35", "--from", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("piqa acc") for line in lines)
    assert any(line.startswith("piqa") and "cannot be fitted" in line for line in lines)
    assert any(note in line for line in lines)
    assert main(["predict", "--sparsity", "0.35", "--from", str(folder), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert "piqa" not in payload["tasks"] and payload["skipped"]["piqa"].startswith("cannot be fitted")
    assert note in payload["tasks"]["arc_easy"]["dropped"] and payload["ppl"]["dropped"] is None


def test_a_fit_whose_interval_would_have_zero_width_is_not_offered() -> None:
    # acc = 1 at every sparsity, stderr 0: every y is 0 with no sampling error and no scatter.
    results = make_results(noise=0.01)
    for rec in results["records"]:
        rec["tasks"]["piqa"].update(acc=1.0, stderr=0.0)
    table = fit_results(results)
    assert "piqa" not in [r.dataset for r in table.rows]
    assert table.skipped["piqa"].startswith("cannot be fitted: every point lies exactly on the line")


def test_write_fits_files_parse_with_paper_values(tmp_path: Path) -> None:
    table = fit_results(make_results(noise=0.01))
    json_path, csv_path = write_fits(table, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits.csv", "fits.json"]  # no temp file left
    with csv_path.open() as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["ppl", "arc_easy", "piqa", "hellaswag"]
    assert (
        float(rows["ppl"]["paper_llama3_8b_a"]) == -1.08 and float(rows["ppl"]["paper_phi3_mini_b"]) == 1.02
    )
    assert float(rows["piqa"]["paper_phi3_mini_rmse"]) == 0.01
    assert rows["hellaswag"]["paper_llama3_8b_a"] == ""
    assert float(rows["arc_easy"]["a"]) == pytest.approx(table.row("arc_easy").fit.a)
    assert rows["ppl"]["n_points"] == "6" and rows["ppl"]["dense_point_included"] == "yes"
    assert float(rows["ppl"]["a_ci_low"]) < float(rows["ppl"]["a"]) < float(rows["ppl"]["a_ci_high"])
    data = json.loads(json_path.read_text())
    assert data["dense_point_included"] is True and data["acc_key"] == "acc"
    assert data["rows"][0]["paper"]["Phi-3-mini-4k-Instruct"] == {"a": -0.90, "b": 1.02, "rmse": 0.01}
    assert data["rows"][0]["points"][0] == [0.0, 1.0]


def test_paper_table3_values() -> None:
    llama, phi = "Llama-3-8B-Instruct", "Phi-3-mini-4k-Instruct"
    expected = {
        "ppl": ((-1.08, 0.96, 0.03), (-0.90, 1.02, 0.01)),
        "arc_easy": ((-2.14, 0.04, 0.05), (-1.84, 0.04, 0.04)),
        "arc_challenge": ((-2.02, -0.07, 0.09), (-1.88, -0.01, 0.02)),
        "winogrande": ((-0.86, -0.02, 0.02), (-0.66, -0.02, 0.02)),
        "piqa": ((-0.91, -0.01, 0.03), (-0.90, 0.01, 0.01)),
    }
    got = {k: tuple((v[m].a, v[m].b, v[m].rmse) for m in (llama, phi)) for k, v in PAPER_TABLE3.items()}
    assert got == expected


# ---------------------------------------------------------------- validation


def test_load_results_errors(tmp_path: Path) -> None:
    with pytest.raises(MechsliceError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(MechsliceError, match="not found"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"model": "x", "records": [')
    with pytest.raises(MechsliceError, match="not valid JSON"):
        load_results(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop("model"), "not a sweep result"),
        (lambda r: r.update(records={}), "no 'records'"),
        (lambda r: r["records"][1].pop("effective_sparsity"), "effective_sparsity"),
        (lambda r: r["records"][1].update(effective_sparsity=1.0), "effective_sparsity"),
        (lambda r: r["records"][1].update(ppl="high"), "ppl"),
        (lambda r: r["records"][1].update(tasks=[1]), "tasks"),
        (lambda r: r["records"][1]["tasks"]["piqa"].update(acc=None), "non-number acc"),
        (lambda r: r["records"].pop(0), "0 dense records"),
    ],
)
def test_wrong_structure_is_refused(tmp_path: Path, mutate: Any, match: str) -> None:
    results = make_results()
    mutate(results)
    write_results(tmp_path, results)
    with pytest.raises(MechsliceError, match=match):
        load_results(tmp_path)


@pytest.mark.parametrize("nominal", [(0.0,), (0.0, 0.3)])
def test_fewer_than_two_sparsities_is_refused(nominal: tuple[float, ...]) -> None:
    # One sparsity beside the exact dense point leaves even the anchored line no residual degree of freedom.
    sliced = len(nominal) - 1
    with pytest.raises(MechsliceError, match=rf"fewer than two sparsities > 0 \(the sweep has {sliced}\)"):
        fit_results(make_results(nominal=nominal))


def test_check_same_model() -> None:
    results = make_results()
    check_same_model(results, "tiny", "f00d")
    with pytest.raises(MechsliceError, match="made with model 'tiny'"):
        check_same_model(results, "smollm2-135m", "f00d")
    with pytest.raises(MechsliceError, match="fingerprint"):
        check_same_model(results, "tiny", "beef")


# ---------------------------------------------------------------- prediction


def test_predict_inverts_the_fitted_laws() -> None:
    table = fit_results(make_results(noise=0.01, seed=4))
    out = predict(table, 0.35, table.ppl0, table.acc0s)
    ppl_fit = table.row("ppl").fit
    assert out["ppl"]["predicted"] == pytest.approx(
        math.exp(math.log(PPL0) / ppl_fit.predict(0.35)), rel=1e-12
    )
    lo, hi = out["ppl"]["interval"]
    assert lo < out["ppl"]["predicted"] < hi
    assert out["ppl"]["paper_law"] == pytest.approx(math.exp(math.log(PPL0) / 0.65), rel=1e-12)
    assert not out["ppl"]["extrapolated"]
    for task, acc0 in ACC0.items():
        entry = out["tasks"][task]
        assert entry["predicted"] == pytest.approx(
            acc0 * math.exp(table.row(task).fit.predict(0.35)), rel=1e-12
        )
        assert entry["interval"][0] < entry["predicted"] < entry["interval"][1] <= 1.0
    far = predict(table, 0.8, table.ppl0, table.acc0s)
    assert far["ppl"]["extrapolated"]
    near_y, far_y = out["ppl"]["y_interval"], far["ppl"]["y_interval"]
    assert far_y[1] - far_y[0] > near_y[1] - near_y[0]
    json.dumps(far, allow_nan=False)


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5, float("nan")])
def test_predict_refuses_sparsity_outside_unit_interval(s: float) -> None:
    table = fit_results(make_results())
    with pytest.raises(MechsliceError, match=r"sparsity must lie in \[0, 1\)"):
        predict(table, s, table.ppl0, table.acc0s)


def test_ppl_from_entropy_ratio_round_trip() -> None:
    for ppl in (12.0, 30.0, 400.0):
        ratio = math.log(PPL0) / math.log(ppl)
        assert ppl_from_entropy_ratio(PPL0, ratio) == pytest.approx(ppl, rel=1e-12)
    assert ppl_from_entropy_ratio(PPL0, 1.0) == pytest.approx(PPL0)
    assert ppl_from_entropy_ratio(PPL0, 1e-6) == math.inf
    with pytest.raises(MechsliceError, match="positive"):
        ppl_from_entropy_ratio(PPL0, 0.0)


def test_entropy_predictions_report_errors() -> None:
    results = make_results()
    records = results["records"]
    for rec in records:  # ratio equal to the law's y: exact prediction
        rec["entropy"] = {"gaussian": {"ratio_mean": math.log(PPL0) / math.log(rec["ppl"])}}
    records[2]["entropy"]["knn"] = {"ratio_mean": 0.5}
    del records[3]["entropy"]
    out = entropy_predictions(results)
    assert len(out["gaussian"]) == 5
    assert max(p.abs_error for p in out["gaussian"]) < 1e-12
    # kNN's bias depends on d, so its ratio is left out unless asked for.
    assert "knn" not in out
    (knn,) = entropy_predictions(results, include_knn=True)["knn"]
    measured = math.log(records[2]["ppl"])
    assert knn.ln_ppl_predicted == pytest.approx(2 * math.log(PPL0))
    assert knn.abs_error == pytest.approx(abs(2 * math.log(PPL0) - measured))
    assert knn.rel_error == pytest.approx(knn.abs_error / measured)


def test_entropy_prediction_leaves_out_sign_mixed_layers() -> None:
    # Defect 3: an old results file whose ratio_mean averaged every layer, one of them sign-mixed (H = -2,
    # H' = +1: ratio -0.5). The prediction now uses the mean over the other layers and names the one left out.
    results = make_results()
    sliced = results["records"][2]
    h_dense, h_sliced = [10.0, 8.0, -2.0, 6.0], [7.0, 6.0, 1.0, 4.8]
    ratios = [b / a for a, b in zip(h_dense, h_sliced, strict=True)]
    sliced["entropy"] = {
        "gaussian": {
            "per_layer_dense": h_dense,
            "per_layer": h_sliced,
            "ratio_per_layer": ratios,
            "ratio_mean": sum(ratios) / 4,
        }
    }
    (p,) = entropy_predictions(results)["gaussian"]
    assert p.ratio == pytest.approx((0.7 + 0.75 + 0.8) / 3)
    assert p.ln_ppl_predicted == pytest.approx(math.log(PPL0) / p.ratio)
    assert p.layers == ["0", "1", "3"] and p.excluded == {"2": "H and H' differ in sign"}
    # A record that says which layers kept their width d (the head left unsliced) leaves those out too.
    sliced["entropy"]["d_sliced_per_layer"] = [sliced["d_prime"]] * 3 + [sliced["d"]]
    (p,) = entropy_predictions(results)["gaussian"]
    assert p.layers == ["0", "1"] and p.excluded["3"] == "not sliced (d' = d)"


# ---------------------------------------------------------------- CLI


def test_cli_fit_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_results(tmp_path / "run", make_results(noise=0.01))
    results = json.loads((folder / "results.json").read_text())
    results["settings"]["dtype"] = "bfloat16"
    (folder / "results.json").write_text(json.dumps(results))
    assert main(["fit", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "(bfloat16; accuracy key: acc)" in text
    assert json.loads((folder / "fits.json").read_text())["dtype"] == "bfloat16"
    del results["settings"]["dtype"]
    (folder / "results.json").write_text(json.dumps(results))
    assert "arc_easy" in text and "-1.08 +0.96 0.03" in text and "dense model" in text
    assert (folder / "fits.csv").is_file() and (folder / "fits.json").is_file()

    assert main(["fit", str(folder), "--acc-key", "acc_norm", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    # these results predate the dtype setting: sweeps then ran in float32, and the fits say so
    assert payload["acc_key"] == "acc_norm" and payload["dtype"] == "float32"
    assert json.loads((folder / "fits.json").read_text())["acc_key"] == "acc_norm"

    assert main(["predict", "--sparsity", "0.35", "--from", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sparsity"] == 0.35 and set(out["tasks"]) == set(ACC0) and out["dtype"] == "float32"
    assert out["ppl"]["interval"][0] < out["ppl"]["predicted"] < out["ppl"]["interval"][1]
    assert main(["predict", "--sparsity", "0.35", "--from", str(folder)]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.json").write_text("{not json")
    single = write_results(tmp_path / "single", make_results(nominal=(0.0,)))
    good = write_results(tmp_path / "good", make_results())
    cases = [
        (["fit", str(tmp_path / "missing")], "does not exist"),
        (["fit", str(corrupt)], "not valid JSON"),
        (["fit", str(single)], "fewer than two sparsities"),
        (["predict", "--sparsity", "0.2", "--from", str(tmp_path / "missing")], "does not exist"),
        (["predict", "--sparsity", "0.2", "--from", str(corrupt)], "not valid JSON"),
        (["predict", "--sparsity", "0.2", "--from", str(single)], "fewer than two sparsities"),
        (["predict", "--sparsity", "1.0", "--from", str(good)], "sparsity must lie in [0, 1)"),
        (["predict", "--sparsity", "-0.2", "--from", str(good)], "sparsity must lie in [0, 1)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)


# ---------------------------------------------------------------- honest fit statistics

# Coverage bands: 2000 seeded trials give a binomial sd of the coverage of sqrt(0.95 * 0.05 / 2000) = 0.5%,
# so +-2% is a 4-sigma band around the nominal 95%. The accuracy band's top is 98%: with pure binomial
# scatter, the law's own scatter sigma^2 is floored at 0 where its estimate is negative and adds variance
# where it is positive, which errs wide (measured: 96-97%).
TRIALS = 2000
ACC_TOP = 0.98
NOMINAL_S = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def ppl_sweep(rng: np.random.Generator, sd: float) -> dict[str, Any]:
    """A perplexity-only sweep whose y = ln PPL0 / ln PPL is 1 + a*s plus normal noise off the dense point."""
    results = make_results()
    for rec in results["records"]:
        s, noise = rec["effective_sparsity"], rng.normal(0.0, sd)
        rec["tasks"] = {}
        rec["ppl"] = PPL0 if s == 0 else math.exp(math.log(PPL0) / (1.0 + SLOPES["ppl"] * s + noise))
    return results


def binomial_sweep(rng: np.random.Generator, n_items: int, acc0: float, slope: float) -> dict[str, Any]:
    """One task scored on `n_items` items per model, true accuracy acc0 * exp(slope * s), dense one included."""
    results = make_results()
    for rec in results["records"]:
        p = acc0 * math.exp(slope * rec["effective_sparsity"])
        hits = int(rng.binomial(n_items, p))
        acc = hits / n_items
        rec["ppl"] = None
        rec["tasks"] = {
            "arc_easy": {"acc": acc, "stderr": math.sqrt(acc * (1 - acc) / (n_items - 1)), "n": n_items}
        }
    return results


def test_dense_point_is_exact_and_the_anchored_fit_passes_through_it(tmp_path: Path) -> None:
    table = fit_results(make_results(noise=0.01))
    ppl = table.row("ppl")
    assert ppl.fit.n == 6 and ppl.fit.n_exact == 1
    assert ppl.fit.dof == 6 - 1 - 2  # the paper's two-parameter fit on five observations
    assert ppl.anchored.dof == 6 - 1 - 1 and ppl.anchored.b == 1.0 and ppl.anchored.b_ci is None
    assert table.row("piqa").anchored.b == 0.0
    exact = fit_results(make_results())
    for row in exact.rows:
        assert row.anchored.a == pytest.approx(SLOPES[row.dataset], abs=1e-10)
    _, csv_path = write_fits(table, tmp_path)
    with csv_path.open() as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert rows["ppl"]["dof"] == "3" and rows["ppl"]["anchored_dof"] == "4"
    assert float(rows["ppl"]["anchored_a"]) == pytest.approx(ppl.anchored.a)
    assert rows["ppl"]["sampling_error"] == "none" and rows["piqa"]["sampling_error"] == "stderr"
    data = json.loads((tmp_path / "fits.json").read_text())
    assert data["rows"][0]["dof"] == 3 and data["rows"][0]["anchored"]["a"] == pytest.approx(ppl.anchored.a)


def coverage(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def test_perplexity_law_intervals_have_nominal_coverage() -> None:
    """Counting the exact dense point as an observation miscalibrates the CI of a (98% on the original code)."""
    rng = np.random.default_rng(5)
    rows = [fit_results(ppl_sweep(rng, sd=0.03)).row("ppl") for _ in range(TRIALS)]
    assert 0.93 < coverage([r.fit.a_ci[0] < SLOPES["ppl"] < r.fit.a_ci[1] for r in rows]) < 0.97
    assert 0.93 < coverage([r.anchored.a_ci[0] < SLOPES["ppl"] < r.anchored.a_ci[1] for r in rows]) < 0.97


def test_accuracy_law_intervals_carry_binomial_errors_of_acc_and_acc0() -> None:
    """Simulated binomial scores on a known line: the CIs of a and b and the prediction interval cover ~95%.

    On the original code b's interval covered 100% (the shared acc0 error showed only as the dense residual).
    """
    rng = np.random.default_rng(6)
    slope, acc0, n_items, s_new = -1.5, 0.5, 500, 0.35
    tables = [fit_results(binomial_sweep(rng, n_items, acc0, slope)) for _ in range(TRIALS)]
    rows = [t.row("arc_easy") for t in tables]
    assert 0.93 < coverage([r.fit.a_ci[0] < slope < r.fit.a_ci[1] for r in rows]) < ACC_TOP
    assert 0.93 < coverage([r.fit.b_ci[0] < 0.0 < r.fit.b_ci[1] for r in rows]) < ACC_TOP
    hits = []
    for table in tables:  # a new model at s_new scored on the same number of items
        new_acc = rng.binomial(n_items, acc0 * math.exp(slope * s_new)) / n_items
        lo, hi = predict(table, s_new, None, table.acc0s)["tasks"]["arc_easy"]["interval"]
        hits.append(lo < new_acc < hi)
    assert 0.93 < coverage(hits) < ACC_TOP
    assert 0.93 < coverage([r.anchored.a_ci[0] < slope < r.anchored.a_ci[1] for r in rows]) < ACC_TOP


def test_sampling_error_widens_an_exact_line_by_the_delta_method() -> None:
    """Points exactly on the law leave no residual, but acc and acc0 were still measured with error."""
    results = make_results()  # every task: stderr 0.01, y exactly a*s
    row = fit_results(results).row("piqa")
    s = row.points.s
    X = np.column_stack([s, np.ones_like(s)])
    L = np.linalg.inv(X.T @ X) @ X.T
    accs = np.array([rec["tasks"]["piqa"]["acc"] for rec in results["records"]])
    own = np.where(s == 0, 0.0, (0.01 / accs) ** 2)  # Var(ln acc) = SE^2 / acc^2
    shared = (0.01 / ACC0["piqa"]) ** 2  # ln acc0, in every y but the dense one
    noisy = (s > 0).astype(float)
    var_a = float(L[0] ** 2 @ own + shared * (L[0] @ noisy) ** 2)
    half = 1.959963984540054 * math.sqrt(var_a)  # sigma^2 = 0 here: the sampling variance is all there is
    assert (row.fit.a_ci[1] - row.fit.a_ci[0]) / 2 == pytest.approx(half, rel=1e-9)  # original: ~1e-16
    assert row.fit.sigma == 0.0
    assert var_a > float(L[0] ** 2 @ own)  # acc0's shared error is part of it


@pytest.mark.parametrize(("keep", "sampling"), [(("n",), "n"), ((), "none")])
def test_old_results_without_stderr_still_fit(keep: tuple[str, ...], sampling: str) -> None:
    results = make_results(noise=0.01)
    for rec in results["records"]:
        for metrics in rec["tasks"].values():
            for key in ("stderr", "n"):
                if key not in keep:
                    metrics.pop(key)
    row = fit_results(results).row("arc_easy")
    assert row.points.sampling == sampling
    assert row.fit.a_ci is not None and (row.points.shared_var > 0) == (sampling == "n")
    if sampling == "n":  # the item count gives scoring.rate's standard error
        acc0 = results["records"][0]["tasks"]["arc_easy"]["acc"]
        assert row.points.shared_var == pytest.approx(acc0 * (1 - acc0) / 499 / acc0**2, rel=1e-12)


# ---------------------------------------------------------------- chance: the at-chance rule, the corrected law


def chance_sweep(
    acc0: dict[str, float], law: str, slope: float = -1.5, stderr: float = 0.01
) -> dict[str, Any]:
    """Four-choice tasks (chance 0.25, recorded) whose acc follows one form exactly: "paper" acc0 e^(a s), or
    "corrected" c + (acc0 - c) e^(a s)."""
    results = make_results()
    for rec in results["records"]:
        s = rec["effective_sparsity"]
        rec["tasks"] = {}
        for task, base in acc0.items():
            acc = base * math.exp(slope * s) if law == "paper" else 0.25 + (base - 0.25) * math.exp(slope * s)
            rec["tasks"][task] = {"acc": acc, "stderr": stderr, "n": 500, "chance": 0.25}
    return results


def test_a_task_at_chance_is_marked_and_one_clearly_above_is_not(tmp_path: Path, capsys) -> None:
    # ARC-c's acc0 0.26 is 1 standard error (0.013) from chance 0.25; ARC-e's 0.60 is 27 away.
    results = chance_sweep({"arc_easy": 0.60, "arc_challenge": 0.26}, "paper", stderr=0.013)
    table = fit_results(results)
    low, high = table.row("arc_challenge").chance, table.row("arc_easy").chance
    assert (
        low.at_chance.startswith(AT_CHANCE)
        and "within 3 standard errors, 0.039, of chance 0.250" in low.at_chance
    )
    assert low.fit is None and low.not_fitted == "the dense model is at chance"
    assert high.at_chance is None and high.fit is not None
    assert table.row("arc_challenge").fit.a == pytest.approx(-1.5)  # the paper's form is still fitted, marked
    folder = write_results(tmp_path / "run", results)
    assert main(["fit", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.count(AT_CHANCE) == 1 and "chance 0.250; at chance: the law cannot be read" in text
    rows = {r["dataset"]: r for r in csv.DictReader((folder / "fits.csv").open())}
    assert rows["arc_challenge"]["at_chance"].startswith(AT_CHANCE) and rows["arc_easy"]["at_chance"] == ""
    assert rows["arc_challenge"]["chance"] == "0.25" and rows["arc_challenge"]["corrected_a"] == ""
    fits = {r["dataset"]: r for r in json.loads((folder / "fits.json").read_text())["rows"]}
    assert fits["arc_challenge"]["chance"]["at_chance"].startswith(AT_CHANCE)
    assert fits["arc_easy"]["chance"]["at_chance"] is None


def test_at_chance_rule_edges() -> None:
    assert at_chance_note(0.2799, 0.01, 0.25) is not None  # just inside 3 standard errors
    assert at_chance_note(0.2801, 0.01, 0.25) is None
    assert at_chance_note(0.20, 0.01, 0.25) is None  # far below chance is not "at" it
    assert at_chance_note(0.25, None, 0.25) is None  # no standard error: nothing to judge by


def test_chance_corrected_fit_recovers_known_coefficients_and_wins_on_its_own_data() -> None:
    table = fit_results(chance_sweep({"arc_easy": 0.7}, "corrected", slope=-2.0))
    law = table.row("arc_easy").chance
    assert (law.chance, law.at_chance) == (0.25, None)
    assert law.fit.a == pytest.approx(-2.0, abs=1e-12) and law.fit.b == pytest.approx(0.0, abs=1e-12)
    assert law.anchored.a == pytest.approx(-2.0, abs=1e-12) and law.fit.rmse < 1e-12
    # Errors propagate as in the paper's form, by the delta method around acc - c: Var = se^2 / (acc - c)^2.
    assert law.points.shared_var == pytest.approx((0.01 / (0.7 - 0.25)) ** 2)
    sliced = ~law.points.exact
    want = (0.01 / (law.points.values[sliced] - 0.25)) ** 2
    np.testing.assert_allclose(law.points.var[sliced], want)
    assert law.fit.a_ci[0] < -2.0 < law.fit.a_ci[1]
    assert law.comparison.corrected_rmse < 1e-12 < law.comparison.paper_rmse
    assert law.comparison.better == "chance-corrected" and law.comparison.n == 5
    # On data that follow the paper's form exactly, the paper's form predicts better.
    paper = fit_results(chance_sweep({"arc_easy": 0.7}, "paper", slope=-2.0)).row("arc_easy").chance
    assert paper.comparison.paper_rmse < 1e-12 < paper.comparison.corrected_rmse
    assert paper.comparison.better == "paper"


def test_loo_comparison_by_hand() -> None:
    # Each fold refits the paper's unconstrained line on the other points; its y is mapped back to acc.
    results = chance_sweep({"arc_easy": 0.7}, "corrected", slope=-2.0)
    for i, rec in enumerate(results["records"][1:]):
        rec["tasks"]["arc_easy"]["acc"] += 0.01 * (-1) ** i
    law = fit_results(results).row("arc_easy").chance
    s, acc, exact = law.points.s, law.points.values, law.points.exact
    errors = {"paper": [], "corrected": []}
    for i in np.flatnonzero(~exact):
        keep = np.arange(len(s)) != i
        for form, c in (("paper", 0.0), ("corrected", 0.25)):
            y = np.log((acc - c) / (0.7 - c))
            a, b = np.polyfit(s[keep], y[keep], 1)
            errors[form].append(acc[i] - (c + (0.7 - c) * math.exp(a * s[i] + b)))
    assert law.comparison.paper_rmse == pytest.approx(math.sqrt(np.mean(np.square(errors["paper"]))))
    assert law.comparison.corrected_rmse == pytest.approx(math.sqrt(np.mean(np.square(errors["corrected"]))))


def test_corrected_law_drops_points_at_or_below_chance() -> None:
    results = chance_sweep({"arc_easy": 0.7}, "paper", slope=-2.0)
    results["records"][-1]["tasks"]["arc_easy"]["acc"] = 0.24  # below chance, above 0
    row = fit_results(results).row("arc_easy")
    assert row.points.excluded == [] and len(row.chance.points.excluded) == 1
    assert "acc <= chance 0.250" in row.chance.points.dropped_note()
    assert row.chance.comparison.n == len(results["records"]) - 2


def test_old_results_take_the_registered_tasks_chance() -> None:
    # make_results records no chance (sweeps before it did): PIQA's two choices, HellaSwag's four.
    table = fit_results(make_results())
    assert table.row("piqa").chance.chance == 0.5 and table.row("hellaswag").chance.chance == 0.25


def test_chance_undefined_for_a_user_task_or_out_of_range_is_one_error_line(tmp_path: Path, capsys) -> None:
    mine = make_results()
    for rec in mine["records"]:
        rec["tasks"]["my_quiz"] = dict(rec["tasks"]["piqa"])
    bad = chance_sweep({"arc_easy": 0.6}, "paper")
    bad["records"][2]["tasks"]["arc_easy"]["chance"] = 1.5
    cases = [
        (mine, "task 'my_quiz' records no chance level and is not one of mechslice's tasks"),
        (bad, "task arc_easy has chance 1.5, not a number in [0, 1)"),
    ]
    for i, (results, message) in enumerate(cases):
        folder = write_results(tmp_path / str(i), results)
        assert main(["fit", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (folder / "fits.json").exists() and not (folder / "fits.csv").exists()
    for rec in mine["records"]:
        rec["tasks"]["my_quiz"]["chance"] = 0.5  # stated: now it fits
    assert fit_results(mine).row("my_quiz").chance.chance == 0.5
