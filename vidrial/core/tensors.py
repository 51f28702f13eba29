"""The vocabulary every family's launch path shares: dtype names, runtime-size buckets, tensor checks.

One spelling everywhere: problem keys, tuned-config JSON, search spaces and error messages name
dtypes the way torch does ("bfloat16", "float16", "float32"); `C_TYPES` maps them to the CUDA type a
template is rendered with."""
from __future__ import annotations

from typing import Any, Literal

from vidrial.core.errors import InputError

# the head dims every power retention kernel is built for (templates size register tiles by them)
HEAD_DIMS = (32, 64, 128)
InDType = Literal["bfloat16", "float16"]
IN_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
C_TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bfloat16" (the key and JSON spelling)."""
    return str(dtype).replace("torch.", "")


def pow2_bucket(n: int) -> int:
    """Smallest power of two >= n (>= 1): runtime sizes are keyed by buckets, so one tuned entry serves
    every size in (bucket/2, bucket]."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def ptr(x: Any) -> int:
    """A kernel's pointer argument: 0 for an absent (None) tensor."""
    return 0 if x is None else x.data_ptr()


def check_tensor(name: str, x: Any, *, dtypes: tuple[str, ...], shape: tuple[int, ...] | None = None,
                 ndim: int | None = None, device: Any = None, what: str = "", like: tuple[str, Any] | None = None) -> None:
    """Raises InputError naming `name` unless x is a tensor of an allowed dtype and shape (and on
    `device`, when given). like=(other_name, other): x must have other's shape, dtype and device.
    Whether the device can run kernels at all is checked once per call, after every argument's shape
    and dtype (KernelFamily.plan)."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise InputError(name, type(x).__name__, f"a torch.Tensor {what}".rstrip())
    if dtype_name(x.dtype) not in dtypes:
        raise InputError(name, f"dtype {x.dtype}", " or ".join(f"torch.{d}" for d in dtypes))
    if ndim is not None and x.dim() != ndim:
        raise InputError(name, f"shape {tuple(x.shape)}", f"{ndim} dims {what}".rstrip())
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise InputError(name, f"shape {tuple(x.shape)}", f"shape {tuple(shape)} {what}".rstrip())
    if like is not None:
        other_name, other = like
        if x.shape != other.shape:
            raise InputError(name, f"shape {tuple(x.shape)}", f"the shape of {other_name} {tuple(other.shape)}")
        if x.dtype != other.dtype:
            raise InputError(name, f"dtype {x.dtype}", f"the dtype of {other_name} ({other.dtype})")
        device = other.device
    if device is not None and x.device != device:
        raise InputError(name, f"device {x.device}", f"the device of the other inputs ({device})")


def check_head_dim(name: str, d: int) -> None:
    if d not in HEAD_DIMS:
        raise InputError(name, f"head_dim {d}", f"head_dim in {HEAD_DIMS}")


def check_aligned_rows(name: str, x: Any) -> None:
    """16-byte cp.async loads of rows: a contiguous last dim, outer strides multiples of 8 elements and a
    16-byte aligned start."""
    if x.stride(-1) != 1:
        raise InputError(name, f"strides {tuple(x.stride())}", "a contiguous last dim (stride 1); call .contiguous()")
    if any(s % 8 for s in x.stride()[:-1]) or x.data_ptr() % 16:
        raise InputError(name, f"strides {tuple(x.stride())}, data_ptr % 16 = {x.data_ptr() % 16}",
                         "outer strides that are multiples of 8 elements and a 16-byte aligned start "
                         "(16-byte cp.async loads); call .contiguous()")


__all__ = ["HEAD_DIMS", "InDType", "IN_DTYPES", "C_TYPES", "dtype_name", "pow2_bucket", "ptr", "check_tensor",
           "check_head_dim", "check_aligned_rows"]
