"""NVRTC and the CUDA headers, both from wheels (or CUDA_HOME): no CUDA toolkit needed."""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from vidrial.core.errors import ToolchainError


def nvrtc_module():
    """CuPy's low-level NVRTC bindings, loaded; raises ToolchainError with the fix."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as exc:  # pragma: no cover - depends on the install
        raise ToolchainError(
            f"cannot import CuPy's NVRTC bindings ({exc}); install vidrial's dependencies "
            "(cupy-cuda13x, nvidia-cuda-nvrtc)"
        ) from exc
    try:
        nvrtc.getVersion()
    except Exception as exc:
        raise ToolchainError(
            f"NVRTC library not found ({str(exc).splitlines()[0]}); install the wheel "
            "'nvidia-cuda-nvrtc==13.0.*' or point CUDA_HOME at a CUDA 13 toolkit"
        ) from exc
    return nvrtc


@cache
def nvrtc_version() -> str:
    major, minor = nvrtc_module().getVersion()
    return f"{major}.{minor}"


@cache
def cuda_include_dir() -> Path:
    """Directory holding cuda_bf16.h / cuda_fp16.h / vector_types.h."""
    tried: list[str] = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            return Path(found)
        tried.append("cuda.pathfinder (nvidia-cuda-runtime wheel): not found")
    except Exception as exc:
        tried.append(f"cuda.pathfinder: {exc}")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            candidate = Path(root) / "include"
            if (candidate / "cuda_bf16.h").is_file():
                return candidate
            tried.append(f"${var}/include: no cuda_bf16.h in {candidate}")
    candidate = Path("/usr/local/cuda/include")
    if (candidate / "cuda_bf16.h").is_file():
        return candidate
    tried.append(f"{candidate}: missing")
    raise ToolchainError(
        "CUDA headers (cuda_bf16.h) not found; install 'nvidia-cuda-runtime==13.0.*' or set "
        "CUDA_HOME. Looked in: " + "; ".join(tried)
    )
