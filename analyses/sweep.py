"""The sparsity sweep behind Figure 3 and Table 3: slice, evaluate, look inside, record, one sparsity at a time.

Each finished sparsity is appended to `DIR/results.json` atomically, so an interrupted run loses nothing that
finished and `resume=True` skips it. The dense model (s = 0, the original weights, not fused or rotated) is
always the first record: every law is a ratio against it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from analyses.entropy import (
    RANK,
    SIGNAL,
    STREAMS,
    EntropySummary,
    RatioSignal,
    finite_or_none,
    layer_entropy_summary,
    stream_spectra,
)
from analyses.layer_entropy import check_estimators, check_gaussian_rows, residual_samples
from analyses.results import (
    PPL,
    RESULTS_FILE,
    check_same_model,
    load_results,
    model_fingerprint,
    new_results,
    results_dtype,
    write_results,
)
from analyses.shift import shift_over_windows
from mechslice import distributed
from mechslice.atomic import atomic_write_json
from mechslice.checks import check_output_dir, check_seqlen, check_sparsity
from mechslice.corpora import CALIBRATION_SEED, calibration_windows, corpus_tokens, eval_windows
from mechslice.errors import MechsliceError
from mechslice.lmeval import MC_BACKENDS, harness_mc, require_lm_eval
from mechslice.loaded import LoadedModel
from mechslice.loading import DEFAULT_MODEL, default_device, load_model
from mechslice.mc import TASKS, MCResult, evaluate_mc
from mechslice.mc.tasks import check_limit
from mechslice.perplexity import evaluate_perplexity
from mechslice.precision import AUTO, DTYPES, dtype_name, resolve_dtype
from mechslice.pruning import (
    METHODS,
    PARAM_COUNTS,
    PruneOptions,
    PruningRecord,
    check_prunable,
    count_parameters,
    kept_units,
    nearest_sparsity,
    param_sparsity,
    prune,
)
from mechslice.slicing import Slicer, slice_model, sliced_width

# What a results file that predates a setting was computed with, where that differs from today's default.
PREDATING: dict[str, Any] = {
    "slice_head": True,
    "calib_sampler": "offsets",
    "entropy_stream": "raw",
    "include_knn": True,  # the kNN ratio entered the predictor before the flag existed
}
# The dense record's key for each layer's covariance spectrum of the stream (`analyses.entropy.StreamSpectra`).
STREAM_SPECTRA = "stream_spectra"


@dataclass(frozen=True)
class SweepSettings:
    """Everything that determines a sweep's numbers; a resumed sweep must use the same settings."""

    sparsities: tuple[float, ...] = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
    tasks: tuple[str, ...] = (PPL, "arc_easy", "arc_challenge", "winogrande", "piqa")
    rotation: str = "per-layer"
    path: str = "exact"  # "exact": calibrate each sparsity on its own sliced layers; "shared": calibrate once
    round_to: int = 8
    slice_head: bool = False  # SliceGPT's default: the last MLP output and the head keep width d
    calib_sampler: str = "slicegpt"  # a name in mechslice.corpora.SAMPLERS
    calib_corpus: str = "wiki"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    ppl_corpus: str = "wiki"
    ppl_seqlen: int = 2048
    ppl_max_tokens: int | None = None
    mc_limit: int | None = None
    estimators: tuple[str, ...] = ("gaussian", "marginal")  # knn only with include_knn: see analyses.entropy
    include_knn: bool = False
    entropy_stream: str = "normalised"  # "normalised" (x / rms(x), the unit the model fixes) or "raw"
    probe_tokens: int = 4096  # tokens of the test split on which entropy and output shift are measured
    probe_seqlen: int = 512
    batch_size: int = 4
    mc_batch_size: int = 16
    mc_backend: str = "ours"  # a name in MC_BACKENDS
    quick: bool = False
    # compute dtype of every model in the sweep: auto or a name in mechslice.precision.DTYPES; run_sweep
    # resolves auto on its device, so results.json always records the concrete dtype the numbers were made in
    dtype: str = AUTO
    # the pruning axis (a name in mechslice.pruning.METHODS): `sparsities` are fractions of its own axis (d, m,
    # KV groups or blocks); mlp, heads and layers score their units on the dense model, so `path` is slice's
    method: str = "slice"
    # the parameter sparsities the sparsities were matched to (`analyses.methods`), recorded; None: given directly
    param_sparsities: tuple[float, ...] | None = None
    param_sparsity_of: str = "non_embedding"  # which parameters a parameter sparsity counts
    keep_first: bool = False  # layers: never remove the first block
    keep_last: bool = False  # layers: never remove the last block

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for results.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def prune_options(self) -> PruneOptions:
        """The options `mechslice.pruning.prune` takes from these settings."""
        return PruneOptions(self.round_to, self.keep_first, self.keep_last, self.rotation, self.slice_head)


