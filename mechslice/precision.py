"""Which dtype a model computes in: `auto` picks bfloat16 where the device has bfloat16 matrix units.

bfloat16 runs several times faster than float32 on CPUs with AMX-BF16 or AVX512-BF16 and on CUDA devices with
native bf16 support; elsewhere it is emulated and slower, so `auto` falls back to float32 there. Statistics
(second moments, eigendecompositions, entropies, NLL sums) stay float64 whatever the model computes in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechslice.errors import MechsliceError

AUTO = "auto"
# Weight dtypes a model can be loaded in, by the names the CLI and the sweep settings use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# x86 feature flags (as /proc/cpuinfo and torch's CPU probe name them) of native bfloat16 matrix instructions.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def dtype_name(dtype: torch.dtype) -> str:
    """The name of `dtype` in `DTYPES` ("bfloat16" for torch.bfloat16), as results files record it."""
    return str(dtype).removeprefix("torch.")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags listed in the text of a /proc/cpuinfo (`flags` on x86, `Features` on ARM)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def read_cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """This CPU's feature flags: the kernel's list in `cpuinfo` where it exists, else torch's own CPU probe.

    The kernel's list comes first because it names only what the OS enabled (AMX needs kernel support).
    """
    try:
        return parse_cpu_flags(cpuinfo.read_text())
    except OSError:  # not Linux: ask torch, which reads CPUID itself
        return frozenset(name for name, value in torch.cpu.get_capabilities().items() if value is True)


def resolve_dtype(
    name: str | torch.dtype,
    device: str | torch.device,
    cpu_flags: frozenset[str] | None = None,
    cuda_bf16: bool | None = None,
) -> tuple[torch.dtype, str]:
    """The dtype `name` stands for on `device`, and why: a DTYPES name or a torch dtype as given, or `auto`.

    `auto` is bfloat16 on a CPU reporting one of BF16_CPU_FLAGS and on a CUDA device with native bf16 support,
    float32 elsewhere. `cpu_flags` and `cuda_bf16` replace the probes of this machine (tests inject them).
    """
    if isinstance(name, torch.dtype):
        return name, "as asked"
    if name != AUTO:
        if name not in DTYPES:
            raise MechsliceError(f"unknown dtype '{name}'; use one of {', '.join([AUTO, *DTYPES])}")
        return DTYPES[name], "as asked"
    kind = torch.device(device).type
    if kind == "cuda":
        # emulated bf16 (pre-Ampere) is slower than float32, so only native support counts
        native = torch.cuda.is_bf16_supported(including_emulation=False) if cuda_bf16 is None else cuda_bf16
        if native:
            return torch.bfloat16, "auto: CUDA device supports bf16 natively"
        return torch.float32, "auto: CUDA device lacks native bf16"
    if kind == "cpu":
        flags = read_cpu_flags() if cpu_flags is None else cpu_flags
        found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
        if found:
            return torch.bfloat16, f"auto: CPU reports {' and '.join(found)}"
        return torch.float32, f"auto: CPU reports neither {' nor '.join(BF16_CPU_FLAGS)}"
    return torch.float32, f"auto: no bfloat16 probe for {kind} devices"
