"""Conformance: every stage recomputed from the one before agrees in fp32, dense and sliced, and errors are seen."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from analyses.conformance import EQUATIONS, REL_TOL, check_conformance
from mechslice.adapters import adapter_for
from mechslice.corpora import calibration_windows
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import _cached_embedded
from mechslice.slicing import slice_model
from tests.conftest import tiny_llama_config


def tiny() -> LoadedModel:
    """A fresh seeded tiny Llama (slicing edits it in place) with the embedded tokenizer for the bridge."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    tokenizer = AutoTokenizer.from_pretrained(_cached_embedded("smollm2-135m"))
    return LoadedModel(model, tokenizer, adapter_for(model.config), "tiny", "test")


def _ids(vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, vocab, shape)


@pytest.mark.parametrize("rotation", [None, "per-layer", "global"])
def test_tiny_model_conforms_dense_and_sliced(rotation: str | None) -> None:
    lm = tiny()
    if rotation is not None:
        slice_model(lm, 0.25, _ids(128, (16, 32)), rotation=rotation, progress=False)
    report = check_conformance(lm, _ids(128, (2, 16)))
    assert report.passed, report.worst()
    assert len(report.deviations) == 2 * len(EQUATIONS)
    assert report.missing == [] and report.not_applicable == {}
    # Table 2: every matrix's residual side is the same d; once sliced d', but for the last W_down, which writes
    # the full-width stream of the unsliced head (SliceGPT's default)
    assert report.shared_d == ([64] if rotation is None else [48, 64])
    assert all(w["matches"] for w in report.weights)
    has_shortcuts = [getattr(layer, "attn_shortcut", None) is not None for layer in lm.model.model.layers]
    assert all(has_shortcuts) == (rotation == "per-layer")


def test_a_wrong_stage_is_caught() -> None:
    lm = tiny()

    def corrupt(z: torch.Tensor, hook: object) -> torch.Tensor:
        return z * 1.01  # a 1% error on the per-head outputs W_a V of block 1

    with lm.bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_z", corrupt)]):
        report = check_conformance(lm, _ids(128, (1, 16)))
    bad = {(d.layer, d.equation) for d in report.deviations if d.max_rel > REL_TOL}
    assert bad == {(1, "(7) W_a V")}
    assert not report.passed


@pytest.mark.parametrize(
    ("owner", "hook", "equation"),
    [("", "hook_out", "residual E_mid S_mlp + down"), ("attn", "hook_rot_q", "RoPE(Q)")],
)
def test_a_hook_that_never_fires_fails_and_is_named(owner: str, hook: str, equation: str) -> None:
    """A bridge that skips one hook point of block 1 leaves that pair unchecked: a FAIL, not a vacuous pass."""
    lm = tiny()
    block = lm.bridge.blocks[1]
    setattr(
        getattr(block, owner) if owner else block, hook, torch.nn.Identity()
    )  # the bridge calls it, unhooked
    report = check_conformance(lm, _ids(128, (1, 16)))
    assert not report.passed  # the original code passed here: the pair silently dropped out of the verdict
    assert report.missing == [(1, equation)]
    assert (
        len(report.deviations) == 2 * len(EQUATIONS) - 1
    )  # everything else, layer 1 included, still checked
    assert all(d.max_rel <= REL_TOL for d in report.deviations)  # the only reason to fail is the missing pair
    assert report.to_dict()["missing"] == [{"layer": 1, "equation": equation}]


def test_bad_input() -> None:
    lm = tiny()
    with pytest.raises(MechsliceError, match=r"layer index 5 is out of range; this model has layers 0\.\.1"):
        check_conformance(lm, _ids(128, (1, 8)), layers=[5])
    with pytest.raises(MechsliceError, match="no tokens to check"):
        check_conformance(lm, torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.slow
def test_embedded_model_conforms_dense_and_sliced(embedded: LoadedModel) -> None:
    ids = _ids(embedded.dims.vocab, (1, 32))
    dense = check_conformance(embedded, ids)
    assert dense.passed, dense.worst()
    assert dense.shared_d == [576]
    calib = calibration_windows(embedded.tokenizer, n_samples=8, seqlen=128)
    slice_model(embedded, 0.25, calib, rotation="per-layer", progress=False)
    embedded.reset_bridge()
    sliced = check_conformance(embedded, ids)
    assert sliced.passed, sliced.worst()
    assert sliced.shared_d == [432, 576]  # d' everywhere but the last W_down, which feeds the unsliced head