# The profile `make demo` runs: small calibration, few tokens and items, the shared-rotation path (one
# calibration for all sparsities). It shows the whole pipeline in minutes; its numbers are not ones to quote.
QUICK = SweepSettings(
    path="shared",
    calib_samples=16,
    calib_seqlen=512,
    ppl_seqlen=512,
    ppl_max_tokens=4096,
    mc_limit=10,
    estimators=("gaussian", "marginal"),
    probe_tokens=1024,  # the Gaussian estimator needs more tokens than d (576 for the embedded model)
    quick=True,
)


def settings_from(base: SweepSettings, **overrides: Any) -> SweepSettings:
    """`base` with the non-None overrides applied, validated."""
    known = {f.name for f in fields(SweepSettings)}
    settings = replace(base, **{k: v for k, v in overrides.items() if v is not None and k in known})
    check_settings(settings)
    return settings


def check_settings(settings: SweepSettings) -> None:
    """Refuse sparsity lists and task names the sweep cannot run, with what to do instead."""
    s = settings.sparsities
    if not s:
        raise MechsliceError("the sparsity list is empty; give e.g. --sparsities 0,0.1,0.2")
    for x in s:
        check_sparsity(x, "sparsities", "--sparsities 0,0.1,0.2")
    if list(s) != sorted(set(s)):
        raise MechsliceError(f"sparsities must be strictly increasing without repeats, got {list(s)}")
    unknown = [t for t in settings.tasks if t != PPL and t not in TASKS]
    if unknown or not settings.tasks:
        valid = ", ".join([PPL, *TASKS])
        raise MechsliceError(f"unknown task(s) {unknown or '(none given)'}; choose from {valid}")
    if settings.path not in ("exact", "shared"):
        raise MechsliceError(f"unknown slicing path '{settings.path}'; use exact or shared")
    check_estimators(settings.estimators, settings.include_knn)
    if settings.entropy_stream not in STREAMS:
        raise MechsliceError(
            f"unknown entropy stream '{settings.entropy_stream}'; use {' or '.join(STREAMS)}"
        )
    if settings.dtype not in (AUTO, *DTYPES):
        raise MechsliceError(f"unknown dtype '{settings.dtype}'; use one of {', '.join([AUTO, *DTYPES])}")
    if settings.method not in METHODS:
        raise MechsliceError(f"unknown pruning method '{settings.method}'; use one of {', '.join(METHODS)}")
    if settings.param_sparsity_of not in PARAM_COUNTS:
        raise MechsliceError(
            f"a parameter sparsity counts {' or '.join(PARAM_COUNTS)} parameters, not '{settings.param_sparsity_of}'"
        )
    if (settings.keep_first or settings.keep_last) and settings.method != "layers":
        raise MechsliceError(
            "--keep-first/--keep-last apply to the layers method only; add --methods layers (or a list with it)"
        )
    settings.prune_options().check()
    if settings.mc_backend not in MC_BACKENDS:
        raise MechsliceError(f"unknown MC backend '{settings.mc_backend}'; use {' or '.join(MC_BACKENDS)}")
    if settings.mc_backend == "lm-eval" and any(t != PPL for t in settings.tasks):
        require_lm_eval()
    check_limit(settings.mc_limit)
    if settings.probe_tokens < settings.probe_seqlen:
        raise MechsliceError(
            f"--probe-tokens {settings.probe_tokens} is less than one probe window of {settings.probe_seqlen} "
            f"tokens; pass --probe-tokens {settings.probe_seqlen} or more"
        )


