"""Structural pruning (`mechslice.pruning`, `mechslice prune`) on tiny random models of every adapter family.

Each method removes exactly its units, keeps the dense logits bit-for-bit at sparsity 0, saves an ordinary
folder that plain `from_pretrained` and `load_model` read back to the same logits, removes a provably useless
unit first, and accounts for every parameter; bad input is one error line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from mechslice.adapters import adapter_for
from mechslice.cli import main
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.pruning import (
    PruneOptions,
    count_parameters,
    heads,
    kept_units,
    layers,
    mlp,
    nearest_sparsity,
    predicted_parameters,
    prune,
    save_pruned,
)
from mechslice.pruning.record import RECORD, PruningRecord
from tests.test_architectures import (  # noqa: F401 - `corpus` is a fixture
    CALIB,
    FAMILIES,
    PROBE,
    SHAPE,
    VOCAB,
    byte_tokenizer,
    corpus,
    logits,
    model_from,
    random_lm,
)

UNIT_METHODS = ("mlp", "heads", "layers")
# sparsities that remove one unit of the tiny models: 32 of m = 128 neurons, 1 of 2 KV groups, 1 of 2 blocks
ONE_STEP = {"mlp": 0.25, "heads": 0.5, "layers": 0.5}


def lm_from(config: LlamaConfig, seed: int = 0) -> LoadedModel:
    model = model_from(config, seed)
    return LoadedModel(model, byte_tokenizer(), adapter_for(model.config), "tiny", "random")


def llama(**overrides: object) -> LoadedModel:
    return lm_from(LlamaConfig(**{**SHAPE, "tie_word_embeddings": False, **overrides}))


def manual_count(model: torch.nn.Module) -> int:
    """Every parameter once (named_parameters skips a tied duplicate), plus persistent buffers."""
    params = sum(p.numel() for p in model.parameters())
    non_persistent = {
        f"{n}.{b}" if n else b for n, m in model.named_modules() for b in m._non_persistent_buffers_set
    }
    return params + sum(b.numel() for n, b in model.named_buffers() if n not in non_persistent)


@pytest.mark.parametrize("method", UNIT_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_keeps_logits_exactly(family, method):
    lm = random_lm(family)
    before = logits(lm)
    record = prune(lm, method, 0.0, CALIB, progress=False)
    assert record.kept == record.units and record.param_sparsity == {"non_embedding": 0.0, "total": 0.0}
    assert torch.equal(logits(lm), before)


@pytest.mark.parametrize("method", UNIT_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_method_removes_exactly_its_units(family, method):
    lm = random_lm(family)
    dense, dims = count_parameters(lm), lm.dims
    assert dense.total == manual_count(lm.model)
    record = prune(lm, method, ONE_STEP[method], CALIB, progress=False)
    after, new = count_parameters(lm), lm.dims
    assert after.total == manual_count(lm.model) == record.params["total_after"]
    assert after == predicted_parameters(random_lm(family), method, record.kept)
    module = {"mlp": mlp, "heads": heads, "layers": layers}[method]
    assert dense.total - after.total == (record.units - record.kept) * module.unit_parameters(
        random_lm(family)
    )
    assert new.d == record.representation_dim == dims.d  # the stream keeps its width
    views = [lm.adapter.block(layer) for layer in lm.adapter.layers(lm.model)]
    if method == "mlp":
        assert new.m == 96 and lm.model.config.intermediate_size == 96
        for view in views:
            assert view.mlp_writer.weight.shape == (dims.d, 96)
            assert sum(r.out_features for r in view.mlp_readers) == 2 * 96
    elif method == "heads":
        assert (new.h_attn, new.v, new.h_dim) == (2, 1, dims.h_dim)
        for view in views:
            assert sum(r.out_features for r in view.attn_readers) == (2 + 2 * 1) * dims.h_dim
            assert view.attn_writer.in_features == 2 * dims.h_dim
    else:
        assert new.n_layers == 1 and len(views) == 1
        assert lm.adapter.layers(lm.model)[0].self_attn.layer_idx == 0
        if family == "qwen2":  # layer_types follows the kept block
            assert lm.model.config.layer_types == [
                random_lm(family).model.config.layer_types[record.removed[0] ^ 1]
            ]
    expected = 1.0 - after.non_embedding / dense.non_embedding
    assert record.param_sparsity["non_embedding"] == expected
    assert record.effective_sparsity == 1.0 - record.kept / record.units


@pytest.mark.parametrize("method", UNIT_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_folder_is_an_ordinary_checkpoint(family, method, tmp_path):
    lm = random_lm(family)
    record = prune(lm, method, ONE_STEP[method], CALIB, progress=False)
    record.calibration["corpus"] = "random"
    out = save_pruned(lm, record, tmp_path / "pruned")
    pruned = logits(lm)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(plain(PROBE).logits, pruned)  # same fp32 weights, same ops: bit-identical
    loaded = load_model(str(out), device="cpu", dtype=torch.float32)
    assert torch.equal(logits(loaded), pruned)
    assert json.loads((out / "config.json").read_text())["head_dim"] == lm.dims.h_dim
    saved = PruningRecord.from_dict(json.loads((out / RECORD).read_text()))
    assert saved == record and saved.dtype == "float32" and "torch" in saved.versions
    assert saved.calibration == {"n_samples": 8, "seqlen": 32, "tokens": 256, "corpus": "random"}
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary folder left


def test_slice_is_delegated_and_accounted(tmp_path):
    lm = random_lm("llama")
    predicted = predicted_parameters(random_lm("llama"), "slice", 48)
    record = prune(lm, "slice", 0.25, CALIB, progress=False)
    assert (record.kept, record.representation_dim, record.slicing.d_prime) == (48, 48, 48)
    assert count_parameters(lm) == predicted and predicted.total == manual_count(lm.model)
    out = save_pruned(lm, record, tmp_path / "sliced")
    assert (out / "slicing.json").exists() and json.loads((out / RECORD).read_text())["method"] == "slice"
    assert torch.equal(logits(load_model(str(out), device="cpu", dtype=torch.float32)), logits(lm))


@pytest.mark.parametrize(
    "options",
    [
        PruneOptions(rotation="global"),
        PruneOptions(rotation="global", slice_head=True),
        PruneOptions(slice_head=True),
    ],
)
def test_slice_parameter_prediction_is_exact(options):
    lm = random_lm("qwen2")  # tied embeddings: slicing unties them, and the count says so
    predicted = predicted_parameters(random_lm("qwen2"), "slice", 40, options)
    prune(lm, "slice", 0.375, CALIB, options, progress=False)
    assert count_parameters(lm) == predicted and predicted.total == manual_count(lm.model)


def test_mlp_removes_a_neuron_that_writes_nothing_first():
    lm = llama()
    for layer, j in zip(lm.adapter.layers(lm.model), (5, 77), strict=True):
        lm.adapter.block(layer).mlp_writer.weight.data[:, j] = 0.0
    record = prune(lm, "mlp", 1 / 128, CALIB, PruneOptions(round_to=1), progress=False)
    assert record.removed == [[5], [77]]
    assert record.scores[0][5] == 0.0 and min(record.scores[0][:5] + record.scores[0][6:]) > 0.0
    assert record.ranking[1][0] == 77


def test_heads_remove_a_group_that_writes_nothing_first():
    lm = llama()
    h_dim = lm.dims.h_dim
    for layer, g in zip(lm.adapter.layers(lm.model), (1, 0), strict=True):
        writer = lm.adapter.block(layer).attn_writer  # group g = query heads 2g, 2g+1
        writer.weight.data[:, 2 * g * h_dim : 2 * (g + 1) * h_dim] = 0.0
    record = prune(lm, "heads", 0.5, CALIB, progress=False)
    assert record.removed == [[1], [0]] and record.scores[0][1] == 0.0 < record.scores[0][0]


def test_layers_remove_an_identity_block_first():
    lm = llama(num_hidden_layers=3)
    view = lm.adapter.block(lm.adapter.layers(lm.model)[1])
    view.attn_writer.weight.data.zero_()
    view.mlp_writer.weight.data.zero_()  # block 1 now passes its input through unchanged: BI = 0
    kept = [lm.adapter.layers(lm.model)[i] for i in (0, 2)]
    record = prune(lm, "layers", 1 / 3, CALIB, progress=False)
    assert record.removed == [1] and record.ranking[0] == 1 and abs(record.scores[1]) < 1e-12
    assert list(lm.adapter.layers(lm.model)) == kept and [b.self_attn.layer_idx for b in kept] == [0, 1]


def test_layers_respect_keep_first_and_keep_last():
    lm = llama(num_hidden_layers=3)
    for i in (0, 2):  # the outer blocks are identities, so BI would remove them first
        view = lm.adapter.block(lm.adapter.layers(lm.model)[i])
        view.attn_writer.weight.data.zero_()
        view.mlp_writer.weight.data.zero_()
    record = prune(lm, "layers", 1 / 3, CALIB, PruneOptions(keep_first=True, keep_last=True), progress=False)
    assert record.removed == [1] and record.ranking[:2] == [0, 2]


def test_gqa_groups_stay_whole():
    """8 query heads on 2 KV heads: pruning one group keeps the other's 4 query heads, its K/V head, intact."""
    lm = llama(num_attention_heads=8, num_key_value_heads=2)
    h_dim = lm.dims.h_dim
    before = [lm.adapter.block(layer) for layer in lm.adapter.layers(lm.model)]
    weights = [
        (v.attn_readers[0].weight.clone(), v.attn_readers[1].weight.clone(), v.attn_writer.weight.clone())
        for v in before
    ]
    record = prune(lm, "heads", 0.5, CALIB, progress=False)
    assert (lm.dims.h_attn, lm.dims.v) == (4, 1)
    assert lm.adapter.layers(lm.model)[0].self_attn.num_key_value_groups == 4
    for view, (q, k, o), gone in zip(before, weights, record.removed, strict=True):
        (g,) = set(range(2)) - set(gone)
        assert torch.equal(view.attn_readers[0].weight, q[4 * g * h_dim : 4 * (g + 1) * h_dim])
        assert torch.equal(view.attn_readers[1].weight, k[g * h_dim : (g + 1) * h_dim])
        assert torch.equal(view.attn_writer.weight, o[:, 4 * g * h_dim : 4 * (g + 1) * h_dim])


