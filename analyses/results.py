"""The one owner of a sweep's `results.json`: its file name, its schema as typed records, load and validate,
atomic write, and the fingerprint that ties a results file to one model.

The document is `{"model", "model_fingerprint", "settings", "records"}`; each record (`SweepRecord`) is one
sparsity: the nominal and effective sparsity, d and d', where its rotation spectra are, perplexity, one
`TaskScore` per multiple-choice task, the residual-stream entropy and the output shift as measured (nested
objects written by `analyses.sweep`), and the seconds each step took. Readers receive the validated document
as a dict (a resumed sweep appends to it and writes it back unchanged); `SweepRecord.from_dict` gives a
record's typed view.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mechslice.atomic import atomic_write_json
from mechslice.checks import check_sparsity
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel

RESULTS_FILE = "results.json"
PPL = "ppl"  # the perplexity "task" of the settings and the dataset key of its law
ACC_KEYS = ("acc", "acc_norm")
# Where a task's standard error is stored in a results record, per accuracy key.
STDERR_KEYS = {"acc": "stderr", "acc_norm": "acc_norm_stderr"}
DENSE_TOLERANCE = 1e-12  # effective sparsity below this is the dense model (it is 1 - d/d = 0 exactly)


def is_number(x: object) -> bool:
    """A finite int or float, not a bool: what every number of the schema must be."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class TaskScore:
    """One multiple-choice task's score in a record: accuracies with their standard errors, the item count n,
    the split scored, the chance level c, and the scorer's perplexity over the answers where it gives one.

    Fields a file predates are None (e.g. `n` and `chance` in older sweeps); `acc_norm` is None where the task
    defines no length normalisation (WinoGrande).
    """

    acc: float | None
    acc_norm: float | None = None
    stderr: float | None = None
    acc_norm_stderr: float | None = None
    n: int | None = None
    split: str | None = None
    chance: float | None = None
    perplexity: float | None = None  # written only when the scorer gives one

    @classmethod
    def from_dict(cls, metrics: dict[str, Any]) -> TaskScore:
        """The typed view of a record's `tasks[task]` object (absent fields: None)."""
        return cls(**{f.name: metrics.get(f.name) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The object results.json holds, in the sweep's key order (`perplexity` only when measured)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.perplexity is None:
            del out["perplexity"]
        return out

    def accuracy(self, acc_key: str) -> float | None:
        """The accuracy named by `acc_key` (`acc` or `acc_norm`)."""
        return self.acc if acc_key == "acc" else self.acc_norm

    def standard_error(self, acc_key: str) -> float | None:
        """The recorded standard error of the accuracy named by `acc_key`."""
        return self.stderr if acc_key == "acc" else self.acc_norm_stderr

    def sampling_error(self, acc_key: str) -> float | None:
        """Standard error of the accuracy: as recorded, else from the item count n (`scoring.rate`'s form)."""
        se, p = self.standard_error(acc_key), self.accuracy(acc_key)
        if is_number(se):
            return float(se)
        if isinstance(self.n, int) and self.n > 1 and is_number(p):
            return math.sqrt(p * (1.0 - p) / (self.n - 1))
        return None

    def item_count(self, acc_key: str) -> int | None:
        """Items behind the accuracy: the recorded n, else the n that `rate` would turn into the recorded SE."""
        if isinstance(self.n, int):
            return self.n
        se, p = self.standard_error(acc_key), self.accuracy(acc_key)
        if is_number(se) and se > 0 and is_number(p):
            return round(p * (1.0 - p) / se**2) + 1
        return None


# Record keys left out of the written object when they are None: a record has them only where measured.
_OPTIONAL = ("spectra_file", "stream_spectra", "ppl", "ppl_tokens", "entropy", "shift")


@dataclass(frozen=True)
class SweepRecord:
    """One sparsity of a sweep, the unit results.json is appended by (fields in the order it writes them).

    `sparsity` is the nominal sparsity asked for (None in files that predate it), `effective_sparsity` 1 - d'/d;
    `spectra_file` (sliced records) names the rotation spectra file, `stream_spectra` (the dense record) the
    dense stream's covariance spectra; `entropy` and `shift` are the nested objects the sweep measures.
    """

    sparsity: float | None
    effective_sparsity: float
    d: int | None = None
    d_prime: int | None = None
    spectra_file: str | None = None
    stream_spectra: dict[str, Any] | None = None
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    ppl: float | None = None
    ppl_tokens: int | None = None
    entropy: dict[str, Any] | None = None
    shift: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, rec: dict[str, Any]) -> SweepRecord:
        """The typed view of one validated record."""
        known = {f.name: rec.get(f.name) for f in fields(cls)}
        known["tasks"] = {t: TaskScore.from_dict(m) for t, m in (rec.get("tasks") or {}).items()}
        known["seconds"] = rec.get("seconds") or {}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """The object results.json holds for this sparsity."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            out[f.name] = {t: s.to_dict() for t, s in value.items()} if f.name == "tasks" else value
        return out

    @property
    def is_dense(self) -> bool:
        """The unpruned model's record (effective sparsity 0): it carries PPL0 and acc0."""
        return self.effective_sparsity < DENSE_TOLERANCE


def new_results(model: str, fingerprint: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The document a new sweep starts: no records yet."""
    return {"model": model, "model_fingerprint": fingerprint, "settings": settings, "records": []}


def write_results(directory: Path, results: dict[str, Any]) -> Path:
    """Write `directory/results.json` atomically (a reader sees the previous sparsity's file or this one)."""
    return atomic_write_json(directory / RESULTS_FILE, results)


def model_fingerprint(lm: LoadedModel) -> str:
    """A short hash of the config and the embedding weights: a results file belongs to one model."""
    digest = hashlib.sha256(lm.model.config.to_json_string(use_diff=False).encode())
    digest.update(lm.adapter.embeddings(lm.model).weight[:256].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- reading and checking results.json


def validate_results(results: object, where: str = RESULTS_FILE) -> dict[str, Any]:
    """Check the structure of a sweep's results (model, records with effective sparsity, ppl, tasks)."""
    fix = "rerun the sweep into a fresh folder"
    if not isinstance(results, dict) or not isinstance(results.get("model"), str):
        raise MechsliceError(f"{where} is not a sweep result (no 'model' name); {fix}")
    records = results.get("records")
    if not isinstance(records, list) or not records:
        raise MechsliceError(f"{where} has no 'records' list or it is empty; {fix}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise MechsliceError(f"{where}: record {i} is not an object; {fix}")
        check_sparsity(rec.get("effective_sparsity"), f"{where}: record {i}'s effective_sparsity", fix)
        if rec.get("ppl") is not None and not is_number(rec["ppl"]):
            raise MechsliceError(f"{where}: record {i} has ppl {rec['ppl']!r}, not a number or null; {fix}")
        tasks = rec.get("tasks", {})
        if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
            raise MechsliceError(f"{where}: record {i} has 'tasks' that is not an object of objects; {fix}")
        for task, metrics in tasks.items():
            # acc_norm is null where the task defines none (WinoGrande); a fit on acc_norm skips that task
            bad = [
                k
                for k in ACC_KEYS
                if k in metrics and not is_number(metrics[k]) and (k, metrics[k]) != ("acc_norm", None)
            ]
            if bad:
                raise MechsliceError(f"{where}: record {i} task {task} has a non-number {bad[0]}; {fix}")
            chance = metrics.get("chance")
            if chance is not None and not (is_number(chance) and 0.0 <= chance < 1.0):
                raise MechsliceError(
                    f"{where}: record {i} task {task} has chance {chance!r}, not a number in [0, 1); {fix}"
                )
    dense = [rec for rec in records if rec["effective_sparsity"] < DENSE_TOLERANCE]
    if len(dense) != 1:
        raise MechsliceError(
            f"{where} has {len(dense)} dense records (effective_sparsity 0), needs one for PPL0 and acc0; "
            "rerun the sweep including sparsity 0"
        )
    return results


def load_results(directory: str | Path) -> dict[str, Any]:
    """Read and validate `directory/results.json`; a clear error for a missing folder or file, or bad JSON."""
    folder = Path(directory)
    if folder.is_file():
        hint = f"; pass its folder {folder.parent}" if folder.name == RESULTS_FILE else ""
        raise MechsliceError(
            f"{folder} is a file, not a results folder{hint}; pass the --out folder of a sweep (it holds {RESULTS_FILE})"
        )
    if not folder.is_dir():
        raise MechsliceError(f"results folder {folder} does not exist; pass the --out folder of a sweep")
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise MechsliceError(f"{path} not found; run `mechslice sweep --out {folder}` first")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MechsliceError(
            f"{path} is not valid JSON ({err}); rerun the sweep or restore the file"
        ) from err
    return validate_results(results, where=str(path))


def results_dtype(results: dict[str, Any]) -> str:
    """The dtype a sweep's numbers were computed in; sweeps from before the dtype setting ran in float32."""
    return results.get("settings", {}).get("dtype", "float32")


def check_same_model(results: dict[str, Any], model_name: str, fingerprint: str) -> None:
    """Refuse results made by another model than `model_name` / `fingerprint` (e.g. when resuming a sweep)."""
    theirs, their_print = results.get("model"), results.get("model_fingerprint")
    if theirs != model_name or their_print != fingerprint:
        raise MechsliceError(
            f"these results were made with model {theirs!r} (fingerprint {their_print!r}), "
            f"not {model_name!r} "
            f"(fingerprint {fingerprint!r}); use a new output folder or the same model"
        )


def dense_record(results: dict[str, Any]) -> dict[str, Any]:
    """The record of the unpruned model (effective sparsity 0): it carries PPL0 and acc0."""
    return next(rec for rec in results["records"] if rec["effective_sparsity"] < DENSE_TOLERANCE)


def check_acc_key(acc_key: str) -> None:
    """Refuse an accuracy key that is not one of `ACC_KEYS`."""
    if acc_key not in ACC_KEYS:
        raise MechsliceError(f"accuracy key {acc_key!r} is not one of {', '.join(ACC_KEYS)}")
