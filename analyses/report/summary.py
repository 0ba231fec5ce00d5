"""The report's plain-language findings, generated from the fitted numbers: Prop. 2, Prop. 3 per task, the
entropy prediction, and the quick-profile warning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analyses.chance import CORRECTED_FORM, PAPER_FORM, TIE, ChanceLaw
from analyses.entropy import RANK
from analyses.laws import FitRow, FitTable, entropy_predictions
from analyses.paper import PAPER_SHORT, PAPER_TABLE3
from analyses.report.markup import ci_text, corpus_label, fmt, sparsity_count, task_label
from analyses.results import PPL, STDERR_KEYS, dense_record

# acc0 closer than this to chance (yet clear of the at-chance rule's 3 standard errors) leaves ln(acc/acc0) little
# room to fall (at most ln(chance/acc0)).
NEAR_CHANCE = 0.05


# A slope interval wider than +-0.25 cannot tell the paper's two models apart (a = -1.08 and -0.90) nor either
# from -1 by more than its own width, so the summary calls it inconclusive instead of "holds".
DECISIVE_HALF_WIDTH = 0.25


def _prop2_summary(table: FitTable) -> str:
    row = table.row(PPL)
    f = row.fit
    text = (
        f"Perplexity law (Prop. 2, y = ln PPL0 / ln PPL): our fit is y = {f.a:+.3f}·s {f.b:+.3f} "
        f"(RMSE {f.rmse:.3f}, R² {fmt(f.r2)}, {f.n} points, PPL0 = {fmt(table.ppl0, '.3g')}). "
    )
    if f.a_ci is None or f.b_ci is None:
        text += (
            "With under three sparsities beside the dense model there are no confidence intervals (the dense "
            "point is exact, so it adds no degree of freedom): the paper's line cannot be tested. "
        )
    elif (f.a_ci[1] - f.a_ci[0]) / 2 > DECISIVE_HALF_WIDTH:
        text += (
            f"Our 95% interval on a, {ci_text(f.a_ci)}, is too wide to confirm or reject the paper's slope -1 "
            "(more sparsities or more evaluation tokens would narrow it). "
        )
    elif f.a_ci[0] <= -1.0 <= f.a_ci[1] and f.b_ci[0] <= 1.0 <= f.b_ci[1]:
        text += f"The paper's y = 1 - s lies inside our 95% intervals (a {ci_text(f.a_ci)}, b {ci_text(f.b_ci)}): Prop. 2 holds here. "
    else:
        text += (
            f"The paper's y = 1 - s lies outside our 95% intervals (a {ci_text(f.a_ci)}, b {ci_text(f.b_ci)}): "
            "Prop. 2 does not hold exactly here. "
        )
    text += _dropped_sentence(row)
    text += f"Read literally, y = 1 - s misses our points by RMSE {fmt(row.literal_rmse)}. "
    anchored = row.anchored
    text += (
        f"Through the dense point (y = 1 + a·s, which knows y(0) = 1 exactly): a = {anchored.a:+.3f} "
        f"{ci_text(anchored.a_ci)}, RMSE {anchored.rmse:.3f}. "
    )
    paper = row.paper
    slopes = sorted(p.a for p in paper.values())
    if slopes:
        where = (
            "steeper than both"
            if f.a < slopes[0]
            else "shallower than both"
            if f.a > slopes[-1]
            else "between them"
        )
        listed = "; ".join(
            f"{PAPER_SHORT[m]} a = {p.a:+.2f}, b = {p.b:.2f}, RMSE {p.rmse:.2f}" for m, p in paper.items()
        )
        text += f"Table 3 has {listed}; our slope is {where}."
    return text


def _dropped_sentence(row: FitRow) -> str:
    """The sentence naming the points the fit left out; for accuracy (acc = 0) they fell furthest, so the
    slope is biased toward 0."""
    note = row.points.dropped_note()
    if note is None:
        return ""
    bias = "; those fell furthest, so the slope is biased toward 0" if row.metric == "accuracy" else ""
    return f"Left out of the fit: {note}{bias}. "


def _resolved(results: dict[str, Any], task: str, acc_key: str) -> bool | None:
    """Does any sliced accuracy differ from acc0 by more than two combined standard errors? None: no stderr."""
    dense = dense_record(results)
    key = STDERR_KEYS[acc_key]
    m0 = dense.get("tasks", {}).get(task, {})
    if m0.get(key) is None:
        return None
    zs = []
    for rec in results["records"]:
        m = rec.get("tasks", {}).get(task, {})
        if rec is dense or m.get(acc_key) is None or m.get(key) is None:
            continue
        se = math.hypot(m[key], m0[key])
        zs.append(abs(m[acc_key] - m0[acc_key]) / se if se > 0 else math.inf)
    return None if not zs else max(zs) > 2.0


def _prop3_summary(table: FitTable, task: str, results: dict[str, Any]) -> str:
    row = table.row(task)
    f = row.fit
    interval = "" if f.a_ci is None else f" {ci_text(f.a_ci)}"
    text = f"{task_label(task)}: a = {f.a:+.3f}{interval}, b = {f.b:+.3f}, RMSE {f.rmse:.3f}, R² {fmt(f.r2)}"
    paper = PAPER_TABLE3.get(task, {})
    if paper:
        text += " (Table 3: " + ", ".join(f"{PAPER_SHORT[m]} a = {p.a:+.2f}" for m, p in paper.items()) + ")"
    text += f". Through the dense point a = {row.anchored.a:+.3f} {ci_text(row.anchored.a_ci)}. "
    text += _dropped_sentence(row)
    if f.a_ci is None:
        text += "Under three sparsities beside the dense model: no interval on the slope. "
    elif f.a_ci[1] < 0.0:
        text += "Accuracy falls with s, as Prop. 3 says. "
    elif f.a_ci[0] > 0.0:
        text += "Accuracy rises with s, against Prop. 3. "
    else:
        text += "The slope's interval includes 0: no significant trend. "
    acc0, law = table.acc0s.get(task), row.chance
    if acc0 is not None and law is not None:
        chance = law.chance
        text += f"acc0 = {acc0:.3f} against chance {chance:.3f}. "
        if law.at_chance is not None:
            text += f"The dense model is {law.at_chance}. "
        elif acc0 <= chance:
            text += "The dense model is already below chance, so this slope carries no signal. "
        elif acc0 - chance < NEAR_CHANCE:
            text += (
                f"That is close to chance: ln(acc/acc0) can fall by at most ln(chance/acc0) = "
                f"{math.log(chance / acc0):+.3f} before the model is guessing, so this slope carries little signal. "
            )
    if _resolved(results, task, table.acc_key) is False:
        text += "No accuracy change exceeds two standard errors of the item sample. "
    if law is not None:
        text += _corrected_sentence(law)
    return text.rstrip()


def _corrected_sentence(law: ChanceLaw) -> str:
    """The chance-corrected law's slope and which form predicts the held-out accuracies better."""
    if law.fit is None:
        return "" if law.at_chance else f"Chance-corrected law not fitted: {law.not_fitted}. "
    text = f"Chance-corrected, ln((acc - c)/(acc0 - c)): a = {law.fit.a:+.3f} {ci_text(law.fit.a_ci)}, b = {law.fit.b:+.3f}. "
    duel = law.comparison
    if duel is None or duel.better is None:
        return text + "Leave-one-out cannot compare the two forms (a fold cannot be fitted). "
    verdict = {TIE: "both forms predict equally well"}.get(
        duel.better, f"the {duel.better} form predicts better"
    )
    return text + (
        f"Leave-one-out accuracy error over {sparsity_count(duel.n)}: paper's form {duel.paper_rmse:.4f}, "
        f"chance-corrected {duel.corrected_rmse:.4f}: {verdict}. "
    )


