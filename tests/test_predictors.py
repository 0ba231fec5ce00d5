"""The three ln PPL predictors (law, internals, dense) on synthetic sweeps, their comparison, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyses.entropy import (
    RANK,
    covariance_spectrum,
    gaussian_entropy,
    gaussian_entropy_top,
    kept_ratio,
    layer_entropy_summary,
    stream_spectra,
)
from analyses.predictors import (
    compare_predictors,
    dense_prediction,
    internals_prediction,
    law_prediction,
)
from analyses.report import build_report
from analyses.results import load_results
from analyses.sweep import STREAM_SPECTRA, entropy_record
from mechslice.cli import main
from mechslice.slicing import sliced_width

D = 24
LAYERS = 3
TOKENS = 400
PPL0 = 12.0
A = -1.1  # the law's slope in the synthetic sweeps: y = ln PPL0 / ln PPL = 1 + A s
SETTINGS = {"sparsities": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "round_to": 2, "slice_head": False}


def _dense_stream(rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Per layer, Gaussian tokens with a spread covariance spectrum (0.5 .. 20, every 0.5 log(2 pi e l) > 0)
    in a random basis and with a mean, so neither the basis nor the centring is trivial."""
    out = {}
    for layer in range(LAYERS):
        basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
        scales = np.sqrt(np.geomspace(20.0, 0.5, D))
        out[layer] = (rng.standard_normal((TOKENS, D)) * scales) @ basis.T + rng.normal(0.0, 1.0, D)
    return out


def _principal(x: np.ndarray) -> np.ndarray:
    """Eigenvectors of x's covariance, leading first: the directions a slice to d' keeps the first d' of."""
    centred = x - x.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred / (x.shape[0] - 1))
    return vecs[:, ::-1]


def _law_ppl(s: float) -> float:
    return math.exp(math.log(PPL0) / (1.0 + A * s))


def projected_sweep(keep: str = "top", seed: int = 0) -> dict[str, Any]:
    """A sweep whose sliced stream is exactly the dense one projected onto d' principal directions.

    Every block output but the last is cut to d' (the head left unsliced, as SliceGPT's default: the last
    output is rotated, not cut); `keep="bottom"` projects onto the d' least-variance directions instead, a
    slicing the dense predictor does not model. Measured on the raw stream, where a projection stays one.
    """
    rng = np.random.default_rng(seed)
    dense = _dense_stream(rng)
    records = [
        {
            "sparsity": 0.0,
            "effective_sparsity": 0.0,
            "d": D,
            "d_prime": D,
            "ppl": PPL0,
            "tasks": {},
            STREAM_SPECTRA: stream_spectra(dense, "raw").to_dict(),
        }
    ]
    for s in SETTINGS["sparsities"][1:]:
        d_prime = sliced_width(D, s, SETTINGS["round_to"])
        sliced = {}
        for layer, x in dense.items():
            vecs = _principal(x)
            cut = vecs[:, :d_prime] if keep == "top" else vecs[:, D - d_prime :]
            sliced[layer] = x @ (vecs if layer == LAYERS - 1 else cut)
        with pytest.warns(UserWarning, match="not sliced"):  # the last layer, kept at width d
            summary = layer_entropy_summary(dense, sliced, ("gaussian",), stream="raw")
        s_eff = 1.0 - d_prime / D
        records.append(
            {
                "sparsity": s,
                "effective_sparsity": s_eff,
                "d": D,
                "d_prime": d_prime,
                "ppl": _law_ppl(s_eff),
                "tasks": {},
                "entropy": entropy_record(summary, ("gaussian",)),
            }
        )
    settings = {**SETTINGS, "entropy_stream": "raw", "dtype": "float32"}
    return {"model": "synthetic", "model_fingerprint": "f00d", "settings": settings, "records": records}


