"""Save and load sliced models: safetensors weights, config, tokenizer and a `slicing.json` record.

A folder is complete exactly when it holds `slicing.json`; it is written into a hidden temporary folder beside
the target and renamed into place, so an interrupted save leaves nothing that looks complete (the next save
beside it removes such a leftover of a hard-killed process). `slicing.json` records each file's sha256. A global-mode
folder is an ordinary Hugging Face model of width d'; a per-layer folder adds the shortcut matrices as
`model.layers.<i>.attn_shortcut` / `mlp_shortcut` tensors, which `load_sliced` installs.

transformers 5 refuses to build (and to save) a Llama-family config whose hidden_size is not a multiple of
num_attention_heads, although the model runs fine with an explicit head_dim. So the config is written directly
and read back through a valid placeholder width; plain `from_pretrained` works when d' is such a multiple.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mechslice import distributed
from mechslice.adapters import ArchAdapter, adapter_for
from mechslice.atomic import atomic_write_folder
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.slicing.layers import SHORTCUTS, install_shortcut
from mechslice.slicing.rotation import norm_eps
from mechslice.slicing.slicer import SlicingRecord

RECORD = "slicing.json"


def save_sliced(
    lm: LoadedModel,
    record: SlicingRecord,
    out: Path,
    overwrite: bool = False,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the sliced model, its tokenizer and `slicing.json` to `out`, atomically.

    `extra` maps file names to further text documents written into the folder before `slicing.json` (e.g. the
    pruning record). Under torchrun every rank holds the same sliced model: rank 0 writes, the others wait.
    """
    out = Path(out)
    distributed.on_main(lambda: _save(lm, record, out, overwrite, extra or {}))
    return out


def _save(lm: LoadedModel, record: SlicingRecord, out: Path, overwrite: bool, extra: dict[str, str]) -> None:
    lm.reset_bridge()  # slicing and saving act on the plain HF modules

    def write(folder: Path) -> None:
        _save_weights_and_config(lm, folder)
        lm.tokenizer.save_pretrained(folder)
        for name, text in extra.items():
            (folder / name).write_text(text)
        checksums = {file.name: _sha256(file) for file in sorted(folder.iterdir()) if file.is_file()}
        # last: its presence marks a complete folder
        (folder / RECORD).write_text(json.dumps(replace(record, checksums=checksums).to_dict(), indent=1))

    atomic_write_folder(out, write, overwrite)


def _save_weights_and_config(lm: LoadedModel, folder: Path) -> None:
    """model.safetensors (shortcuts included) and config.json, without the config's width validation."""
    model, config = lm.model, lm.model.config
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(folder / "config.json"), use_diff=True)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    if config.hidden_size % config.num_attention_heads:
        warnings.warn(
            f"d' = {config.hidden_size} is not a multiple of the {config.num_attention_heads} attention heads: "
            "mechslice's load_model reads this folder, plain transformers `from_pretrained` refuses its config; "
            "choose --round-to so that d' is such a multiple if you need the latter",
            UserWarning,
            stacklevel=3,
        )


def _sha256(file: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _verify_checksums(path: Path, record: SlicingRecord) -> None:
    """Refuse a folder whose files differ from the ones `save_sliced` wrote (truncated, edited, deleted).

    A folder saved before checksums were recorded has none to check and loads as before (the strict
    tensor-by-tensor load below still refuses missing, unexpected or reshaped weights).
    """
    for name, expected in record.checksums.items():
        file = path / name
        if not file.is_file():
            raise MechsliceError(f"'{path}' lacks {name}, which was saved with it; slice the model again")
        if _sha256(file) != expected:
            raise MechsliceError(
                f"'{file}' differs from the file saved (its sha256 does not match slicing.json): truncated or "
                "edited; slice the model again"
            )


def _read_config(path: Path) -> PretrainedConfig:
    """The saved config, built at a valid placeholder width and then given the sliced width d'."""
    values = json.loads((path / "config.json").read_text())
    d_prime = values["hidden_size"]
    values["hidden_size"] = values["num_attention_heads"] * values["head_dim"]
    config = AutoConfig.for_model(**values)
    config.hidden_size = d_prime
    return config


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


def _widen_head(model: PreTrainedModel, adapter: ArchAdapter, record: SlicingRecord) -> None:
    """Give the last W_down, the final norm and the unembedding the record's head width (d when unsliced).

    The config's width d' and eps' = eps d/d' describe the blocks; the final norm of an unsliced head keeps
    the original eps (see `rotation.resize_norm`).
    """
    width = record.head_width
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    if head.in_features == width:
        return
    writer = adapter.block(adapter.layers(model)[-1]).mlp_writer
    writer.weight = nn.Parameter(torch.empty(width, writer.in_features, dtype=writer.weight.dtype))
    if writer.bias is not None:
        writer.bias = nn.Parameter(torch.empty(width, dtype=writer.bias.dtype))
    writer.out_features = width
    norm.weight = nn.Parameter(torch.ones(width, dtype=norm.weight.dtype))
    norm.variance_epsilon = norm_eps(norm) * record.d_prime / width
    head.weight = nn.Parameter(torch.empty(head.out_features, width, dtype=head.weight.dtype))
    head.in_features = width


def _load_strict(model: PreTrainedModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every expected tensor present with its shape, nothing unexpected; else one line naming the first few."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    problems = [
        f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise MechsliceError(
            f"'{path}' does not match its config and slicing.json ({'; '.join(problems)}); save the model again"
        )
    model.load_state_dict(tensors, strict=True)


def load_sliced(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a folder written by `save_sliced`: the model of width d' (with its shortcuts) and the tokenizer.

    Every file is first checked against the sha256 recorded in slicing.json (`_verify_checksums`); the model is
    then built from the config and filled strictly from the weight files, so a missing, extra or reshaped
    tensor is refused instead of being initialised at random.
    """
    path = Path(path)
    try:
        record = SlicingRecord.from_dict(json.loads((path / RECORD).read_text()))
        _verify_checksums(path, record)
        config = _read_config(path)
        adapter = adapter_for(config)
        tensors = _file_tensors(path)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    except (ValueError, OSError, KeyError, TypeError, SafetensorError) as err:
        raise MechsliceError(f"could not load sliced model folder '{path}': {err}") from err
    shortcuts = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] in SHORTCUTS}
    if record.mode == "per-layer" and not shortcuts:
        raise MechsliceError(f"'{path}' is a per-layer slice without shortcut matrices; save it again")
    layers = adapter.layers(model)
    for key, value in shortcuts.items():
        index, name = key.split(".")[-2:]
        install_shortcut(layers[int(index)], adapter, name, value)
    _widen_head(model, adapter, record)
    _load_strict(model, tensors, path)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), tokenizer