def _forms_summary(table: FitTable) -> str | None:
    """One line: on how many tasks each form of the accuracy law predicts held-out points better."""
    verdicts = {
        r.dataset: r.chance.comparison.better
        for r in table.rows
        if r.chance is not None and r.chance.comparison is not None and r.chance.comparison.better
    }
    if not verdicts:
        return None
    parts = [
        f"{form} on {len(names)} ({', '.join(map(task_label, names))})"
        for form in (CORRECTED_FORM, PAPER_FORM, TIE)
        if (names := [t for t, v in verdicts.items() if v == form])
    ]
    return f"Which form of the accuracy law predicts left-out sparsities better (leave-one-out): {'; '.join(parts)}."


def _entropy_summary(results: dict[str, Any]) -> list[str]:
    """Per estimator: how far ln PPL0 / (H'/H) lands from the measured ln PPL, beside ln PPL0 / (1 - s), and
    how many layers the signal left out."""
    lines = []
    for estimator, preds in entropy_predictions(results).items():
        sliced = [p for p in preds if p.effective_sparsity > 0.0]
        if not sliced:
            continue
        abs_err = float(np.mean([p.abs_error for p in sliced]))
        rel_err = float(np.mean([p.rel_error for p in sliced]))
        # ln PPL0 = predicted * ratio, so the literal law's prediction at the same points is that / (1 - s).
        literal = [
            abs(p.ln_ppl_predicted * p.ratio / (1.0 - p.effective_sparsity) - p.ln_ppl_measured)
            / p.ln_ppl_measured
            for p in sliced
        ]
        name, ratio = (
            ("effective rank", "erank'/erank") if estimator == RANK else (f"{estimator} entropy", "H'/H")
        )
        line = (
            f"From internals ({name}): ln PPL = ln PPL0 / ({ratio}) misses the "
            f"measured ln PPL by {abs_err:.3f} nats on average ({rel_err:.1%}) over "
            f"{sparsity_count(len(sliced))}; the same law with 1 - s in its place misses by "
            f"{float(np.mean(literal)):.1%}."
        )
        left_out = sum(len(p.excluded) for p in sliced)
        if left_out:
            line += f" The mean ratio left out {left_out} (layer, sparsity) pairs (see the prediction table)."
        lines.append(line)
    return lines


