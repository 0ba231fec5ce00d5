"""Per-layer entropy of dense vs sliced residual streams, and the figures drawn from it."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from analyses.entropy import RANK, gaussian_entropy
from analyses.layer_entropy import entropy_sweep, residual_samples
from analyses.report.entropy_page import eigenvalue_spectra, entropy_curves
from analyses.report.layers import stage_norms
from hooks.flow import trace
from mechslice.adapters import adapter_for
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import _cached_embedded
from tests.conftest import tiny_llama_config


def tiny() -> LoadedModel:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    tokenizer = AutoTokenizer.from_pretrained(_cached_embedded("smollm2-135m"))
    return LoadedModel(model, tokenizer, adapter_for(model.config), "tiny", "test")


def _ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_residual_samples_are_the_block_outputs() -> None:
    lm = tiny()
    ids = _ids((4, 32), 1)
    samples = residual_samples(lm, ids, max_rows=100)
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    assert set(samples) == {0, 1} and samples[0].shape == (100, 64)
    # first 100 tokens in order, identical to the HF block output up to fp32 rounding
    torch.testing.assert_close(samples[0], hidden[1].reshape(-1, 64)[:100], rtol=1e-5, atol=1e-5)


def test_sweep_reports_ratios_per_layer_and_sparsity() -> None:
    lm = tiny()
    sweep = entropy_sweep(
        lm,
        [0.25, 0.5],
        calib=_ids((16, 32), 2),
        windows=_ids((8, 32), 3),
        estimators=["gaussian"],
        max_rows=256,
    )
    assert [r.d_prime for r in sweep.results] == [48, 32]
    for result in sweep.results:
        for i, layer in enumerate(result.summary.layers):
            g = layer.estimators["gaussian"]
            width = 64 if i == len(result.summary.layers) - 1 else result.d_prime  # the unsliced head's input
            assert layer.one_minus_s == width / 64
            assert g.kappa_sliced == pytest.approx(g.H_sliced / width)
            assert g.ratio == pytest.approx(g.H_sliced / g.H_dense)
    # the dense stream's entropy is the same whatever the sparsity it is compared with
    h0 = [r.summary.layers[1].estimators["gaussian"].H_dense for r in sweep.results]
    assert h0[0] == pytest.approx(h0[1])
    assert sweep.spectra[1].shape == (64,) and (sweep.spectra[1][:-1] >= sweep.spectra[1][1:]).all()
    assert isinstance(entropy_curves(sweep, "gaussian"), go.Figure)
    assert len(entropy_curves(sweep, "gaussian").data) == 4  # a ratio curve and its 1-s line per sparsity
    assert len(eigenvalue_spectra(sweep.spectra).data) == 2


def test_sweep_measures_the_normalised_stream_with_its_companions() -> None:
    # Issue 12: by default the ratio is taken on x / sqrt(sum x^2 / d) (d the dense width for both models),
    # kNN is left out, and every sparsity carries the effective-rank ratio and the stated mean ratio.
    lm = tiny()
    windows = _ids((8, 32), 3)
    sweep = entropy_sweep(lm, [0.25], calib=_ids((16, 32), 2), windows=windows, max_rows=256)
    (result,) = sweep.results
    assert sweep.stream == "normalised" and sweep.to_dict()["stream"] == "normalised"
    assert set(result.summary.layers[0].estimators) == {"gaussian", "marginal"}
    assert set(result.summary.signals) == {"gaussian", "marginal", RANK}
    # The dense side is the traced block output, normalised by hand.
    dense = residual_samples(lm, windows, max_rows=256)[1]
    x = dense.double().numpy()
    direct = gaussian_entropy(x / np.sqrt((x**2).sum(axis=1, keepdims=True) / 64))
    assert result.summary.layers[1].estimators["gaussian"].H_dense == pytest.approx(direct, rel=1e-9)
    assert len(entropy_curves(sweep, RANK).data) == 2
    with pytest.raises(MechsliceError, match="include_knn"):
        entropy_sweep(lm, [0.25], _ids((4, 32), 2), windows, estimators=["knn"], max_rows=256)


def test_dense_entropy_matches_a_direct_estimate() -> None:
    lm = tiny()
    ids = _ids((8, 32), 4)
    samples = residual_samples(lm, ids, max_rows=256)
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    direct = gaussian_entropy(hidden[1].reshape(-1, 64).double())
    # same 256 rows; the tracer's fp32 copy equals the HF output up to rounding, so 1e-6 relative
    assert gaussian_entropy(samples[0]) == pytest.approx(direct, rel=1e-6)


def test_stage_norm_figure() -> None:
    lm = tiny()
    table = trace(lm.bridge, _ids((2, 16), 5)).table()
    fig = stage_norms(table, stages=["E_in", "A_prime", "down", "E_out"])
    assert [t.name for t in fig.data] == ["E_in", "A_prime", "down", "E_out"]
    assert list(fig.data[0].x) == [0, 1]


def test_bad_input() -> None:
    lm = tiny()
    with pytest.raises(MechsliceError, match="unknown entropy estimator"):
        entropy_sweep(lm, [0.25], _ids((4, 32), 2), _ids((2, 32), 3), estimators=["histogram"])
    with pytest.raises(MechsliceError, match="asked for 100 samples per layer but only 64 tokens are traced"):
        residual_samples(lm, _ids((2, 32), 3), max_rows=100)
    with pytest.raises(MechsliceError, match="layer index 3 is out of range"):
        residual_samples(lm, _ids((2, 32), 3), max_rows=10, layers=[3])
