"""The methods sweep (issue 15): every pruning axis through the same protocol, matched on parameter sparsity,
fitted against both axes, compared in one report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from analyses.methods import (
    METHODS_CSV,
    METHODS_FILE,
    compare_methods,
    is_methods_folder,
    param_view,
    run_methods,
    verdict,
)
from analyses.report.entropy import on_dense_blocks
from analyses.results import RESULTS_FILE
from analyses.sweep import run_sweep
from mechslice.cli import main
from mechslice.errors import MechsliceError
from mechslice.loading import load_model
from tests.conftest import sweep_settings, tiny_llama_config

METHODS = ("slice", "mlp", "heads", "layers")


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random tiny Llama with 4 blocks and 4 KV groups (so every axis has several sizes to offer)."""
    folder = tmp_path_factory.mktemp("deep")
    tokenizer = load_model(device="cpu").tokenizer
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer), num_hidden_layers=4, num_key_value_heads=4, max_position_embeddings=1024
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_methods_sweep_matches_budgets_shares_the_dense_record_and_fits_both_axes(
    deep_folder: Path, corpus: str, tmp_path: Path
) -> None:
    settings = sweep_settings(corpus, param_sparsities=(0.2, 0.45))
    results = run_methods(
        settings, METHODS, tmp_path, str(deep_folder), "cpu", progress=False, log=lambda _: None
    )
    assert is_methods_folder(tmp_path) and not is_methods_folder(tmp_path / "slice")
    dense = {m: r["records"][0] for m, r in results.items()}
    # The dense model is measured once, by the first method, and copied: same numbers in every folder.
    for method in METHODS[1:]:
        assert dense[method] == {**dense["slice"], "measured_in": "slice"}
    assert "measured_in" not in dense["slice"]
    for method in results:
        on_disk = json.loads((tmp_path / method / RESULTS_FILE).read_text())
        assert on_disk["settings"]["method"] == method and on_disk["settings"]["param_sparsities"] == [
            0.2,
            0.45,
        ]
        pruned = on_disk["records"][1:]
        assert pruned, method
        for rec in pruned:
            # each pruned model says which targets it was matched to and the parameter sparsity it reached,
            # counted on the live model; the target is the nearest the method's granularity allows
            reached = rec["param_sparsity"]["non_embedding"]
            assert all(abs(reached - t) < 0.2 for t in rec["param_targets"]), (method, rec)
            assert rec["ppl"] > 1 and "entropy" in rec and rec["shift"]["overall"]["kl"] > 0
        if method != "slice":
            for rec in pruned:
                pruning = json.loads((tmp_path / method / rec["pruning_file"]).read_text())
                assert pruning["method"] == method and pruning["param_sparsity"] == rec["param_sparsity"]
                assert rec["d_prime"] == 64  # every axis but slice keeps the representation dimension
        if method == "layers":  # entropy is compared block by block at the dense index of each kept block
            for rec in pruned:
                removed = json.loads((tmp_path / method / rec["pruning_file"]).read_text())["removed"]
                assert rec["entropy"]["layers"] == [i for i in range(4) if i not in removed]
                assert len(rec["entropy"]["gaussian"]["ratio_per_layer"]) == 4 - len(removed)

    comparison = compare_methods(tmp_path)
    for mf in comparison.methods.values():
        view, _ = param_view(mf.results, "non_embedding")
        xs = sorted(r["effective_sparsity"] for r in view["records"])
        expected = sorted([0.0, *(r["param_sparsity"]["non_embedding"] for r in mf.results["records"][1:])])
        assert xs == pytest.approx(expected)
        if len(mf.results["records"]) >= 3:  # two pruned points: a law on each axis
            assert mf.fits["param"] is not None and mf.fits["own"] is not None, mf.errors
            own = mf.fits["own"].row("ppl").points.s
            assert sorted(own[1:]) == sorted(r["effective_sparsity"] for r in mf.results["records"][1:])