def probe_token_count(settings: SweepSettings) -> int:
    """Tokens entropy and output shift are measured on: whole probe windows within --probe-tokens."""
    return settings.probe_tokens // settings.probe_seqlen * settings.probe_seqlen


@dataclass
class _Probe:
    """The fixed evaluation inputs shared by every sparsity."""

    # three window sets of three lengths: each its own length name, since a checker binds a name to one size
    ppl_windows: Int[Tensor, "w ppl_seqlen"] | None
    probe_windows: Int[Tensor, "p probe_seqlen"]
    calib: Int[Tensor, "n calib_seqlen"]
    dense_samples: dict[int, Tensor] | None = None  # E_out rows of the dense model, traced once


def _probe(lm: LoadedModel, settings: SweepSettings) -> _Probe:
    ppl_windows = None
    if PPL in settings.tasks:
        ids = corpus_tokens(lm.tokenizer, settings.ppl_corpus, "test")
        ppl_windows = eval_windows(ids, settings.ppl_seqlen, settings.ppl_max_tokens)
    probe = probe_windows(lm, settings.ppl_corpus, settings.probe_seqlen, settings.probe_tokens)
    calib = calibration_windows(
        lm.tokenizer,
        settings.calib_corpus,
        settings.calib_samples,
        settings.calib_seqlen,
        CALIBRATION_SEED,
        settings.calib_sampler,
    )
    return _Probe(ppl_windows, probe, calib)


def probe_windows(lm: LoadedModel, corpus: str, seqlen: int, tokens: int) -> Int[Tensor, "w seqlen"]:
    """The test-split windows residual entropy and output shift are measured on (`probe_tokens` tokens)."""
    return eval_windows(corpus_tokens(lm.tokenizer, corpus, "test"), seqlen, tokens)


