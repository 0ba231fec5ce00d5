"""The flow tracer: stage contents match the HF modules, statistics stream and merge, bad input is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from hooks.flow import STAGES, FlowTracer, TraceError, trace, trace_tokens
from hooks.interventions import projection_hook, projection_hooks
from hooks.stats import RunningMoments
from mechslice.adapters import adapter_for
from mechslice.loaded import LoadedModel
from mechslice.loading import _cached_embedded
from tests.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """A seeded tiny random Llama (GQA, RoPE, gated SiLU) with the embedded tokenizer, for the bridge."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    tokenizer = AutoTokenizer.from_pretrained(_cached_embedded("smollm2-135m"))
    return LoadedModel(model, tokenizer, adapter_for(model.config), "tiny", "test")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 128, (3, 16))


def test_moments_match_direct_computation_and_merge() -> None:
    torch.manual_seed(0)
    X = torch.randn(200, 5, dtype=torch.float64) * 3 + 1
    a, b, whole = RunningMoments(5, True), RunningMoments(5, True), RunningMoments(5, True)
    a.update(X[:70])
    b.update(X[70:])
    whole.update(X)
    merged = a + b
    # float64 sums of 200 rows: round-off ~1e-13 relative; 1e-10 leaves room and catches any wrong formula.
    for m in (merged, whole):
        assert m.n == 200
        torch.testing.assert_close(m.mean, X.mean(0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.var, X.var(0, unbiased=False), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.covariance, torch.cov(X.T, correction=0), rtol=1e-10, atol=1e-10)
        assert m.mean_norm == pytest.approx(float(X.norm(dim=1).mean()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_reduce_in_float32_to_float64_accuracy_of_their_values(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    # 5000 rows (12 blocks of 426 at width 576) with a large mean in one channel, as the residual stream has
    X = (torch.randn(5000, 576) * 2 + torch.linspace(-1, 1, 576)).to(dtype)
    X[:, 7] += 40
    half, exact = RunningMoments(576, True), RunningMoments(576, True)
    half.update(X)
    exact.update(X.double())  # the same values, reduced in float64 throughout
    # float32 sums within a block of 426 rows round at about 2^-24 log2(426) ~ 5e-7 relative to the sum of
    # magnitudes; 1e-5 leaves room, and is still 200x below bf16's own resolution of the data (2^-9).
    torch.testing.assert_close(
        half.sum_x, exact.sum_x, rtol=1e-5, atol=1e-5 * float(X.double().abs().sum(0).max())
    )
    torch.testing.assert_close(half.sum_x2, exact.sum_x2, rtol=1e-5, atol=0)
    torch.testing.assert_close(half.sum_xxT, exact.sum_xxT, rtol=1e-5, atol=1e-5 * float(exact.sum_x2.max()))
    assert half.sum_norm == pytest.approx(exact.sum_norm, rel=1e-6)
    assert half.n == exact.n == 5000


def test_stages_hold_what_the_table_says(tiny: LoadedModel, ids: torch.Tensor) -> None:
    keys = [s.key for s in STAGES]
    result = trace(tiny.bridge, ids, raw=keys)
    layer = tiny.model.model.layers[1]
    raw = {k: result.raw_rows(1, k) for k in keys}
    x = raw["E_in"]
    rms = torch.sqrt(x.square().mean(-1, keepdim=True) + tiny.model.config.rms_norm_eps)
    # fp32 forward vs fp32 recomputation of one small layer: a few ulps of values O(1-10).
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(raw["rms_in"], rms, **tol)
    torch.testing.assert_close(raw["E_in_bar"], layer.input_layernorm(x), **tol)
    torch.testing.assert_close(raw["Q"], layer.self_attn.q_proj(raw["E_in_bar"]), **tol)
    torch.testing.assert_close(raw["sigma_gate"], torch.nn.functional.silu(raw["gate"]), **tol)
    torch.testing.assert_close(raw["gate_up"], raw["sigma_gate"] * raw["up"], **tol)
    torch.testing.assert_close(raw["E_mid"], x + raw["A_prime"], **tol)
    torch.testing.assert_close(raw["E_out"], raw["E_mid"] + raw["down"], **tol)
    with torch.no_grad():
        hidden = tiny.model(ids, output_hidden_states=True).hidden_states
    # hidden_states[1] is block 0's output (the last entry is after the final norm)
    torch.testing.assert_close(result.raw_rows(0, "E_out"), hidden[1].reshape(-1, 64), **tol)
    assert result.shapes[(0, "W_a")] == (4, 16, 16)
    assert result.shapes[(0, "K")] == (16, 2, 16)
    assert result.tokens == ids.numel()


def test_statistics_stream_without_growing(tiny: LoadedModel, ids: torch.Tensor) -> None:
    one = trace(tiny.bridge, ids, layers=[1], moments=["E_out"], batch_size=3)
    split = trace(tiny.bridge, ids, layers=[1], moments=["E_out"], batch_size=1)
    m1, m2 = one.moments[(1, "E_out")], split.moments[(1, "E_out")]
    # Same tokens in other batches: identical up to float64 summation order.
    torch.testing.assert_close(m1.second_moment, m2.second_moment, rtol=1e-9, atol=1e-9)
    assert one.raw == {} and m1.n == ids.numel()
    assert one.moments[(1, "E_in")].sum_xxT is None  # second moment only where asked
    capped = trace(tiny.bridge, ids, layers=[0], stages=["E_out"], raw=["E_out"], max_raw_rows=10)
    assert capped.raw_rows(0, "E_out").shape == (10, 64)
    rows = {r["stage"] for r in one.table()}
    assert rows == {s.key for s in STAGES}


def test_hook_names_are_accepted_as_extra_stages(tiny: LoadedModel, ids: torch.Tensor) -> None:
    result = trace(tiny.bridge, ids, stages=["E_out", "attn.hook_attn_scores"], layers=[0])
    assert result.shapes[(0, "attn.hook_attn_scores")] == (4, 16, 16)


def test_trace_tokens_and_projection(tiny: LoadedModel) -> None:
    stream = torch.randint(0, 128, (100,))
    assert trace_tokens(tiny.bridge, stream, 64, seqlen=32, layers=[0], stages=["E_out"]).tokens == 64
    basis = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0]
    with torch.no_grad(), tiny.bridge.hooks(fwd_hooks=projection_hooks({0: basis}, 8)):
        projected = trace(tiny.bridge, stream[:32].view(1, 32), layers=[0], stages=["E_out"], raw=["E_out"])
    X = projected.raw_rows(0, "E_out").double()
    # the projected rows lie in the 8-dim span: the residual off it is float32 round-off (~1e-6 of |x|).
    off = X - X @ basis[:, :8] @ basis[:, :8].T
    assert float(off.abs().max()) < 1e-4 * float(X.abs().max())
    with pytest.raises(ValueError, match="orthonormal"):
        projection_hook(torch.ones(64, 4), 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": ["attn.hook_nope"]}, "unknown stage or hook 'attn.hook_nope'"),
        ({"layers": [2]}, "layer index 2 is out of range; this model has layers 0..1"),
        ({"layers": [-1]}, "layer index -1 is out of range"),
        ({"layers": []}, "no layers chosen"),
        ({"moments": ["E_out"], "stages": ["E_in"]}, "not among the traced stages"),
    ],
)
def test_bad_input_is_one_clear_line(tiny: LoadedModel, kwargs: dict, message: str) -> None:
    with pytest.raises(TraceError, match=message) as err:
        FlowTracer(tiny.bridge, **kwargs)
    assert "\n" not in str(err.value)


def test_no_tokens_or_too_few_tokens(tiny: LoadedModel) -> None:
    with pytest.raises(TraceError, match="no tokens to trace"):
        trace(tiny.bridge, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TraceError, match="asked to trace 500 tokens but only 100 are available"):
        trace_tokens(tiny.bridge, torch.zeros(100, dtype=torch.long), 500)