def test_methods_cli_writes_each_sweep_the_comparison_and_the_report(
    deep_folder: Path, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sweep", "--model", str(deep_folder), "--device", "cpu", "--methods", "mlp,layers"]
    argv += ["--param-sparsities", "0.25,0.5", "--tasks", "ppl", "--calib-corpus", corpus, "--corpus", corpus]
    argv += ["--calib-samples", "4", "--calib-seqlen", "64", "--seqlen", "64", "--max-tokens", "256"]
    argv += ["--estimators", "gaussian", "--probe-tokens", "512", "--quick", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["methods"] == {"mlp": 3, "layers": 3}
    methods = json.loads((tmp_path / METHODS_FILE).read_text())
    assert {p["method"] for p in methods["points"]} == {"mlp", "layers"}
    assert {(r["method"], r["axis"]) for r in methods["fits"] if r["dataset"] == "ppl"} == {
        (m, a) for m in ("mlp", "layers") for a in ("param", "own")
    }
    assert methods["verdict"][0].startswith(
        "Per parameter removed, perplexity (ln PPL0 / ln PPL) suffers most"
    )
    assert (tmp_path / METHODS_CSV).read_text().startswith("method,axis,dataset,")
    report = (tmp_path / "report.html").read_text()
    assert "Table 3 layout" in report and 'href="mlp/report.html"' in report
    assert (tmp_path / "layers" / "fits.json").exists()
    assert "Pruned axis: the MLP" in (tmp_path / "mlp" / "report.html").read_text()
    # `report` rebuilds the comparison page of a methods folder, `fit` refits it
    (tmp_path / "report.html").unlink()
    (tmp_path / METHODS_FILE).unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / METHODS_FILE).exists()
    capsys.readouterr()
    assert main(["fit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mlp     against param sparsity: a" in out and "- Per parameter removed" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "slice,prune"], "unknown pruning method(s) ['prune']"),
        (["--methods", "mlp,mlp"], "a method is named twice"),
        (["--param-sparsities", "0.2"], "--param-sparsities needs --methods"),
        (["--methods", "mlp", "--param-sparsities", "0.3,0.2"], "parameter sparsities must be increasing"),
        (["--methods", "mlp", "--keep-first"], "--keep-first/--keep-last apply to the layers method"),
        (["--keep-last"], "--keep-first/--keep-last apply to the layers method only"),
        (["--methods", "mlp", "--param-sparsities", "0.2", "--sparsities", "0,0.1"], "not both"),
        (["--methods", "mlp", "--param-sparsities", "0.2,1.5"], "parameter sparsities must lie in [0, 1)"),
        (["--methods", "heads", "--sparsities", "0,1.0"], "sparsit"),
    ],
)
def test_methods_sweep_refuses_bad_input_before_writing(
    deep_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["sweep", "--model", str(deep_folder), "--device", "cpu", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_heads_refuses_a_sparsity_that_removes_every_group(
    deep_folder: Path, corpus: str, tmp_path: Path
) -> None:
    settings = sweep_settings(corpus, sparsities=(0.0, 0.99))
    with pytest.raises(MechsliceError, match="leaves v' = 0"):
        run_methods(settings, ("heads",), tmp_path / "o", str(deep_folder), "cpu", progress=False)
    assert not (tmp_path / "o").exists()


def test_a_methods_sweep_is_checked_whole_before_any_work(
    deep_folder: Path, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Folder clashes and a resumed method folder made with other settings are refused before the first
    method runs, so nothing is computed or written for a run that would stop half way."""
    settings = sweep_settings(corpus, sparsities=(0.0, 0.5))
    run_methods(settings, ("layers",), tmp_path, str(deep_folder), "cpu", progress=False, log=lambda _: None)
    before = (tmp_path / "layers" / RESULTS_FILE).read_bytes()
    other = sweep_settings(corpus, sparsities=(0.0, 0.5), ppl_seqlen=32)
    with pytest.raises(MechsliceError, match="other settings"):
        run_methods(other, ("mlp", "layers"), tmp_path, str(deep_folder), "cpu", resume=True, progress=False)
    assert not (tmp_path / "mlp").exists() and (tmp_path / "layers" / RESULTS_FILE).read_bytes() == before
    with pytest.raises(MechsliceError, match="pass --resume"):
        run_methods(settings, ("layers",), tmp_path, str(deep_folder), "cpu", progress=False)
    # a single sweep and a methods sweep never share a folder
    with pytest.raises(MechsliceError, match="holds a methods sweep"):
        run_sweep(settings, tmp_path, str(deep_folder), "cpu", progress=False)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / RESULTS_FILE).write_text("{}")
    with pytest.raises(MechsliceError, match="holds a single sweep"):
        run_methods(settings, ("mlp",), tmp_path / "single", str(deep_folder), "cpu", progress=False)


def test_comparison_refuses_folders_evaluated_differently_and_lists_unreached_targets(
    deep_folder: Path, corpus: str, tmp_path: Path
) -> None:
    # 0.02 of the parameters is nearer to removing no block than one block (a quarter): no pruned model answers it
    settings = sweep_settings(corpus, param_sparsities=(0.02, 0.3, 0.5))
    run_methods(settings, ("layers",), tmp_path, str(deep_folder), "cpu", progress=False, log=lambda _: None)
    comparison = compare_methods(tmp_path)
    assert comparison.methods["layers"].unreached == [0.02]
    assert any("0.02 lie nearest the dense model" in line for line in verdict(comparison))
    assert "param_targets" not in comparison.methods["layers"].results["records"][0]
    # an unfinished sweep names what it has not measured and claims no unreached target
    path = tmp_path / "layers" / RESULTS_FILE
    finished = path.read_text()
    results = json.loads(finished)
    last = results["records"].pop()
    path.write_text(json.dumps(results))
    partial = compare_methods(tmp_path).methods["layers"]
    assert partial.missing == [last["sparsity"]] and partial.unreached == []
    path.write_text(finished)
    run_methods(
        sweep_settings(corpus, param_sparsities=(0.3, 0.5), ppl_seqlen=32),
        ("mlp",),
        tmp_path,
        str(deep_folder),
        "cpu",
        progress=False,
        log=lambda _: None,
    )
    with pytest.raises(MechsliceError, match=r"different settings \(ppl_seqlen, param_sparsities\)"):
        compare_methods(tmp_path)


def test_per_layer_curves_of_a_model_that_lost_blocks_sit_at_the_dense_block_index() -> None:
    rec = {"entropy": {"layers": [0, 2, 3]}}
    placed = on_dense_blocks([1.0, 2.0, 3.0], rec)
    assert placed[0] == 1.0 and math.isnan(placed[1]) and placed[2:] == [2.0, 3.0]
    assert on_dense_blocks([1.0, 2.0], {"entropy": {}}) == [1.0, 2.0]
