"""Per-layer residual-stream entropy of a dense and sliced models, the paper's premise H(E'_out)/H(E_out) = 1-s.

The tracer keeps each block output E_out as raw rows (at most `max_rows` tokens per layer, so memory is
bounded by layers x max_rows x d), plus its float64 covariance spectrum; `analyses.entropy` turns them into
per-layer entropies for each estimator on the RMS-normalised stream, the ratio next to 1-s, kappa = h/d, the
effective-rank ratio, and the mean ratio over the layers where it reads as a fraction kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int
from torch import Tensor

from analyses.entropy import (
    RATIO_ESTIMATORS,
    EntropySummary,
    check_ratio_estimators,
    covariance_spectrum,
    layer_entropy_summary,
)
from hooks.flow import TraceError, trace
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.slicing import Slicer


def check_estimators(names: Iterable[str], include_knn: bool = False) -> tuple[str, ...]:
    """The estimator names, refused up front (before any model runs) when one is unknown, or is kNN
    without `include_knn` (its bias depends on d, see `analyses.entropy.check_ratio_estimators`)."""
    return check_ratio_estimators(tuple(names), include_knn)


def check_gaussian_rows(estimators: Iterable[str], rows: int, d: int, flag: str) -> None:
    """Refuse up front a Gaussian estimate from `rows` <= d token rows (a singular covariance), naming `flag`,
    the option that sets the row count."""
    if "gaussian" in estimators and rows <= d:
        raise MechsliceError(
            f"the gaussian estimator needs more tokens than the width d = {d} (the covariance is singular "
            f"otherwise), got {rows}; raise {flag} above {d} or leave gaussian out of --estimators"
        )


def residual_samples(
    lm: LoadedModel,
    windows: Int[Tensor, "w seqlen"],
    max_rows: int,
    layers: Iterable[int] | None = None,
    batch_size: int = 4,
) -> dict[int, Float[Tensor, "n d"]]:
    """Block outputs E_out of each layer as rows (the first `max_rows` tokens), via the flow tracer."""
    if max_rows > windows.numel():
        raise MechsliceError(
            f"asked for {max_rows} samples per layer but only {windows.numel()} tokens are traced; "
            "ask for fewer samples or trace more tokens"
        )
    try:
        result = trace(
            lm.bridge,
            windows,
            stages=["E_out"],
            layers=layers,
            raw=["E_out"],
            max_raw_rows=max_rows,
            batch_size=batch_size,
        )
    except TraceError as err:
        raise MechsliceError(str(err)) from err
    return {i: result.raw_rows(i, "E_out") for i in result.layers}


@dataclass
class SparsityEntropy:
    """One sparsity: the nominal s, the sliced width, and the per-layer dense-vs-sliced summary."""

    sparsity: float
    d_prime: int
    summary: EntropySummary


@dataclass
class EntropySweep:
    """Per-layer entropies of the dense model against sliced models at several sparsities."""

    rotation: str
    tokens: int
    samples: int
    spectra: dict[int, Float[np.ndarray, " d"]]
    results: list[SparsityEntropy]
    stream: str = "normalised"

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict (the spectra are left out: they are d numbers per layer)."""
        return {
            "rotation": self.rotation,
            "tokens": self.tokens,
            "samples": self.samples,
            "stream": self.stream,
            "sparsities": [
                {"sparsity": r.sparsity, "d_prime": r.d_prime, **r.summary.to_dict()} for r in self.results
            ],
        }


def entropy_sweep(
    lm: LoadedModel,
    sparsities: Sequence[float],
    calib: Int[Tensor, "n seqlen"],
    windows: Int[Tensor, "w seqlen"],
    estimators: Sequence[str] = RATIO_ESTIMATORS,
    rotation: str = "per-layer",
    max_rows: int = 4096,
    layers: Iterable[int] | None = None,
    batch_size: int = 4,
    stream: str = "normalised",
    include_knn: bool = False,
) -> EntropySweep:
    """Dense E_out samples once, then for each s a sliced copy (one calibration, `Slicer`) and its samples.

    `lm` is norm-fused in place (computationally invariant: its residual stream is unchanged). `stream` and
    `include_knn` are those of `layer_entropy_summary`.
    """
    estimators = check_estimators(estimators, include_knn)
    check_gaussian_rows(estimators, max_rows, lm.dims.d, "the number of samples")
    dense = residual_samples(lm, windows, max_rows, layers, batch_size)
    # the spectra need n > d; with fewer rows (estimators other than gaussian) the figure has none to show
    spectra = {i: covariance_spectrum(x) for i, x in dense.items() if x.shape[0] > x.shape[1]}
    slicer = Slicer(lm, calib, rotation, progress=False)
    lm.reset_bridge()
    results = []
    for s in sparsities:
        sliced_lm, record = slicer.sliced(s)
        sliced = residual_samples(sliced_lm, windows, max_rows, dense.keys(), batch_size)
        summary = layer_entropy_summary(
            dense, sliced, estimators, s_nominal=s, stream=stream, include_knn=include_knn
        )
        results.append(SparsityEntropy(s, record.d_prime, summary))
        del sliced_lm, sliced
    return EntropySweep(rotation, windows.numel(), max_rows, spectra, results, stream)