def _evaluate(
    lm: LoadedModel,
    dense: LoadedModel,
    probe: _Probe,
    settings: SweepSettings,
    progress: bool,
    blocks: list[int] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Perplexity, task accuracies, residual entropy and output shift of one (pruned or dense) model;
    `blocks` are the dense indices of `lm`'s blocks where some were removed."""
    out: dict[str, Any] = {"tasks": {}}
    seconds: dict[str, float] = {}
    if probe.ppl_windows is not None:
        result = evaluate_perplexity(lm.model, probe.ppl_windows, settings.batch_size, progress)
        out["ppl"], out["ppl_tokens"], seconds[PPL] = result.ppl, result.tokens, result.seconds
    for task in (t for t in settings.tasks if t != PPL):
        mc = _score_mc(lm, task, settings, progress)
        out["tasks"][task] = {
            "acc": mc.acc,
            "acc_norm": mc.acc_norm,
            "stderr": mc.acc_stderr,
            "acc_norm_stderr": mc.acc_norm_stderr,
            "n": mc.n,
            "split": mc.split,
            "chance": mc.chance,
            **({} if mc.perplexity is None else {"perplexity": mc.perplexity}),
        }
        seconds[task] = mc.seconds
    start = time.perf_counter()
    out["entropy"] = residual_entropy(dense, lm, probe, settings, blocks)
    seconds["entropy"] = time.perf_counter() - start
    start = time.perf_counter()
    out["shift"] = shift_over_windows(dense.model, lm.model, probe.probe_windows).to_dict()
    seconds["shift"] = time.perf_counter() - start
    return out, seconds


def _score_mc(lm: LoadedModel, task: str, settings: SweepSettings, progress: bool) -> MCResult:
    """One task's accuracies by the settings' MC backend."""
    if settings.mc_backend == "lm-eval":
        return harness_mc(lm, task, settings.mc_limit, settings.mc_batch_size, progress)
    return evaluate_mc(
        lm.model, lm.tokenizer, task, settings.mc_limit, settings.mc_batch_size, progress=progress
    )


def residual_entropy(
    dense: LoadedModel,
    sliced: LoadedModel,
    probe: _Probe,
    settings: SweepSettings,
    blocks: list[int] | None = None,
) -> dict[str, Any]:
    """Per-layer entropy of the block outputs E_out, sliced against dense, per estimator (record layout).

    With `blocks` (the dense index of each block of a model that lost some), block i's output is compared
    with the dense output of block `blocks[i]`, and the record names them under `layers`.

    `ratio_mean` is `analyses.entropy.SIGNAL` (the mean over the layers where the ratio reads as a fraction
    kept), `ratio_layers` the layers it averages and `excluded_layers` the others with why; the effective
    rank sits beside the estimators under `effective_rank`, with the same keys.
    """
    rows = probe.probe_windows.numel()
    if probe.dense_samples is None:
        probe.dense_samples = residual_samples(dense, probe.probe_windows, rows)
    pruned = residual_samples(sliced, probe.probe_windows, rows)
    reference = probe.dense_samples
    if blocks is not None:
        pruned = {blocks[i]: rows_i for i, rows_i in pruned.items()}
        reference = {i: reference[i] for i in blocks}
    summary = layer_entropy_summary(
        reference,
        pruned,
        settings.estimators,
        stream=settings.entropy_stream,
        include_knn=settings.include_knn,
    )
    record = entropy_record(summary, settings.estimators)
    return record if blocks is None else {**record, "layers": blocks}


def entropy_record(summary: EntropySummary, estimators: Sequence[str]) -> dict[str, Any]:
    """A record's `entropy` section from the per-layer summary (the layout `residual_entropy` documents)."""
    layers = summary.layers
    out: dict[str, Any] = {
        "stream": summary.stream,
        "signal": SIGNAL,
        "d_sliced_per_layer": [layer.d_prime for layer in layers],
    }
    for name in estimators:
        per = [layer.estimators[name] for layer in layers]
        out[name] = {
            "per_layer_dense": [c.H_dense for c in per],
            "per_layer": [c.H_sliced for c in per],
            "ratio_per_layer": [c.ratio for c in per],
            "same_sign_per_layer": [c.same_sign for c in per],
            "unit_sensitivity_per_layer": [c.unit_sensitivity for c in per],
            **_signal_keys(summary.signals[name]),
            "same_sign": all(c.same_sign for c in per),
            "kappa_mean": sum(c.kappa_sliced for c in per) / len(per),
            "kappa_dense_mean": sum(c.kappa_dense for c in per) / len(per),
        }
    if RANK in summary.signals:
        ranks = [layer.effective_rank for layer in layers if layer.effective_rank is not None]
        out[RANK] = {
            "per_layer_dense": [r.dense for r in ranks],
            "per_layer": [r.sliced for r in ranks],
            "ratio_per_layer": [r.ratio for r in ranks],
            **_signal_keys(summary.signals[RANK]),
        }
    return finite_or_none(out)


def _signal_keys(signal: RatioSignal) -> dict[str, Any]:
    return {"ratio_mean": signal.ratio, "ratio_layers": signal.layers, "excluded_layers": signal.excluded}


def run_sweep(
    settings: SweepSettings,
    out_dir: Path,
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    dense_result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep into `out_dir/results.json` and return the results document.

    `dense_result` is a dense record measured by another sweep with the same evaluation settings (the first
    method of `analyses.methods`, which names itself under `measured_in`): it is copied, not evaluated again. Under torchrun every rank runs the
    sweep on the same inputs: calibration, perplexity windows and MC items are sharded and reduced inside
    `slice_model` / `Slicer` / the evaluators; only rank 0 writes files.
    """
    check_settings(settings)
    check_output_dir(out_dir, "--out")
    if held := held_methods(out_dir):
        raise MechsliceError(
            f"'{out_dir}' holds a methods sweep ({', '.join(held)}); choose another --out, or pass --methods to "
            "continue that one"
        )
    dtype, _ = resolve_dtype(settings.dtype, device or default_device())
    settings = replace(settings, dtype=dtype_name(dtype))

    def load() -> LoadedModel:
        return load_model(model, device=device, dtype=dtype)

    dense = load()
    check_against_model(dense, settings)
    results = start_results(out_dir, settings, dense, resume)
    done = {rec["sparsity"] for rec in results["records"]}
    todo = [s for s in _with_dense(settings.sparsities) if s not in done]
    if done:
        log(f"resuming: {len(done)} sparsities already in {out_dir / RESULTS_FILE}, {len(todo)} to go")
    probe = _probe(dense, settings)
    targets = matched_targets(dense, settings)
    dense_params = count_parameters(dense)
    slicer = None
    for s in tqdm(todo, desc=f"sweep ({settings.method})", unit="sparsity", disable=not progress):
        start = time.perf_counter()
        if s == 0.0 and dense_result is not None:
            _append(out_dir, results, dict(dense_result), log)
            continue
        blocks = None  # the original indices of the blocks a `layers` pruning kept
        if s == 0.0:
            lm, record = dense, {"effective_sparsity": 0.0, "d": dense.dims.d, "d_prime": dense.dims.d}
        elif settings.method != "slice":
            lm = load()
            pruned = prune(lm, settings.method, s, probe.calib, settings.prune_options(), progress=progress)
            record = {
                "effective_sparsity": pruned.effective_sparsity,
                "d": pruned.d,
                "d_prime": pruned.representation_dim,
                "axis": pruned.axis,
                "pruning_file": _write_pruning(out_dir, s, pruned),
            }
            if settings.method == "layers":
                blocks = [i for i in range(pruned.units) if i not in set(pruned.removed or [])]
        else:
            if settings.path == "shared":
                if slicer is None:
                    base = load()
                    slicer = Slicer(base, probe.calib, settings.rotation, progress=progress)
                lm, rec = slicer.sliced(s, settings.round_to, settings.slice_head)
            else:
                lm = load()
                rec = slice_model(
                    lm,
                    s,
                    probe.calib,
                    settings.rotation,
                    settings.round_to,
                    progress=progress,
                    slice_head=settings.slice_head,
                )
            record = {
                "effective_sparsity": rec.effective_sparsity,
                "d": rec.d,
                "d_prime": rec.d_prime,
                "spectra_file": _write_spectra(out_dir, s, rec.spectra),
            }
        record["param_sparsity"] = param_sparsity(dense_params, count_parameters(lm))
        if s > 0.0 and s in targets:  # a target nearest the dense model is listed by `analyses.methods`
            record["param_targets"] = targets[s]
        sliced_at = time.perf_counter()
        measured, seconds = _evaluate(lm, dense, probe, settings, progress, blocks)
        if s == 0.0 and probe.dense_samples is not None:  # what `predict --method dense` reads
            record[STREAM_SPECTRA] = stream_spectra(probe.dense_samples, settings.entropy_stream).to_dict()
        seconds["slice"] = sliced_at - start
        seconds["total"] = time.perf_counter() - start
        _append(out_dir, results, {**record, **measured, "seconds": seconds}, log, s)
        del lm
    return results


def _append(
    out_dir: Path, results: dict[str, Any], record: dict[str, Any], log: Callable[[str], None], s: float = 0.0
) -> None:
    """Add one finished sparsity's record and write results.json at once (atomically)."""
    results["records"].append({"sparsity": s, **record})
    results["records"].sort(key=lambda r: r["sparsity"])
    distributed.on_main(lambda: write_results(out_dir, results))
    log(_line(results["records"], s))


def held_methods(out_dir: Path) -> list[str]:
    """The methods whose sweep folder (`out_dir/<method>/results.json`, `analyses.methods`) lies in `out_dir`."""
    return [m for m in METHODS if (out_dir / m / RESULTS_FILE).is_file()]


def check_against_model(dense: LoadedModel, settings: SweepSettings) -> None:
    """Refuse, before any work, settings this model cannot run: a sparsity that would leave nothing of the
    method's axis, a window beyond its context, too few probe tokens for a Gaussian entropy of width d."""
    for s in settings.sparsities:
        if settings.method == "slice":
            sliced_width(dense.dims.d, s, settings.round_to)
        elif s > 0.0:
            kept_units(dense, settings.method, s, settings.prune_options())
    if settings.method != "slice":
        check_prunable(dense)
    check_gaussian_rows(settings.estimators, probe_token_count(settings), dense.dims.d, "--probe-tokens")
    context = dense.model.config.max_position_embeddings
    for seqlen, flag in (
        (settings.calib_seqlen, "--calib-seqlen"),
        (settings.ppl_seqlen, "--seqlen"),
        (settings.probe_seqlen, "the probe window (probe_seqlen)"),
    ):
        check_seqlen(seqlen, context, flag)


def matched_targets(dense: LoadedModel, settings: SweepSettings) -> dict[float, list[float]]:
    """Own-axis sparsity -> the parameter sparsities matched to it (`settings.param_sparsities`)."""
    if settings.param_sparsities is None:
        return {}
    out: dict[float, list[float]] = {}
    for target in settings.param_sparsities:
        match = nearest_sparsity(
            dense, settings.method, target, settings.param_sparsity_of, settings.prune_options()
        )
        out.setdefault(match.sparsity, []).append(target)
    return out


def _write_pruning(out_dir: Path, s: float, record: PruningRecord) -> str:
    """What `prune` did at sparsity s (scores, ranking, removed units, parameters), in its own file."""
    relative = f"pruning/s{s:.3f}.json"
    distributed.on_main(lambda: atomic_write_json(out_dir / relative, record.to_dict()))
    return relative


def _write_spectra(out_dir: Path, s: float, spectra: dict[str, list[float]]) -> str:
    """The PCA eigenvalues of every rotation at sparsity s, in their own file (d numbers per rotation)."""
    relative = f"spectra/s{s:.3f}.json"
    rows = [
        {"name": name, "eigenvalues": [float(f"{v:.6g}") for v in values]} for name, values in spectra.items()
    ]
    distributed.on_main(lambda: atomic_write_json(out_dir / relative, rows))
    return relative


def _with_dense(sparsities: tuple[float, ...]) -> list[float]:
    return sorted({0.0, *sparsities})


def start_results(out_dir: Path, settings: SweepSettings, dense: LoadedModel, resume: bool) -> dict[str, Any]:
    """The results document a sweep into `out_dir` starts from: a new one, or (with `resume`) the one there,
    refused when it was made with other settings, another dtype or another model. Writes nothing."""
    settings = replace(settings, dtype=dtype_name(dense.model.dtype))
    return _start(out_dir, settings, dense.name, model_fingerprint(dense), resume)


def _start(
    out_dir: Path, settings: SweepSettings, name: str, fingerprint: str, resume: bool
) -> dict[str, Any]:
    path = out_dir / RESULTS_FILE
    if not path.exists():
        return new_results(name, fingerprint, settings.to_dict())
    if not resume:
        raise MechsliceError(f"'{path}' exists; pass --resume to continue it or choose another --out")
    results = load_results(out_dir)
    if (made_in := results_dtype(results)) != settings.dtype:
        raise MechsliceError(
            f"'{path}' was computed in {made_in}, this run would compute in {settings.dtype}; "
            f"pass --dtype {made_in} to resume it or choose another --out"
        )
    # a setting the file predates counts as what the code did before it existed, so such results still resume
    defaults = {**SweepSettings().to_dict(), **PREDATING}
    theirs = {**defaults, **results.get("settings", {}), "dtype": made_in}
    ours = settings.to_dict()
    differ = sorted(k for k in ours if theirs[k] != ours[k])
    if differ:
        raise MechsliceError(
            f"'{path}' was made with other settings ({', '.join(differ)}); resume with the same ones"
        )
    check_same_model(results, name, fingerprint)  # after the settings: a dtype change alters the weights
    return results


def _line(records: list[dict[str, Any]], s: float) -> str:
    rec = next(r for r in records if r["sparsity"] == s)
    parts = [f"s={s:.2f} (effective {rec['effective_sparsity']:.3f}, d'={rec['d_prime']})"]
    if rec.get("ppl") is not None:
        parts.append(f"ppl {rec['ppl']:.2f}")
    parts += [f"{t} {v['acc']:.3f}" for t, v in rec["tasks"].items()]
    return "  ".join(parts)
