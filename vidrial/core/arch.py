"""GPU targets: what each compute capability allows, and which one is present."""
from __future__ import annotations

import re
from functools import cache

from pydantic import BaseModel, ConfigDict

from vidrial.core.errors import InputError


class ArchLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    arch: str  # e.g. "sm_90"
    max_dynamic_smem_per_block: int  # bytes, after cudaFuncSetAttribute opt-in
    smem_per_sm: int
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    max_threads_per_block: int = 1024

    @property
    def capability(self) -> int:
        return int(re.sub(r"\D", "", self.arch))


_LIMITS = {
    80: dict(max_dynamic_smem_per_block=166912, smem_per_sm=167936),
    86: dict(max_dynamic_smem_per_block=101376, smem_per_sm=102400),
    89: dict(max_dynamic_smem_per_block=101376, smem_per_sm=102400),
    90: dict(max_dynamic_smem_per_block=232448, smem_per_sm=233472),
    100: dict(max_dynamic_smem_per_block=232448, smem_per_sm=233472),
    120: dict(max_dynamic_smem_per_block=101376, smem_per_sm=102400),
}
SUPPORTED_ARCHS = tuple(f"sm_{cc}" for cc in _LIMITS) + ("sm_90a",)


def normalize_arch(arch: str) -> str:
    """Accepts 'sm_90', '90', 'sm90', '9.0', 'sm_90a'; returns 'sm_90' / 'sm_90a'."""
    text = str(arch).strip().lower().replace("compute_", "sm_")
    m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?(a?)", text)
    if not m:
        raise InputError("arch", repr(arch), f"one of {', '.join(SUPPORTED_ARCHS)}")
    major_minor = m.group(1) + (m.group(2) or "")
    name = f"sm_{major_minor}{m.group(3)}"
    if name not in SUPPORTED_ARCHS:
        raise InputError("arch", repr(arch), f"one of {', '.join(SUPPORTED_ARCHS)}")
    return name


@cache
def arch_limits(arch: str) -> ArchLimits:
    arch = normalize_arch(arch)
    cc = int(re.sub(r"\D", "", arch))
    return ArchLimits(arch=arch, **_LIMITS[cc])


def is_hopper(arch: str | None) -> bool:
    """sm_90 / sm_90a: where the wgmma (sm_90a) implementations run."""
    return arch is not None and arch_limits(arch).capability == 90


def device_arch(device_index: int | None = None) -> str:
    """The arch of a present CUDA device (through torch); raises if there is none."""
    import torch

    if not torch.cuda.is_available():
        raise InputError("arch", "no CUDA device present", "an explicit --arch such as sm_80 or sm_90")
    major, minor = torch.cuda.get_device_capability(device_index)
    return normalize_arch(f"sm_{major}{minor}")


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch import problems mean no GPU for us
        return False
