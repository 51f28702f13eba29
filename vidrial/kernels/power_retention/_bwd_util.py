"""Shared pieces of the backward kernel families (update_state_bwd, query_state_bwd, discumsum_bwd,
intra_chunk_attention_bwd): arch lookup, launch helpers, the tuner protocol's check."""
from __future__ import annotations

from typing import Any

_ARCH: dict[int, str] = {}


def device_arch(device) -> str:
    from vidrial.core.arch import device_arch as _device_arch

    idx = device.index if device.index is not None else 0
    a = _ARCH.get(idx)
    if a is None:
        a = _ARCH[idx] = _device_arch(idx)
    return a


def ptr(x: Any) -> int:
    return 0 if x is None else x.data_ptr()


# Tests set this to run the kernels on the CPU (tests/bwd_host_emu.py): a callable
# (family, key, config) -> object with .launch(grid, block, args, device_index, stream), used for
# CPU tensors only. The GPU path never looks at it beyond this None check.
HOST_LAUNCHER = None


def launchable(family, key, config, device):
    """family.launchable(key, config, arch of device), or the host launcher for CPU tensors (tests)."""
    if device.type == "cpu" and HOST_LAUNCHER is not None:
        return HOST_LAUNCHER(family, key, config)
    return family.launchable(key, config, device_arch(device))


def stream_of(device) -> int:
    if device.type == "cpu":
        return 0
    from vidrial.core.launch import current_stream_handle

    return current_stream_handle(device.index)


def pick(family, key, device):
    """The dispatcher's config on a GPU; the default config for CPU tensors (host emulation in tests)."""
    if device.type == "cpu":
        return family.default_config(key)
    from vidrial.kernels.power_retention._fwd_util import pick_config

    return pick_config(family, key)


class SliceCheck:
    """check_outputs and tolerance of the backward families' tuner protocol: the outputs' leading block
    (the slice reference() computes, bwd_tuning.py) against reference(), 2-norm relative error."""

    def check_outputs(self, key: Any, inputs: dict[str, Any], outputs: Any, expected: Any) -> float:
        from vidrial.kernels.power_retention.bwd_tuning import slice_error

        return slice_error(outputs, expected)

    def tolerance(self, key: Any) -> float:
        from vidrial.kernels.power_retention.bwd_tuning import TOLERANCE

        return TOLERANCE