def write_results(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


# ---------------------------------------------------------------- dense = internals under projection


def test_kept_ratio_is_the_top_k_entropy_over_the_full_one() -> None:
    x = _dense_stream(np.random.default_rng(1))[0]
    lam = covariance_spectrum(x)
    # the same eigenvalues summed in the same order by both: equal to a few ulps
    assert kept_ratio(lam, 10).ratio == pytest.approx(
        gaussian_entropy_top(x, 10) / gaussian_entropy(x), rel=1e-14
    )
    assert kept_ratio(lam, D, RANK).ratio == pytest.approx(1.0, rel=1e-14)
    assert 0.0 < kept_ratio(lam, 10, RANK).ratio < 1.0


@pytest.mark.parametrize("estimator", ["gaussian", RANK])
def test_dense_predictor_equals_internals_when_the_slice_is_the_projection(
    tmp_path: Path, estimator: str
) -> None:
    # Through results.json, so the stored spectra must keep their float64 precision.
    results = load_results(write_results(tmp_path / "run", projected_sweep()))
    internals = internals_prediction(results, estimator)
    dense = dense_prediction(results, estimator)
    assert (
        [p.sparsity for p in dense.points]
        == [p.sparsity for p in internals.points]
        == SETTINGS["sparsities"][1:]
    )
    for ours, theirs in zip(dense.points, internals.points, strict=True):
        assert ours.d_prime == theirs.d_prime and ours.effective_sparsity == theirs.effective_sparsity
        # The last layer keeps width d (head unsliced), so both leave it out; the others all count.
        assert ours.detail["layers"] == theirs.detail["layers"] == ["0", "1"]
        assert ours.detail["excluded"] == theirs.detail["excluded"] == {"2": "not sliced (d' = d)"}
        # Internals' H' comes from the eigenvalues of V_k^T Sigma V_k, a k x k matrix equal to diag(top k) up
        # to round-off ~ d * eps * lambda_max = 24 * 2.2e-16 * 20 ~ 1e-13; against eigenvalues >= 0.5 each
        # log moves by <= 2e-13, so H'/H (a mean of O(1) logs) agrees to ~1e-12 relative: 1e-10 has margin.
        assert ours.detail["ratio"] == pytest.approx(theirs.detail["ratio"], rel=1e-10)
        assert ours.ln_ppl == pytest.approx(theirs.ln_ppl, rel=1e-10)
        assert ours.rel_error_ln_ppl == pytest.approx(theirs.rel_error_ln_ppl, rel=1e-8, abs=1e-12)
        assert ours.ln_ppl_measured == theirs.ln_ppl_measured == math.log(_law_ppl(ours.effective_sparsity))


def test_dense_predictor_differs_when_the_slice_keeps_other_directions() -> None:
    # The control: cutting the leading directions instead keeps far less entropy than the dense model's
    # spectrum says a PCA slice keeps, so the equality above is not one that holds for any slicing.
    results = projected_sweep(keep="bottom")
    for ours, theirs in zip(
        dense_prediction(results).points, internals_prediction(results).points, strict=True
    ):
        assert ours.detail["ratio"] > theirs.detail["ratio"] + 0.05


# ---------------------------------------------------------------- law


def test_law_predictor_recovers_held_back_points() -> None:
    # y = 1 + A s plus a seeded 1e-4 scatter (a scatter-free line is refused: its interval would be zero-width).
    results = projected_sweep()
    rng = np.random.default_rng(3)
    truth = {}
    for rec in results["records"][1:]:
        s = rec["effective_sparsity"]
        truth[rec["sparsity"]] = math.log(_law_ppl(s))
        rec["ppl"] = math.exp(math.log(PPL0) / (1.0 + A * s + rng.normal(0.0, 1e-4)))
    law = law_prediction(results)
    assert law.fit_on == [0.1, 0.2, 0.3]  # the three smallest sparsities > 0
    assert [p.sparsity for p in law.points] == [0.4, 0.5]
    for p in law.points:
        # 1e-4 scatter in y moves ln PPL = ln PPL0 / y by ~1e-4 / y relative (y ~ 0.5): well under 2e-3
        assert p.ln_ppl == pytest.approx(truth[p.sparsity], rel=2e-3)
        lo, hi = p.ln_ppl_interval
        assert lo < truth[p.sparsity] < hi and lo < p.ln_ppl_measured < hi
        assert p.rel_error_ln_ppl == pytest.approx((p.ln_ppl - p.ln_ppl_measured) / p.ln_ppl_measured)
        assert p.rel_error_ppl == pytest.approx(math.exp(p.ln_ppl) / math.exp(p.ln_ppl_measured) - 1.0)
    errors = law.mean_abs_errors()
    assert errors["ln_ppl"] == pytest.approx(np.mean([abs(p.rel_error_ln_ppl) for p in law.points]))
    # Fitted on two chosen sparsities, predicting one the sweep never evaluated: no measurement, no error.
    (p,) = law_prediction(results, fit_on=[0.1, 0.5], at=[0.35]).points
    assert p.ln_ppl_measured is None and p.rel_error_ppl is None
    assert p.d_prime == sliced_width(D, 0.35, SETTINGS["round_to"]) and p.ln_ppl == pytest.approx(
        math.log(_law_ppl(1.0 - p.d_prime / D)), rel=2e-3
    )


def test_compare_predictors_scores_all_three_on_the_held_back_points() -> None:
    results = projected_sweep()
    comparison = compare_predictors(results, fit_on=[0.1, 0.2])
    assert comparison.held_back == [0.3, 0.4, 0.5] and not comparison.missing
    for method in ("law", "internals", "dense"):
        assert [p.sparsity for p in comparison.predictions[method].points] == comparison.held_back
    del results["records"][0][STREAM_SPECTRA]
    comparison = compare_predictors(results)
    assert set(comparison.predictions) == {"law", "internals"}
    assert comparison.missing["dense"].startswith("no dense spectra in")
    json.dumps(comparison.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- CLI


def test_cli_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_results(tmp_path / "run", projected_sweep())
    for method in ("law", "internals", "dense"):
        assert main(["predict", "--method", method, "--from", str(folder), "--json"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["method"] == method and payload["dtype"] == "float32" and payload["n_measured"] >= 2
        assert all(p["rel_error_ppl"] is not None for p in payload["points"])
        assert main(["predict", "--method", method, "--from", str(folder)]) == 0
        assert "mean |relative error| over" in capsys.readouterr().out
    assert (
        main(
            ["predict", "--method", "dense", "--estimator", RANK, "--sparsity", "0.35", "--from", str(folder)]
        )
        == 0
    )
    assert "no measured point" in capsys.readouterr().out
    assert main(["predict", "--method", "law", "--fit-on", "0.1,0.3", "--from", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit_on"] == [0.1, 0.3]


def test_cli_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = projected_sweep()
    del old["records"][0][STREAM_SPECTRA]
    for rec in old["records"]:
        rec.pop("entropy", None)
    old_dir = write_results(tmp_path / "old", old)
    good = write_results(tmp_path / "good", projected_sweep())
    malformed = projected_sweep()
    malformed["records"][0][STREAM_SPECTRA]["eigenvalues"][1] = [1.0, 2.0]  # not d numbers
    malformed_dir = write_results(tmp_path / "malformed", malformed)
    before = sorted(p.name for p in old_dir.iterdir())
    cases = [
        (
            ["predict", "--method", "dense", "--from", str(old_dir)],
            f"no dense spectra in {old_dir}/results.json",
        ),
        (["predict", "--method", "internals", "--from", str(old_dir)], "no sliced record has a gaussian"),
        (["predict", "--method", "dense", "--from", str(malformed_dir)], "are malformed"),
        (
            ["predict", "--method", "law", "--model", "smollm2-135m", "--from", str(good)],
            "--method dense only",
        ),
        (["predict", "--method", "dense", "--estimator", "marginal", "--from", str(good)], "no estimator"),
        (["predict", "--method", "law", "--fit-on", "0.15,0.2", "--from", str(good)], "--fit-on 0.15 is not"),
        (["predict", "--method", "dense", "--fit-on", "0.1,0.2", "--from", str(good)], "--method law only"),
        (["predict", "--from", str(good)], "pass --sparsity S"),
        (["predict", "--method", "law", "--sparsity", "0", "--from", str(good)], "outside (0, 1)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in old_dir.iterdir()) == before  # nothing written


def test_report_compares_the_three_predictors(tmp_path: Path) -> None:
    folder = write_results(tmp_path / "run", projected_sweep())
    page = build_report(folder).read_text(encoding="utf-8")
    section = page.split('id="predict"')[1].split("<h2")[0]
    assert "three predictors against the measured curve" in section
    comparison = compare_predictors(load_results(folder))
    assert comparison.held_back == [0.4, 0.5] and set(comparison.predictions) == {"law", "internals", "dense"}
    for method, prediction in comparison.predictions.items():
        assert f"{method}: PPL, err PPL, err ln PPL" in section
        mean = prediction.mean_abs_errors()
        assert f"{mean['ppl']:.1%}, {mean['ln_ppl']:.1%}" in section