def quick_note(settings: dict[str, Any]) -> str | None:
    """The warning that a quick-profile sweep is a smoke test, with its sizes; None for a full sweep."""
    if not settings.get("quick"):
        return None
    sizes = [
        f"{settings[k]} {what}"
        for k, what in (
            ("calib_samples", "calibration windows"),
            ("calib_seqlen", "tokens per window"),
            ("ppl_max_tokens", "perplexity tokens at most"),
            ("mc_limit", "items per task at most"),
            ("probe_tokens", "tokens for entropy and shift"),
        )
        if settings.get(k) is not None
    ]
    detail = f" ({', '.join(sizes)})" if sizes else ""
    return (
        f"This is the quick profile{detail}: small calibration, few tokens and items. It checks that the "
        "pipeline runs end to end; it is not a result to quote."
    )


def summary(results: dict[str, Any], table: FitTable | None, fit_error: str | None) -> list[str]:
    """Plain-language findings, generated from the numbers: Prop. 2, Prop. 3 per task, entropy prediction.

    The quick-profile warning (`quick_note`) is not among them: the page shows it as a banner above them.
    """
    if table is None:
        return [f"No law could be fitted: {fit_error}. Figs. 3a and 3b and Table 3 are left out."]
    lines = []
    settings = results.get("settings") or {}
    fitted = {r.dataset for r in table.rows}
    if PPL in fitted:
        lines.append(_prop2_summary(table))
    else:
        lines.append(f"Perplexity law ({corpus_label(settings)}): {table.skipped[PPL]}")
    tasks = [r.dataset for r in table.rows if r.metric == "accuracy"]
    if tasks:
        lines.append(f"Accuracy law (Prop. 3, y = ln(acc/acc0), {table.acc_key}):")
        lines += [_prop3_summary(table, t, results) for t in tasks]
        forms = _forms_summary(table)
        lines += [] if forms is None else [forms]
    lines += [f"{task_label(name)}: {why}" for name, why in table.skipped.items() if name != PPL]
    lines += _entropy_summary(results)
    return lines