def test_nearest_sparsity_matches_the_parameter_target():
    lm = random_lm("llama")
    dense = count_parameters(lm)
    match = nearest_sparsity(lm, "mlp", 0.2, options=PruneOptions(round_to=1))
    reachable = [
        1 - predicted_parameters(lm, "mlp", k).non_embedding / dense.non_embedding for k in range(1, 129)
    ]
    assert abs(match.param_sparsity - 0.2) == min(abs(p - 0.2) for p in reachable)
    assert kept_units(lm, "mlp", match.sparsity, PruneOptions(round_to=1)) == match.kept
    record = prune(lm, "mlp", match.sparsity, CALIB, PruneOptions(round_to=1), progress=False, target=match)
    assert record.param_sparsity["non_embedding"] == pytest.approx(match.param_sparsity, abs=1e-15)
    assert record.target["target"] == 0.2 and record.target["of"] == "non_embedding"
    total = nearest_sparsity(random_lm("llama"), "layers", 0.3, of="total")
    assert (
        total.kept == 1 and total.sparsity == 0.5
    )  # 2 blocks: removing one is nearest 0.3 of all parameters


def test_heads_refuse_a_count_the_config_rejects():
    lm = llama(num_attention_heads=8, num_key_value_heads=4, head_dim=8)  # 3 groups: 6 heads do not divide 64
    with pytest.raises(MechsliceError, match=r"keeping 3 of 4 KV groups \(6 query heads\).*not a multiple"):
        kept_units(lm, "heads", 0.25)
    assert kept_units(lm, "heads", 0.5) == 2
    # one group is 8.3% of the non-embedding parameters: 3 kept would be nearest 7%, but it is not admissible
    assert nearest_sparsity(lm, "heads", 0.07).kept == 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tiny") / "llama"
    random_lm("llama").model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def run_prune(folder, corpus, out, *flags: str) -> int:  # noqa: F811 - `corpus` is the fixture's value
    calib = ["--calib-corpus", corpus, "--calib-samples", "4", "--calib-seqlen", "16"]
    return main(
        ["prune", "--model", str(folder), "--device", "cpu", *calib, "--out", str(out), "--json", *flags]
    )


