"""SliceGPT drivers: the exact per-sparsity `slice_model` (in place) and the shared-rotation `Slicer`.

Per-layer mode (SliceGPT proper) computes each basis on the outputs of the already sliced previous layers:
layer by layer it keeps one layer's worth of calibration activations (n x seqlen x d in the model's dtype, the
only activation storage; batches are replaced in place), runs the attention branch once and the MLP branch once
(one forward pass over the calibration in all), and accumulates two float64 second moments (d x d each).
Peak memory: the model + n*seqlen*d*bytes + one batch of one layer's intermediates + a few d x d float64;
measured on SmolLM2-135M at 128 x 2048 (fp32): 2.5-2.7 GB of RSS, of which 0.6 GB stored activations.
Global mode computes one basis from the sum of every norm input's second moment of the dense model (one forward
pass, no activation storage) and gives an ordinary model of width d' when the head is sliced too.

Both modes leave the head unsliced by default, as SliceGPT's `do_slice_head=False`: the final norm and the
unembedding read the full-width stream (rotated, not cut), written by the last block's W_down at width d.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from hooks.allocator import pin_mmap_threshold
from hooks.stats import SecondMoment
from mechslice import distributed
from mechslice.attention import sdpa_attention
from mechslice.checks import check_sparsity
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.precision import dtype_name
from mechslice.slicing.calibration import pca, require_finite, warn_if_few_tokens
from mechslice.slicing.fusion import fuse_norms
from mechslice.slicing.layers import ShortcutBlock, attn_branch, install_shortcut, mlp_branch
from mechslice.slicing.rotation import (
    norm_eps,
    resize_norm,
    rotate_embedding,
    rotate_readers,
    rotate_writer,
    shortcut,
)
from mechslice.slicing.signals import layer_inputs, norm_input_moments

ROTATIONS = ("per-layer", "global")


@dataclass
class SlicingRecord:
    """What was done to a model: nominal and effective sparsity, d -> d', mode, calibration, PCA spectra."""

    mode: str
    sparsity: float
    effective_sparsity: float
    d: int
    d_prime: int
    round_to: int
    shared_rotation: bool
    calibration: dict[str, Any]
    spectra: dict[str, list[float]] = field(repr=False)
    versions: dict[str, str] = field(default_factory=dict)
    # what the calibration forwards computed in (None: a record written before the field existed)
    dtype: str | None = None
    slice_head: bool = False  # False: SliceGPT's default, the last MLP output and the head stay at width d
    # sha256 of every file of a saved folder by name, filled by `save_sliced` (empty: not saved, or saved before
    # checksums were recorded: such a folder loads unchecked)
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def head_width(self) -> int:
        """Width of the final norm and the unembedding."""
        return head_width(self.d, self.d_prime, self.slice_head)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (the content of `slicing.json`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicingRecord:
        """Read a record written by `to_dict`; a record without `slice_head` predates the option and sliced it."""
        return cls(**{"slice_head": True, **data})


def sliced_width(d: int, sparsity: float, round_to: int = 8) -> int:
    """d' = floor((1-s) d / r) * r, with the input checks every entry point shares."""
    return kept_size(d, sparsity, round_to, "d")


def kept_size(n: int, sparsity: float, round_to: int, symbol: str, minimum: int = 1, why: str = "") -> int:
    """n' = floor((1-s) n / r) * r units of an axis named `symbol` kept (d, m, v, L), refused below `minimum`."""
    check_sparsity(sparsity)
    if round_to < 1:
        raise MechsliceError(f"round_to must be at least 1, got {round_to}; use 1 for no rounding")
    # round(., 6) keeps (1-s)d = 460.8 from becoming 460.79999 and flooring one multiple too low
    kept = math.floor(round((1.0 - sparsity) * n, 6) / round_to) * round_to
    if kept < max(minimum, 1):
        floor = f", fewer than the {minimum} {why}" if minimum > 1 else ""
        smaller = " or a smaller --round-to" if round_to > 1 else ""
        raise MechsliceError(
            f"sparsity {sparsity} leaves {symbol}' = {kept} of {symbol} = {n} after rounding down to a multiple "
            f"of {round_to}{floor}; use a smaller sparsity{smaller}"
        )
    return kept


def software_versions() -> dict[str, str]:
    """The versions of mechslice, torch and transformers, which every slicing and pruning record stores."""
    from importlib.metadata import version

    return {
        "mechslice": version("mechslice"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _check_input(lm: LoadedModel, calib: Tensor, rotation: str, batch_size: int) -> None:
    if rotation not in ROTATIONS:
        raise MechsliceError(f"unknown rotation '{rotation}'; use one of {', '.join(ROTATIONS)}")
    if calib.ndim != 2 or calib.dtype not in (torch.int32, torch.int64) or calib.numel() == 0:
        raise MechsliceError(
            f"calibration must be a non-empty (n, seqlen) integer tensor, got {tuple(calib.shape)}"
        )
    if batch_size < 1:
        raise MechsliceError(f"batch_size must be at least 1, got {batch_size}")
    if calib.shape[0] < distributed.world_size():
        raise MechsliceError(
            f"{calib.shape[0]} calibration windows cannot be shared among {distributed.world_size()} "
            "processes; give at least one window per process (--calib-samples) or start fewer"
        )
    if any(p.device.type == "meta" for p in lm.model.parameters()):
        raise MechsliceError(
            "some layers are offloaded (their weights are on the meta device) and cannot be rotated in place; "
            "give every layer a device in the map (a GPU or cpu) to slice, offload only to evaluate"
        )
    if any(isinstance(layer, ShortcutBlock) for layer in lm.adapter.layers(lm.model)):
        raise MechsliceError(
            "this model is already sliced in per-layer mode; slice the original model instead"
        )
    warn_if_few_tokens(calib.numel(), lm.dims.d)


class _Rotator:
    """Gives each position of the stream its basis, in order: enter(0), middle(0), enter(1), ..., enter(L).

    enter(i, Q): the stream entering layer i (i = L: the final norm) is written by the embedding or layer
    i-1's W_down and read by layer i's attention (or the unembedding). middle(i, Q): resid_mid of layer i,
    written by W_o and read by the MLP. With shortcuts, each skip gets Q_prev^T Q; a skip whose two sides differ
    in width (the last block's, into an unsliced head) gets one in every mode.
    """

    def __init__(self, lm: LoadedModel, d_prime: int, shortcuts: bool) -> None:
        self.lm, self.d, self.d_prime, self.shortcuts = lm, lm.dims.d, d_prime, shortcuts
        self.layers = lm.adapter.layers(lm.model)
        self.prev: Tensor | None = None

    def _read(self, norm: nn.Module, readers: tuple[nn.Linear, ...], q: Float[Tensor, "d width"]) -> None:
        rotate_readers(readers, q, scale=resize_norm(norm, self.d, q.shape[1]))

    def enter(self, i: int, q: Float[Tensor, "d width"]) -> None:
        adapter, model = self.lm.adapter, self.lm.model
        if i == 0:
            rotate_embedding(adapter.embeddings(model), q)
        else:
            rotate_writer(adapter.block(self.layers[i - 1]).mlp_writer, q)
            if self.shortcuts or q.shape[1] != self.prev.shape[1]:
                install_shortcut(self.layers[i - 1], adapter, "mlp_shortcut", shortcut(self.prev, q))
        if i < len(self.layers):
            view = adapter.block(self.layers[i])
            self._read(view.input_norm, view.attn_readers, q)
        else:
            self._read(adapter.final_norm(model), (adapter.lm_head(model),), q)
            self._finish_config()
        self.prev = q

    def middle(self, i: int, q: Float[Tensor, "d d_prime"]) -> None:
        view = self.lm.adapter.block(self.layers[i])
        rotate_writer(view.attn_writer, q)
        self._read(view.post_attn_norm, view.mlp_readers, q)
        if self.shortcuts:
            install_shortcut(self.layers[i], self.lm.adapter, "attn_shortcut", shortcut(self.prev, q))
        self.prev = q

    def _finish_config(self) -> None:
        config, dims = self.lm.model.config, self.lm.dims
        config.head_dim = dims.h_dim  # keep the attention width: HF accepts hidden_size < heads * head_dim
        config.hidden_size = self.d_prime
        # the blocks' norms (all of width d'); an unsliced final norm keeps the original eps (see io.load_sliced)
        config.rms_norm_eps = norm_eps(self.lm.adapter.block(self.layers[0]).input_norm)


def head_width(d: int, d_prime: int, slice_head: bool) -> int:
    """Width of the final norm and the unembedding: d' when the head is sliced, else d (SliceGPT's default)."""
    return d_prime if slice_head else d


def _basis(
    stats: SecondMoment, key: str, spectra: dict[str, list[float]], signal: str
) -> Float[Tensor, "d d"]:
    """The PCA basis of one signal, its spectrum stored under `key`; NaN/Inf in its sums name `signal`.

    Under torchrun `stats` holds this rank's share: it is summed over ranks here, the one place every basis
    passes, and rank 0's eigenvectors are broadcast so that all ranks rotate by bitwise the same Q.
    """
    distributed.reduce_moment_(stats)
    require_finite(stats.sum, signal)
    eigenvalues, q = pca(stats)
    spectra[key] = eigenvalues.tolist()
    return distributed.broadcast_(q)


def _on(value: Any, device: torch.device) -> Any:
    """`value` (a tensor, or tuples/lists/dicts of them) moved to `device`; anything else unchanged."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_on(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _on(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def _slice_per_layer(
    lm: LoadedModel,
    calib: Int[Tensor, "n seqlen"],
    d_prime: int,
    slice_head: bool,
    batch_size: int,
    progress: bool,
) -> dict[str, list[float]]:
    """SliceGPT proper: each basis from the outputs of the already sliced layers before it.

    With the layers spread over devices (a device map), the activations follow each layer to its device, so a
    device holds its layers plus, while its layers run, the calibration activations.
    """
    adapter, d, spectra = lm.adapter, lm.dims.d, {}
    layers = adapter.layers(lm.model)
    xs, call_args = layer_inputs(lm, calib, batch_size)
    stats = SecondMoment(d, xs[0].device)
    for x in xs:
        stats.add(x)
    rotator = _Rotator(lm, d_prime, shortcuts=True)
    for i, layer in enumerate(tqdm(layers, desc="slicing", disable=not progress)):
        device = next(layer.parameters()).device
        xs = [x.to(device) for x in xs]
        kwargs = [_on(args[i], device) for args in call_args]
        q = _basis(
            stats,
            f"resid_pre.{i}",
            spectra,
            "the embedding output" if i == 0 else f"the output of layer {i - 1}",
        )[:, :d_prime]
        rotator.enter(i, q)
        qa = q.to(device=device, dtype=xs[0].dtype)
        stats = SecondMoment(d, device)
        for b, x in enumerate(xs):
            z = x @ qa
            xs[b] = z @ qa.T + attn_branch(layer, adapter.input_norm, z, **kwargs[b])
            stats.add(xs[b])
        q = _basis(stats, f"resid_mid.{i}", spectra, f"resid_mid of layer {i}")[:, :d_prime]
        rotator.middle(i, q)
        qa = q.to(device=device, dtype=xs[0].dtype)
        stats = SecondMoment(d, device)
        for b, x in enumerate(xs):
            z = x @ qa
            xs[b] = z @ qa.T + mlp_branch(layer, adapter.post_attn_norm, z)
            stats.add(xs[b])
    q = _basis(stats, "resid_final", spectra, f"the output of layer {len(layers) - 1}")
    rotator.enter(len(layers), q[:, : head_width(d, d_prime, slice_head)])
    return spectra


def _share_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor with `model` (no weight is copied)."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _unshare(copy_: nn.Module, original: nn.Module) -> None:
    """Give `copy_` its own clone of every parameter it still shares with `original`."""
    shared = {id(p) for p in original.parameters()}
    for module in copy_.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in shared:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


class Slicer:
    """Calibrate once on the dense (fused) model, then hand out sliced models at any sparsity.

    The bases of every signal are computed on the dense model (in per-layer mode SliceGPT proper recomputes
    them on the sliced model for each sparsity; `slice_model` does that). `lm` is fused in place, otherwise
    unchanged; each `sliced` model shares no tensor with it. Under torchrun each rank calibrates on its
    `distributed.shard` of `calib` (the full, identical set on every rank) and the moments are summed.
    """

    def __init__(
        self,
        lm: LoadedModel,
        calib: Int[Tensor, "n seqlen"],
        rotation: str = "per-layer",
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        _check_input(lm, calib, rotation, batch_size)
        pin_mmap_threshold()  # keeps the calibration's peak memory flat over the layers (see its docstring)
        self.lm, self.rotation = lm, rotation
        self.calibration = {"n_samples": calib.shape[0], "seqlen": calib.shape[1], "tokens": calib.numel()}
        fuse_norms(lm)
        with sdpa_attention(lm.model):
            pre, mid = norm_input_moments(lm, distributed.shard(calib), batch_size, progress)
        self.spectra: dict[str, list[float]] = {}
        if rotation == "global":
            total = SecondMoment(lm.dims.d, lm.device)
            for stats in (*pre, *mid):
                total.merge(stats)
            q = _basis(total, "global", self.spectra, "the summed norm inputs")
            self.q_pre, self.q_mid = [q] * len(pre), [q] * len(mid)
        else:
            self.q_pre = [
                _basis(s, f"resid_pre.{i}", self.spectra, f"resid_pre of layer {i}")
                for i, s in enumerate(pre[:-1])
            ]
            self.q_pre.append(_basis(pre[-1], "resid_final", self.spectra, "the final norm input"))
            self.q_mid = [
                _basis(s, f"resid_mid.{i}", self.spectra, f"resid_mid of layer {i}")
                for i, s in enumerate(mid)
            ]

    def apply(self, lm: LoadedModel, d_prime: int, slice_head: bool = False) -> None:
        """Rotate and slice `lm` (the fused dense model or a copy of it) in place with these bases."""
        rotator = _Rotator(lm, d_prime, shortcuts=self.rotation == "per-layer")
        for i, q_mid in enumerate(self.q_mid):
            rotator.enter(i, self.q_pre[i][:, :d_prime])
            rotator.middle(i, q_mid[:, :d_prime])
        d = len(self.q_pre[0])
        rotator.enter(len(self.q_mid), self.q_pre[-1][:, : head_width(d, d_prime, slice_head)])

    def record(
        self, sparsity: float, d_prime: int, round_to: int, shared: bool, slice_head: bool = False
    ) -> SlicingRecord:
        """The record of slicing this calibration at `sparsity`."""
        d = len(self.q_pre[0])
        return _record(
            self.rotation,
            sparsity,
            d,
            d_prime,
            round_to,
            shared,
            slice_head,
            self.calibration,
            self.spectra,
            self.lm,
        )

    @torch.no_grad()
    def sliced(
        self, sparsity: float, round_to: int = 8, slice_head: bool = False
    ) -> tuple[LoadedModel, SlicingRecord]:
        """A new sliced model at `sparsity` (peak memory: the dense model plus the sliced one)."""
        d_prime = sliced_width(self.lm.dims.d, sparsity, round_to)
        model = _share_copy(self.lm.model)
        out = LoadedModel(model, self.lm.tokenizer, self.lm.adapter, self.lm.name, self.lm.source)
        self.apply(out, d_prime, slice_head)
        _unshare(model, self.lm.model)
        return out, self.record(
            sparsity, d_prime, round_to, shared=self.rotation == "per-layer", slice_head=slice_head
        )


def _record(
    mode: str,
    sparsity: float,
    d: int,
    d_prime: int,
    round_to: int,
    shared: bool,
    slice_head: bool,
    calibration: dict[str, Any],
    spectra: dict[str, list[float]],
    lm: LoadedModel,
) -> SlicingRecord:
    return SlicingRecord(
        slice_head=slice_head,
        mode=mode,
        sparsity=sparsity,
        effective_sparsity=1.0 - d_prime / d,
        d=d,
        d_prime=d_prime,
        round_to=round_to,
        shared_rotation=shared,
        calibration=dict(calibration),
        spectra=spectra,
        versions=software_versions(),
        dtype=dtype_name(lm.model.dtype),
    )


@torch.no_grad()
def slice_model(
    lm: LoadedModel,
    sparsity: float,
    calib: Int[Tensor, "n seqlen"],
    rotation: str = "per-layer",
    round_to: int = 8,
    batch_size: int = 8,
    progress: bool = True,
    slice_head: bool = False,
) -> SlicingRecord:
    """Fuse, rotate and slice `lm` to width d' = (1-s)d rounded down, in place, on the model's device(s).

    `calib` holds token windows (e.g. `mechslice.corpora.calibration_windows`) whose activations give the PCA.
    `rotation="per-layer"` (SliceGPT proper) computes a basis for every norm input on the outputs of the already
    sliced layers and adds shortcut matrices on the residual connections; `"global"` uses one basis for the
    whole network and leaves an ordinary model of width d' (with `slice_head=True`; an unsliced head widens the
    last block back to d). `round_to` rounds d' down to a multiple (SliceGPT
    uses 8). `slice_head=False` (SliceGPT's default) rotates the last block's MLP output, the final norm and
    the unembedding without cutting them (width d, reached through a d' x d shortcut on the last block's MLP
    skip); `True` cuts them to d' too. Any TransformerBridge built earlier is dropped: read `lm.bridge` again after slicing.
    Returns the `SlicingRecord` (nominal and effective sparsity, d', calibration, PCA spectra).

    Under torchrun every rank passes the same `calib`, calibrates on its `distributed.shard` of it, and ends
    with the same sliced model; the record counts the whole calibration.
    """
    d = lm.dims.d
    d_prime = sliced_width(d, sparsity, round_to)
    if rotation == "global":
        slicer = Slicer(lm, calib, "global", batch_size, progress)
        slicer.apply(lm, d_prime, slice_head)
        return slicer.record(sparsity, d_prime, round_to, shared=False, slice_head=slice_head)
    _check_input(lm, calib, rotation, batch_size)
    pin_mmap_threshold()  # keeps the per-layer peak memory flat over the layers (see its docstring)
    fuse_norms(lm)
    with sdpa_attention(lm.model):
        spectra = _slice_per_layer(lm, distributed.shard(calib), d_prime, slice_head, batch_size, progress)
    calibration = {"n_samples": calib.shape[0], "seqlen": calib.shape[1], "tokens": calib.numel()}
    return _record(rotation, sparsity, d, d_prime, round_to, False, slice_head, calibration, spectra, lm)
