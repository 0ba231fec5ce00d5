"""Output-distribution shift against closed forms on small known distributions and constructed logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analyses.shift import (
    ShiftAccumulator,
    js_divergence,
    kl_divergence,
    output_shift,
    predictive_entropy,
    token_shift,
)
from mechslice.errors import MechsliceError

# Every closed form below is evaluated in float64 on a handful of terms: agreement to 1e-12 is round-off.
TOL = 1e-12


def _logp(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_kl_js_entropy_of_known_distributions() -> None:
    p, q = [0.5, 0.5], [0.9, 0.1]
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(_logp(p), _logp(q)).item() == pytest.approx(kl, abs=TOL)
    m = [0.7, 0.3]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m, strict=True)
    )
    assert js_divergence(_logp(p), _logp(q)).item() == pytest.approx(js, abs=TOL)
    assert js_divergence(_logp(q), _logp(p)).item() == pytest.approx(js, abs=TOL)  # symmetric
    assert predictive_entropy(_logp(p)).item() == pytest.approx(math.log(2), abs=TOL)
    assert kl_divergence(_logp(q), _logp(q)).item() == 0.0
    assert js_divergence(_logp(q), _logp(q)).item() == pytest.approx(0.0, abs=TOL)


def test_js_reaches_ln2_on_disjoint_supports_without_nan() -> None:
    # Disjoint supports: JS = ln 2 exactly; zero-probability entries (log 0 = -inf) must contribute 0, not nan.
    logp = torch.tensor([0.0, -math.inf], dtype=torch.float64)
    logq = torch.tensor([-math.inf, 0.0], dtype=torch.float64)
    assert js_divergence(logp, logq).item() == pytest.approx(math.log(2), abs=TOL)
    assert predictive_entropy(logp).item() == 0.0
    assert kl_divergence(logp, logq).item() > 1e300  # log 0 is clamped to the float64 minimum, not inf


def test_js_bounded_by_ln2_on_random_logits() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = 10 * torch.randn(64, 50, generator=g), 10 * torch.randn(64, 50, generator=g)
    per = token_shift(a, b, None)
    assert (per["js"] >= -TOL).all() and (per["js"] <= math.log(2) + TOL).all()
    assert (per["kl"] >= -TOL).all()
    assert (per["entropy_dense"] <= math.log(50) + TOL).all()


def test_identical_logits_give_zero_shift_and_full_agreement() -> None:
    logits = torch.randn(2, 20, 30, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 30, (2, 20), generator=torch.Generator().manual_seed(2))
    r = output_shift(logits, logits.clone(), targets).overall
    assert r.kl == pytest.approx(0.0, abs=TOL) and r.js == pytest.approx(0.0, abs=TOL)
    assert r.top1_agreement == 1.0
    assert r.ln_ppl_dense == r.ln_ppl_sliced and r.ln_ppl_ratio == 1.0
    assert r.tokens == 40


def test_top1_agreement_and_nll_on_constructed_logits() -> None:
    # 4 tokens, vocab 3. Sliced argmax differs from dense at tokens 1 and 3: agreement 2/4.
    dense = torch.tensor([[[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]]])
    sliced = torch.tensor([[[5.0, 0, 0], [0, 0, 5], [0, 0, 5], [0, 5, 0]]])
    targets = torch.tensor([[0, 1, 2, 0]])
    r = output_shift(dense, sliced, targets).overall
    assert r.top1_agreement == 0.5
    # Dense puts p = e^5/(e^5+2) on every target; sliced does at tokens 0, 2 and 1/(e^5+2) at tokens 1, 3.
    z = math.log(math.exp(5) + 2)
    assert r.ln_ppl_dense == pytest.approx(z - 5, abs=TOL)
    assert r.ln_ppl_sliced == pytest.approx(0.5 * (z - 5) + 0.5 * z, abs=TOL)
    assert r.ln_ppl_ratio == pytest.approx(r.ln_ppl_dense / r.ln_ppl_sliced, abs=TOL)


def test_position_buckets_and_streaming_equals_one_shot() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 40, 11, generator=g), torch.randn(3, 40, 11, generator=g)
    t = torch.randint(0, 11, (3, 40), generator=g)
    edges = (0, 16, 32)
    acc = ShiftAccumulator(edges, chunk_tokens=7)  # chunk size that splits batch rows and buckets
    acc.update(a[:2], b[:2], t[:2])
    acc.update(a[2:], b[2:], t[2:])
    res = acc.result()
    assert [(x.lo, x.hi, x.stats.tokens) for x in res.buckets] == [(0, 16, 48), (16, 32, 48), (32, None, 24)]
    per = token_shift(a.reshape(-1, 11), b.reshape(-1, 11), t.reshape(-1))
    kl = per["kl"].reshape(3, 40)
    # Position 15 is in bucket 0 and 16 in bucket 1: each bucket mean is that slice's mean.
    assert res.buckets[0].stats.kl == pytest.approx(kl[:, :16].mean().item(), abs=TOL)
    assert res.buckets[1].stats.kl == pytest.approx(kl[:, 16:32].mean().item(), abs=TOL)
    assert res.buckets[2].stats.kl == pytest.approx(kl[:, 32:].mean().item(), abs=TOL)
    one_shot = output_shift(a, b, t, bucket_edges=edges)
    assert one_shot.overall.kl == pytest.approx(res.overall.kl, abs=TOL)
    assert one_shot.overall.js == pytest.approx(per["js"].mean().item(), abs=TOL)
    json.dumps(res.to_dict(), allow_nan=False)


def test_mask_excludes_tokens_and_empty_buckets_report_none() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 10, 5, generator=g), torch.randn(1, 10, 5, generator=g)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, :4] = True
    targets = torch.full((1, 10), -100)
    targets[0, :4] = 1  # -100 labels are fine where masked out
    r = output_shift(a, b, targets, mask=mask, bucket_edges=(0, 2, 8))
    assert [x.stats.tokens for x in r.buckets] == [2, 2, 0]
    assert r.buckets[2].stats.kl is None
    logp, logq = a[0, :4].double().log_softmax(-1), b[0, :4].double().log_softmax(-1)
    assert r.overall.kl == pytest.approx(kl_divergence(logp, logq).mean().item(), abs=TOL)


def test_without_targets_ln_ppl_is_none() -> None:
    a = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(5))
    r = output_shift(a, a + 1.0).overall  # a constant shift of logits leaves the softmax unchanged
    assert r.ln_ppl_dense is None and r.ln_ppl_ratio is None
    assert r.kl == pytest.approx(0.0, abs=TOL)


def test_bad_inputs() -> None:
    a = torch.randn(2, 3, 4)
    with pytest.raises(MechsliceError, match="equal shapes"):
        output_shift(a, torch.randn(2, 3, 5))
    with pytest.raises(MechsliceError, match="equal shapes"):
        output_shift(a[0], a[0])
    with pytest.raises(MechsliceError, match="one device"):
        output_shift(a, a.to("meta"))
    with pytest.raises(MechsliceError, match="targets has shape"):
        output_shift(a, a, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(MechsliceError, match=r"token ids in \[0, 4\)"):
        output_shift(a, a, torch.full((2, 3), 4))
    with pytest.raises(MechsliceError, match="start at 0"):
        ShiftAccumulator((16, 64))
    with pytest.raises(MechsliceError, match="strictly increase"):
        ShiftAccumulator((0, 64, 64))
    with pytest.raises(MechsliceError, match="chunk_tokens"):
        ShiftAccumulator(chunk_tokens=0)
    acc = ShiftAccumulator()
    acc.update(a, a, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(MechsliceError, match="every update or to none"):
        acc.update(a, a)
