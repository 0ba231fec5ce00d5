"""`--dtype auto`: bfloat16 where the device has bf16 matrix units (probes injected), float32 elsewhere, recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from mechslice.adapters import adapter_for
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.precision import dtype_name, parse_cpu_flags, read_cpu_flags, resolve_dtype
from mechslice.slicing import slice_model
from tests.conftest import tiny_llama_config

# Trimmed /proc/cpuinfo of a Sapphire Rapids core (AMX and AVX512-BF16) and of an older AVX2-only core.
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
HASWELL = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2680 v3
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_auto_picks_bfloat16_on_a_cpu_reporting_the_flags(tmp_path: Path) -> None:
    flags = read_cpu_flags(_cpuinfo(tmp_path, SAPPHIRE_RAPIDS))
    assert {"amx_bf16", "avx512_bf16"} <= flags and "bugs" not in flags
    assert resolve_dtype("auto", "cpu", cpu_flags=flags) == (
        torch.bfloat16,
        "auto: CPU reports amx_bf16 and avx512_bf16",
    )
    # either instruction set alone is a native bf16 matrix unit
    only_avx512 = parse_cpu_flags("flags : avx2 avx512f avx512_bf16\n")
    assert resolve_dtype("auto", "cpu", cpu_flags=only_avx512) == (
        torch.bfloat16,
        "auto: CPU reports avx512_bf16",
    )


def test_auto_falls_back_to_float32_on_a_cpu_without_them(tmp_path: Path) -> None:
    flags = read_cpu_flags(_cpuinfo(tmp_path, HASWELL))
    assert "avx2" in flags
    dtype, reason = resolve_dtype("auto", "cpu", cpu_flags=flags)
    assert dtype == torch.float32 and reason == "auto: CPU reports neither amx_bf16 nor avx512_bf16"


def test_auto_on_cuda_follows_native_bf16_support() -> None:
    assert resolve_dtype("auto", "cuda", cuda_bf16=False) == (
        torch.float32,
        "auto: CUDA device lacks native bf16",
    )
    assert resolve_dtype("auto", "cuda:1", cuda_bf16=True)[0] == torch.bfloat16
    # the CPU flags say nothing about a GPU
    assert (
        resolve_dtype("auto", "cuda", cpu_flags=frozenset({"amx_bf16"}), cuda_bf16=False)[0] == torch.float32
    )


def test_named_dtypes_are_taken_as_asked_and_unknown_ones_refused() -> None:
    amx = frozenset({"amx_bf16"})
    assert resolve_dtype("float32", "cpu", cpu_flags=amx) == (torch.float32, "as asked")
    assert resolve_dtype(torch.float16, "cpu", cpu_flags=amx) == (torch.float16, "as asked")
    assert resolve_dtype("auto", "mps")[0] == torch.float32
    with pytest.raises(MechsliceError, match="unknown dtype 'float8'; use one of auto, float32"):
        resolve_dtype("float8", "cpu")


def test_load_model_defaults_to_auto_and_records_it_when_slicing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)
    load_model(device="cpu", dtype=torch.float32).tokenizer.save_pretrained(tmp_path)  # a folder needs one
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.model.dtype == resolve_dtype("auto", "cpu")[0]  # what this machine's probe picks
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.bfloat16, torch.float32):
        model = LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()
        sliced = LoadedModel(model, lm.tokenizer, adapter_for(model.config), "tiny", "random")
        record = slice_model(sliced, 0.25, calib, rotation="global", progress=False)
        assert record.dtype == dtype_name(dtype) and record.to_dict()["dtype"] == dtype_name(dtype)


@pytest.mark.slow  # dequantizes the GGUF into a fresh cache: about a minute on two cores
def test_the_embedded_cache_stays_float32_after_a_bfloat16_load(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MECHSLICE_CACHE", str(tmp_path))
    lm = load_model(device="cpu", dtype="bfloat16")  # a cold cache: dequantizes the GGUF, then loads in bf16
    assert lm.model.dtype == torch.bfloat16
    with safe_open(str(tmp_path / "models" / "smollm2-135m" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
    assert (
        load_model(device="cpu", dtype="float32").model.dtype == torch.float32
    )  # the same cache serves both
