"""Launching cubins on torch tensors, on torch.cuda.current_stream(), with no copies
and no host synchronisation (so launches can be captured in CUDA graphs).

Arguments are packed once per call into one parameter buffer (CU_LAUNCH_PARAM_BUFFER_*),
laid out with C alignment rules; modules and functions are loaded once per device.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vidrial.core.compile import CompiledKernel
from vidrial.core.errors import LaunchError

# The C parameter types kernels take, by the struct code that packs them.
PARAM_CODES = {"ptr": "P", "i32": "i", "i64": "q", "u32": "I", "f32": "f"}

_CU_LAUNCH_PARAM_END = 0
_CU_LAUNCH_PARAM_BUFFER_POINTER = 1
_CU_LAUNCH_PARAM_BUFFER_SIZE = 2
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _driver():
    from cupy_backends.cuda.api import driver

    return driver


@dataclass
class LaunchableKernel:
    """A compiled kernel plus its parameter signature, ready to launch on any device.

    `signature` lists the kernel's parameters in order as PARAM_CODES names."""

    compiled: CompiledKernel
    signature: Sequence[str]
    dynamic_smem_bytes: int = 0
    _functions: dict[int, int] = field(default_factory=dict, repr=False)
    _modules: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = [s for s in self.signature if s not in PARAM_CODES]
        if unknown:
            raise LaunchError(f"unknown parameter types {unknown}; allowed: {sorted(PARAM_CODES)}")
        self._format = "@" + "".join(PARAM_CODES[s] for s in self.signature)
        self._size = struct.calcsize(self._format)
        self._size_holder = ctypes.c_size_t(self._size)

    def function(self, device_index: int) -> int:
        fn = self._functions.get(device_index)
        if fn is None:
            fn = self._load(device_index)
        return fn

    def _load(self, device_index: int) -> int:
        import torch

        driver = _driver()
        with torch.cuda.device(device_index):
            torch.cuda.init()
            torch.cuda.current_stream()  # makes torch's primary context current on this thread
            try:
                module = driver.moduleLoadData(self.compiled.cubin)
                fn = driver.moduleGetFunction(module, self.compiled.entry)
                if self.dynamic_smem_bytes > 48 * 1024:
                    driver.funcSetAttribute(
                        fn, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.dynamic_smem_bytes
                    )
            except Exception as exc:
                raise LaunchError(
                    f"cannot load {self.compiled.entry} ({self.compiled.arch}) on cuda:{device_index}: {exc}"
                ) from exc
        self._modules[device_index] = module
        self._functions[device_index] = fn
        return fn

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[Any],
        device_index: int,
        stream: int,
    ) -> None:
        """Launches with `args` (ints for pointers from tensor.data_ptr(), ints, floats)."""
        try:
            buf = ctypes.create_string_buffer(struct.pack(self._format, *args), self._size)
        except struct.error as exc:
            raise LaunchError(
                f"{self.compiled.entry}: arguments {list(args)!r} do not match signature {list(self.signature)}: {exc}"
            ) from exc
        fn = self._functions.get(device_index) or self._load(device_index)
        extra = (ctypes.c_void_p * 5)(
            _CU_LAUNCH_PARAM_BUFFER_POINTER,
            ctypes.addressof(buf),
            _CU_LAUNCH_PARAM_BUFFER_SIZE,
            ctypes.addressof(self._size_holder),
            _CU_LAUNCH_PARAM_END,
        )
        _driver().launchKernel(
            fn, grid[0], grid[1], grid[2], block[0], block[1], block[2],
            self.dynamic_smem_bytes, stream, 0, ctypes.addressof(extra),
        )


def current_stream_handle(device_index: int) -> int:
    import torch

    return torch.cuda.current_stream(device_index).cuda_stream


# ---- where kernels run ----------------------------------------------------------------------------
# The CPU tests execute the real templates on the host (tests/bwd_host_emu.py compiles them with g++
# over an emulation of the PTX they use). They install a host launcher: a callable
# (family, key, config) -> object with .launch(grid, block, args, device_index, stream), used for CPU
# tensors only. Without one, kernels run on CUDA devices only.
_HOST_LAUNCHER: Any = None


def set_host_launcher(launcher: Any) -> Any:
    """Installs `launcher` for CPU tensors (None removes it); returns the previous one."""
    global _HOST_LAUNCHER
    previous, _HOST_LAUNCHER = _HOST_LAUNCHER, launcher
    return previous


def host_launcher() -> Any:
    return _HOST_LAUNCHER


def runs_on(device: Any) -> bool:
    """Whether kernels can launch on `device` (a torch.device)."""
    return device.type == "cuda" or (device.type == "cpu" and _HOST_LAUNCHER is not None)


_ARCHS: dict[int, str] = {}


def arch_of(device_index: int) -> str:
    """The compile target of a CUDA device, read once per device."""
    arch = _ARCHS.get(device_index)
    if arch is None:
        from vidrial.core.arch import device_arch

        arch = _ARCHS[device_index] = device_arch(device_index)
    return arch
