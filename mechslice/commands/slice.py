"""`mechslice slice`: SliceGPT a model to width d' = (1-s)d and save it as a loadable folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mechslice import distributed
from mechslice.checks import check_at_least, check_output_dir
from mechslice.commands._common import (
    add_calibration_args,
    add_model_args,
    add_rotation_arg,
    calibration_fields,
    calibration_from_args,
    emit,
    model_fields,
    model_from_args,
    show_progress,
)
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.memory import peak_memory_gb
from mechslice.slicing import save_sliced, slice_model, sliced_width


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `slice` subcommand."""
    parser = sub.add_parser(
        "slice", help="rotate with PCA and slice the residual stream (SliceGPT), then save"
    )
    add_model_args(parser)
    parser.add_argument("--sparsity", type=float, required=True, help="fraction s of d to remove, in [0, 1)")
    add_rotation_arg(parser)
    add_calibration_args(parser)
    parser.add_argument(
        "--slice-head",
        action="store_true",
        help="also cut the last MLP output, final norm and head to d' (SliceGPT's default keeps them at d)",
    )
    parser.add_argument(
        "--round-to", type=int, default=8, help="round d' down to a multiple of R (default 8)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per pass (default 8)")
    parser.add_argument(
        "--device-map",
        default=None,
        help="place layers across devices with accelerate: auto, balanced, sequential, or a JSON file "
        '{"model.layers.0": 0, ...} (devices: GPU index or cpu); overrides --device',
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Slice and save; print a summary (one JSON object with --json)."""
    check_output_dir(args.out, "--out")
    check_at_least(args.batch_size, 1, "--batch-size")
    if args.out.exists() and not args.overwrite:
        raise MechsliceError(
            f"output folder '{args.out}' exists; pass --overwrite to replace it or choose another"
        )
    lm = _model(args)
    sliced_width(lm.dims.d, args.sparsity, args.round_to)  # reject bad input before calibrating
    calib = calibration_from_args(args, lm)
    start = time.perf_counter()
    record = slice_model(
        lm,
        args.sparsity,
        calib,
        args.rotation,
        args.round_to,
        args.batch_size,
        progress=show_progress(args),
        slice_head=args.slice_head,
    )
    record.calibration.update(calibration_fields(args))
    seconds = time.perf_counter() - start
    save_sliced(lm, record, args.out, overwrite=args.overwrite)
    payload = {
        **model_fields(lm),
        "out": str(args.out),
        "mode": record.mode,
        "sparsity": record.sparsity,
        "effective_sparsity": record.effective_sparsity,
        "d": record.d,
        "d_prime": record.d_prime,
        "slice_head": record.slice_head,
        "calibration": record.calibration,
        "seconds": seconds,
        "processes": distributed.world_size(),
        "peak_memory_gb": peak_memory_gb([p.device for p in lm.model.parameters()]),
    }
    emit(args, payload, _text)
    return 0


def _model(args: argparse.Namespace) -> LoadedModel:
    """The model on --device, or spread over devices by --device-map (a name or a JSON file)."""
    if args.device_map is None:
        return model_from_args(args)
    device_map: str | dict[str, int | str] = args.device_map
    if args.device_map.endswith(".json"):
        try:
            device_map = json.loads(Path(args.device_map).read_text())
        except (OSError, ValueError) as err:
            raise MechsliceError(f"cannot read the device map '{args.device_map}': {err}") from err
    return load_model(args.model, dtype=args.dtype, device_map=device_map)


def _text(p: dict[str, Any]) -> str:
    return (
        f"{p['model']} ({p['dtype']}): sliced {p['mode']} d {p['d']} -> {p['d_prime']} (sparsity {p['sparsity']}, effective "
        f"{p['effective_sparsity']:.4f}) in {p['seconds']:.1f} s on {p['processes']} process(es); saved to "
        f"{p['out']}; peak memory per device (this process): "
        + ", ".join(f"{device} {gb:.2f} GB" for device, gb in p["peak_memory_gb"].items())
    )
