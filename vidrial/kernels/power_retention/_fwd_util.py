"""Small helpers shared by the forward launchers discumsum and query_state (and vidrial.ops)."""
from __future__ import annotations

from typing import Any

from vidrial.core.errors import InputError

DTYPE_NAMES = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}


def pow2_bucket(x: int) -> int:
    """Smallest power of two >= x (>= 1): runtime sizes are keyed by buckets."""
    x = max(int(x), 1)
    return 1 << (x - 1).bit_length()


def pick_config(family, key):
    """vidrial.dispatch.select_config(family, key) when the dispatcher exists, else the default."""
    try:
        from vidrial.dispatch import select_config
    except ModuleNotFoundError as exc:
        if exc.name not in ("vidrial.dispatch", "vidrial.tuning", "vidrial.tuning.store"):
            raise
        return family.default_config(key)
    return select_config(family, key)


def compile_key(key):
    """The key with its runtime buckets reset: the cubin depends only on the compile fields,
    so a new batch size or sequence length never renders or compiles a new kernel."""
    fields = type(key).model_fields
    update = {k: fields[k].default for k in key.runtime_part()}
    return key.model_copy(update=update)


def dtype_name(t) -> str:
    return str(t).replace("torch.", "")


def check_tensor(name: str, x: Any, *, dtypes: tuple[str, ...], shape: tuple[int, ...] | None = None,
                 ndim: int | None = None, device=None, what: str = "") -> None:
    """Raises InputError naming `name` unless x is a CUDA tensor of an allowed dtype and shape."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise InputError(name, type(x).__name__, "a torch.Tensor")
    if ndim is not None and x.dim() != ndim:
        raise InputError(name, tuple(x.shape), f"a {ndim}-d tensor {what}".rstrip())
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise InputError(name, tuple(x.shape), f"shape {tuple(shape)} {what}".rstrip())
    if dtype_name(x.dtype) not in dtypes:
        raise InputError(name, dtype_name(x.dtype), f"dtype in {dtypes}")
    if x.device.type != "cuda":
        raise InputError(name, str(x.device), "a CUDA tensor")
    if device is not None and x.device != device:
        raise InputError(name, str(x.device), f"the same device as the other inputs ({device})")


_TABLES: dict[tuple[int, int, int, Any], Any] = {}


def block_table(head_dim: int, deg: int, d_tile: int, device):
    """uint32 (as int32) device tensor of sympow blocks, byte j = tile index i_(j+1) (common/sympow.cuh)."""
    import torch

    from vidrial.kernels.power_retention.sympow import layout

    k = (head_dim, deg, d_tile, device)
    t = _TABLES.get(k)
    if t is None:
        packed = []
        for blk in layout(head_dim, deg, d_tile).blocks:
            v = 0
            for j, i in enumerate(blk):
                v |= int(i) << (8 * j)
            packed.append(v if v < 2**31 else v - 2**32)
        t = torch.tensor(packed, dtype=torch.int32, device=device)
        _TABLES[k] = t
    return t
