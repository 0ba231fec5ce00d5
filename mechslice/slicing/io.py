"""Save and load sliced models: safetensors weights, config, tokenizer and a `slicing.json` record.

A folder is complete exactly when it holds `slicing.json`; it is written into a hidden temporary folder beside
the target and renamed into place, so an interrupted save leaves nothing that looks complete. A global-mode
folder is an ordinary Hugging Face model of width d'; a per-layer folder adds the shortcut matrices as
`model.layers.<i>.attn_shortcut` / `mlp_shortcut` tensors, which `load_sliced` installs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from mechslice.adapters import adapter_for
from mechslice.errors import MechsliceError
from mechslice.loading import LoadedModel
from mechslice.slicing.layers import SHORTCUTS, install_shortcut, restore_hf_modules
from mechslice.slicing.slicer import SlicingRecord

RECORD = "slicing.json"


def save_sliced(lm: LoadedModel, record: SlicingRecord, out: Path, overwrite: bool = False) -> Path:
    """Write the sliced model, its tokenizer and `slicing.json` to `out`, atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MechsliceError(
            f"output folder '{out}' exists; pass --overwrite to replace it or choose another"
        )
    restore_hf_modules(lm)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(record.to_json())  # last: its presence marks a complete folder
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _shortcut_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[-1] in SHORTCUTS})  # noqa: SIM118
    return tensors


def _from_pretrained(path: Path, dtype: torch.dtype, quiet: bool) -> PreTrainedModel:
    """The plain model; `quiet` hides the load report that lists the shortcut tensors as unexpected keys
    (they are installed right after; a plain `from_pretrained` of a per-layer folder does warn about them)."""
    verbosity = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_sliced(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a folder written by `save_sliced`: the model of width d' (with its shortcuts) and the tokenizer."""
    path = Path(path)
    try:
        record = SlicingRecord.from_json((path / RECORD).read_text())
        config = AutoConfig.from_pretrained(path)
        adapter = adapter_for(config)
        shortcuts = _shortcut_tensors(path)
        model = _from_pretrained(path, dtype, quiet=bool(shortcuts))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise MechsliceError(f"could not load sliced model folder '{path}': {err}") from err
    if record.mode == "per-layer" and not shortcuts:
        raise MechsliceError(f"'{path}' is a per-layer slice without shortcut matrices; save it again")
    layers = adapter.layers(model)
    for key, value in shortcuts.items():
        index, name = key.split(".")[-2:]
        install_shortcut(layers[int(index)], adapter, name, value)
    return model, tokenizer