def test_cli_prunes_and_records(folder, corpus, tmp_path, capsys):  # noqa: F811
    assert run_prune(folder, corpus, tmp_path / "mlp", "--method", "mlp", "--param-sparsity", "0.1") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "mlp" and summary["target"]["target"] == 0.1
    saved = json.loads((tmp_path / "mlp" / RECORD).read_text())
    assert saved["calibration"]["seed"] == 42 and saved["calibration"]["sampler"] == "slicegpt"
    assert saved["kept"] == summary["kept"] == load_model(str(tmp_path / "mlp"), device="cpu").dims.m


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "mlp", "--sparsity", "1.0"], "sparsity must lie in"),
        (["--method", "layers", "--sparsity", "-0.1"], "sparsity must lie in"),
        (["--method", "heads", "--sparsity", "0.9"], "leaves v' = 0 of v = 2"),
        (["--method", "mlp", "--sparsity", "0.999"], "leaves m' = 0"),
        (
            ["--method", "layers", "--sparsity", "0.5", "--keep-first", "--keep-last"],
            "fewer than the 2 blocks",
        ),
        (["--method", "mlp", "--sparsity", "0.2", "--keep-first"], "--keep-first do(es) not apply"),
        (["--method", "heads", "--sparsity", "0.5", "--round-to", "2"], "--round-to do(es) not apply"),
        (["--method", "mlp", "--sparsity", "0.2", "--round-to", "0"], "round_to must be at least 1"),
        (["--method", "heads", "--param-sparsity", "1.5"], "parameter sparsity must lie in"),
    ],
)
def test_cli_refuses_bad_input(folder, corpus, tmp_path, capsys, flags, message):  # noqa: F811
    assert run_prune(folder, corpus, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_uncovered_architecture(corpus, tmp_path, capsys):  # noqa: F811
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    byte_tokenizer().save_pretrained(tmp_path / "gemma2")
    assert (
        run_prune(tmp_path / "gemma2", corpus, tmp_path / "out", "--method", "mlp", "--sparsity", "0.5") == 2
    )
    assert "unsupported architecture 'gemma2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_model_mlp_prune_raises_perplexity(embedded):
    from mechslice.corpora import calibration_windows, corpus_tokens, eval_windows
    from mechslice.perplexity import evaluate_perplexity

    windows = eval_windows(corpus_tokens(embedded.tokenizer, "wiki", "test"), 128, 512)
    dense = evaluate_perplexity(embedded.model, windows, progress=False).ppl
    calib = calibration_windows(embedded.tokenizer, "wiki", 4, 128)
    record = prune(embedded, "mlp", 0.25, calib, progress=False)
    assert (record.units, record.kept) == (1536, 1152)
    pruned = evaluate_perplexity(embedded.model, windows, progress=False).ppl
    assert dense < pruned < float("inf")
    assert 0.0 < record.param_sparsity["total"] < record.param_sparsity["non_embedding"] < 0.25
