"""Argument validation of the public ops (docs/DESIGN.md principle 7): every error names the argument, what was
given and what is allowed. Shape and dtype errors come before device errors, so that a bad call reads the
same on any device (the CPU tests rely on it).

`power_retention` (training): check_inputs + check_state. `power_retention_inference`: check_inference,
memoised per structure by checked_inference. Both run check_log_G_values on every call.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from vidrial.core.errors import InputError
from vidrial.core.launch import runs_on
from vidrial.core.tensors import HEAD_DIMS
from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim
from vidrial.pipeline.layout import layout_rule

__all__ = ["HEAD_DIMS", "check_log_G_values", "check_inputs", "check_state", "check_inference",
           "checked_inference"]

_DEG_RULE = "2 or 4 (an even degree keeps the weights non-negative)"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_log_G_values(log_G: Optional[torch.Tensor]) -> None:
    """log_G <= 0 (gates exp(log_G) in (0, 1]): a positive (or NaN) gate would grow the state instead of
    decaying it, a silently wrong result.

    Cost: one max reduction and a device->host read of its result, i.e. a sync that waits for the work
    queued on the stream (a few us on an idle GPU; it also stops the host from running ahead of the GPU).
    CUDA-graph capture forbids the sync and a torch.compile graph would break on it, so both skip the
    check (their eager calls, e.g. the warm-up before capture, do it); meta/fake tensors have no values."""
    if (log_G is None or log_G.numel() == 0 or log_G.device.type == "meta" or torch.compiler.is_compiling()
            or is_fake(log_G)):  # a fake kernel runs outside is_compiling() and its tensors claim a real device
        return
    if log_G.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    top = float(log_G.detach().max())  # detached: a value read, not part of the graph
    if not top <= 0:  # NaN fails this too
        raise InputError("log_G", f"max value {top:g}", "values <= 0 (log gates: exp(log_G) in (0, 1])")


# ---- pieces shared by both ops -------------------------------------------------------------------
def _recording_on_meta(Q: torch.Tensor) -> bool:
    """Meta tensors are accepted inside vidrial.tuning.record only: the kernels are planned (their keys
    recorded), never launched."""
    from vidrial.dispatch.record import recording

    return Q.device.type == "meta" and recording()


def _check_deg(deg: Any) -> None:
    if not _is_int(deg) or deg not in (2, 4):
        raise InputError("deg", deg, _DEG_RULE)


def _check_d_tile(d_tile: Any, d: int) -> None:
    if d_tile is not None and (not _is_int(d_tile) or d_tile < 1 or d % d_tile):
        raise InputError("d_tile", d_tile, f"None or a divisor of head_dim={d}: "
                                           f"{[x for x in range(1, d + 1) if d % x == 0]}")


def _check_scale(scale: Any) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise InputError("scale", scale, "None (or 0: 1/sqrt(head_dim)) or a finite number")


def _check_head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise InputError("Q", f"head_dim {d}", f"one of {HEAD_DIMS}")


def _check_log_G(log_G: Any, shape: tuple[int, ...], dims: str, values: bool = True) -> None:
    """Type, dtype, shape [dims] and (values=True) values of a given log_G."""
    if not isinstance(log_G, torch.Tensor):
        raise InputError("log_G", type(log_G).__name__, f"None or a float32 torch.Tensor [{dims}]")
    if log_G.dtype != torch.float32:
        raise InputError("log_G", f"dtype {log_G.dtype}", "torch.float32")
    if tuple(log_G.shape) != shape:
        raise InputError("log_G", f"shape {tuple(log_G.shape)}", f"shape {shape} = [{dims}]")
    if values:
        check_log_G_values(log_G)


def _check_state_pair(initial_state: Any, sum_of_keys: Any) -> None:
    if (initial_state is None) != (sum_of_keys is None):
        raise InputError("sum_of_keys" if sum_of_keys is None else "initial_state", None,
                         "initial_state and sum_of_keys given together (both or neither)")


# ---- power_retention -----------------------------------------------------------------------------
def check_inputs(Q: Any, K: Any, V: Any, log_G: Any, deg: Any, d_tile: Any, chunk_size: Any,
                 switch_over_seq_len: Any, scale: Any) -> tuple[int, int, int, int, int]:
    """The training op's tensors and scalars; returns (b, t, hq, h, d)."""
    for name, x in (("Q", Q), ("K", K), ("V", V)):
        if not isinstance(x, torch.Tensor):
            raise InputError(name, type(x).__name__, "a torch.Tensor [batch, time, heads, head_dim]")
        if x.dim() != 4:
            raise InputError(name, f"shape {tuple(x.shape)}", "4 dims [batch, time, heads, head_dim]")
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise InputError(name, f"dtype {x.dtype}", "torch.bfloat16 or torch.float16")
    if K.dtype != Q.dtype or V.dtype != Q.dtype:
        raise InputError("K/V", f"dtypes {K.dtype}/{V.dtype}", f"the dtype of Q ({Q.dtype})")
    if K.shape != V.shape:
        raise InputError("V", f"shape {tuple(V.shape)}", f"the shape of K {tuple(K.shape)}")
    b, t, hq, d = Q.shape
    if K.shape[0] != b or K.shape[1] != t or K.shape[3] != d:
        raise InputError("K", f"shape {tuple(K.shape)}", f"[{b}, {t}, kv_heads, {d}] matching Q {tuple(Q.shape)}")
    h = K.shape[2]
    if h < 1 or hq % h:
        raise InputError("Q", f"{hq} query heads", f"a multiple of the {h} KV heads of K (GQA)")
    _check_head_dim(d)
    _check_deg(deg)
    _check_d_tile(d_tile, d)
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 16 or chunk_size % 16):
        raise InputError("chunk_size", chunk_size, "None (quadratic) or a positive multiple of 16")
    if switch_over_seq_len is not None and (not _is_int(switch_over_seq_len) or switch_over_seq_len < 0):
        raise InputError("switch_over_seq_len", switch_over_seq_len, "None or a non-negative integer")
    _check_scale(scale)
    if log_G is not None:
        _check_log_G(log_G, (b, t, h), "batch, time, kv_heads")
    # CUDA; the CPU under a host launcher (the CPU tests); meta while recording keys
    if not runs_on(Q.device) and not _recording_on_meta(Q):
        raise InputError("Q", f"device {Q.device}", "a CUDA tensor")
    if K.device != Q.device or V.device != Q.device:
        raise InputError("K/V", f"devices {K.device}/{V.device}", f"the device of Q ({Q.device})")
    if log_G is not None and log_G.device != Q.device:
        raise InputError("log_G", f"device {log_G.device}", f"the device of Q ({Q.device})")
    return b, t, hq, h, d


def check_state(initial_state: Any, sum_of_keys: Any, b: int, h: int, D: int, d: int, deg: int, d_tile: int,
                device: torch.device) -> None:
    """The training op's optional initial state: float32, in the d_tile layout (D features)."""
    _check_state_pair(initial_state, sum_of_keys)
    if initial_state is None:
        return
    for name, x, shape, what in (("initial_state", initial_state, (b, h, D, d), "[batch, kv_heads, D, head_dim]"),
                                 ("sum_of_keys", sum_of_keys, (b, h, D), "[batch, kv_heads, D]")):
        if not isinstance(x, torch.Tensor):
            raise InputError(name, type(x).__name__, f"a float32 torch.Tensor {what}")
        if tuple(x.shape) != shape:
            raise InputError(name, f"shape {tuple(x.shape)}",
                             f"shape {shape} = {what} with D={D} = feature_dim(head_dim={d}, deg={deg}, "
                             f"d_tile={d_tile}) (the state layout must match d_tile)")
        if x.dtype != torch.float32:
            raise InputError(name, f"dtype {x.dtype}", "torch.float32")
        if x.device != device:
            raise InputError(name, f"device {x.device}", f"the device of Q ({device})")


# ---- power_retention_inference -------------------------------------------------------------------
InferenceShape = tuple[int, int, int, int, int, int, int, int]  # b, tq, hq, h, d, L, d_tile, D


def _check_cache(Q: torch.Tensor, K: Any, V: Any) -> tuple[int, Optional[int]]:
    """The KV cache (K, V both given or both None); returns (cache_len, kv_heads or None)."""
    b, d = Q.shape[0], Q.shape[3]
    if (K is None) != (V is None):
        raise InputError("V" if V is None else "K", None, "K and V given together (the KV cache) or both None")
    if K is None:
        return 0, None
    for name, x in (("K", K), ("V", V)):
        if not isinstance(x, torch.Tensor):
            raise InputError(name, type(x).__name__, "None or a torch.Tensor [batch, cache_len, kv_heads, head_dim]")
        if x.dim() != 4:
            raise InputError(name, f"shape {tuple(x.shape)}", "4 dims [batch, cache_len, kv_heads, head_dim]")
        if x.dtype != Q.dtype:
            raise InputError(name, f"dtype {x.dtype}", f"the dtype of Q ({Q.dtype})")
    if K.shape != V.shape:
        raise InputError("V", f"shape {tuple(V.shape)}", f"the shape of K {tuple(K.shape)}")
    if K.shape[0] != b or K.shape[3] != d:
        raise InputError("K", f"shape {tuple(K.shape)}", f"[{b}, cache_len, kv_heads, {d}] matching Q {tuple(Q.shape)}")
    return K.shape[1], K.shape[2]


def _check_inference_state(initial_state: torch.Tensor, sum_of_keys: torch.Tensor, b: int, h: int, d: int,
                           deg: int, d_tile: int, D: int) -> None:
    """An inference state: float32 or bfloat16 in the d_tile layout, 16-byte aligned rows (decode's loads)."""
    if tuple(initial_state.shape[:2]) != (b, h) or initial_state.shape[3] != d:
        raise InputError("initial_state", f"shape {tuple(initial_state.shape)}",
                         f"[{b}, {h}, D, {d}] = [batch, kv_heads, D, head_dim]")
    if initial_state.shape[2] != D:
        raise InputError("initial_state", f"shape {tuple(initial_state.shape)} (D={initial_state.shape[2]})",
                         layout_rule(d, deg, d_tile, initial_state.shape[2]))
    if initial_state.dtype not in (torch.float32, torch.bfloat16):
        raise InputError("initial_state", f"dtype {initial_state.dtype}",
                         "torch.float32 or torch.bfloat16 (the state dtype is part of its layout)")
    if tuple(sum_of_keys.shape) != (b, h, D):
        raise InputError("sum_of_keys", f"shape {tuple(sum_of_keys.shape)}",
                         f"shape {(b, h, D)} = [batch, kv_heads, D]")
    if sum_of_keys.dtype != torch.float32:
        raise InputError("sum_of_keys", f"dtype {sum_of_keys.dtype}", "torch.float32")
    es = initial_state.element_size()
    st = initial_state.stride()
    if st[3] != 1 or st[2] != d or (st[0] * es) % 16 or (st[1] * es) % 16:
        raise InputError("initial_state", f"strides {tuple(st)}",
                         "contiguous [D, head_dim] rows and 16-byte batch/head strides; call .contiguous()")
    if sum_of_keys.stride(2) != 1:
        raise InputError("sum_of_keys", f"strides {tuple(sum_of_keys.stride())}", "a contiguous last dim")


def check_inference(Q: Any, K: Any, V: Any, log_G: Any, initial_state: Any, sum_of_keys: Any, deg: Any, scale: Any,
                    switch_over_seq_len: Any, d_tile: Any, state_dtype: Any, *, traced: bool = False) -> InferenceShape:
    """power_retention_inference's arguments; returns (b, tq, hq, h, d, L, d_tile, D). traced=True: fake
    tensors of a torch.compile trace (the decode op's fake kernel): what only real tensors have (the device
    a kernel runs on, the 16-byte alignment of the data) is checked when the op runs."""
    if not isinstance(Q, torch.Tensor):
        raise InputError("Q", type(Q).__name__, "a torch.Tensor [batch, time, q_heads, head_dim]")
    if Q.dim() != 4:
        raise InputError("Q", f"shape {tuple(Q.shape)}", "4 dims [batch, time, q_heads, head_dim]")
    if Q.dtype not in (torch.bfloat16, torch.float16):
        raise InputError("Q", f"dtype {Q.dtype}", "torch.bfloat16 or torch.float16")
    b, tq, hq, d = Q.shape
    d = int(d)  # a compile-time constant of the kernels (torch.compile(dynamic=True) specialises it here)
    _check_head_dim(d)
    if tq < 1 or b < 1:
        raise InputError("Q", f"shape {tuple(Q.shape)}", "at least one batch entry and one query")
    L, h = _check_cache(Q, K, V)
    _check_deg(deg)
    _check_scale(scale)
    if switch_over_seq_len is not None and (not _is_int(switch_over_seq_len) or switch_over_seq_len < 1):
        raise InputError("switch_over_seq_len", switch_over_seq_len, "None (never compress) or a positive integer")
    _check_d_tile(d_tile, d)
    if state_dtype is not None and state_dtype not in (torch.float32, torch.bfloat16):
        raise InputError("state_dtype", state_dtype, "None (float32), torch.float32 or torch.bfloat16")
    _check_state_pair(initial_state, sum_of_keys)
    if initial_state is None and L == 0:
        raise InputError("initial_state", None, "a state when the KV cache is empty (K/V None or cache_len 0)")
    if initial_state is not None:
        for name, x, nd in (("initial_state", initial_state, 4), ("sum_of_keys", sum_of_keys, 3)):
            if not isinstance(x, torch.Tensor):
                raise InputError(name, type(x).__name__, "a torch.Tensor")
            if x.dim() != nd:
                raise InputError(name, f"shape {tuple(x.shape)}",
                                 "4 dims [batch, kv_heads, D, head_dim]" if nd == 4 else "3 dims [batch, kv_heads, D]")
        if h is None:
            h = initial_state.shape[1]
    if h is None or h < 1 or hq % h:
        raise InputError("Q", f"{hq} query heads", f"a multiple of the {h} KV heads (GQA)")
    if L > 0 and tq > L:
        raise InputError("Q", f"{tq} queries", f"at most the cache length {L} (the cache includes the new tokens)")
    if log_G is not None:
        if L == 0:
            raise InputError("log_G", f"shape {tuple(log_G.shape)}", "None when there is no KV cache")
        _check_log_G(log_G, (b, L, h), "batch, cache_len, kv_heads", values=not traced)  # fake: no values
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    D = feature_dim(d, deg, d_tile)
    if initial_state is not None:
        _check_inference_state(initial_state, sum_of_keys, b, h, d, deg, d_tile, D)
    if L > 0:
        for name, x in (("K", K), ("V", V)):
            if x.stride(3) != 1 or any(s % 8 for s in x.stride()[:3]):
                raise InputError(name, f"strides {tuple(x.stride())}",
                                 "a contiguous last dim and batch/time/head strides that are multiples of 8 "
                                 "elements (16-byte loads); call .contiguous()")
    if traced:
        return b, tq, hq, h, d, L, d_tile, D
    # CUDA; the CPU under a host launcher (the CPU tests); meta while recording keys
    if not runs_on(Q.device) and not _recording_on_meta(Q):
        raise InputError("Q", f"device {Q.device}", "a CUDA tensor")
    for name, x in (("K", K), ("V", V), ("log_G", log_G), ("initial_state", initial_state),
                    ("sum_of_keys", sum_of_keys)):
        if x is not None and x.device != Q.device:
            raise InputError(name, f"device {x.device}", f"the device of Q ({Q.device})")
    for name, x in (("K", K if L > 0 else None), ("V", V if L > 0 else None), ("initial_state", initial_state)):
        if x is not None and x.data_ptr() % 16:
            raise InputError(name, f"data_ptr % 16 = {x.data_ptr() % 16}", "a 16-byte aligned start")
    return b, tq, hq, h, d, L, d_tile, D


_CHECKED: dict[tuple, InferenceShape] = {}


def checked_inference(Q: Any, K: Any, V: Any, log_G: Any, initial_state: Any, sum_of_keys: Any, deg: Any,
                      scale: Any, switch_over_seq_len: Any, d_tile: Any, state_dtype: Any) -> InferenceShape:
    """check_inference, memoised on what it looks at (shapes, strides, dtypes, devices, 16-byte alignment,
    the scalar arguments): a decode loop pays the full validation once per shape, then a few us."""
    try:
        sig = (deg, scale, switch_over_seq_len, d_tile, state_dtype) + tuple(
            None if x is None else (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0)
            for x in (Q, K, V, log_G, initial_state, sum_of_keys))
        hit = _CHECKED.get(sig)
    except (AttributeError, TypeError):  # not tensors / unhashable: the full check names the problem
        sig, hit = None, None
    if hit is not None:
        check_log_G_values(log_G)  # values change from call to call: checked every time, never memoised
        return hit
    out = check_inference(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile,
                          state_dtype)
    if sig is not None:
        if len(_CHECKED) > 512:
            _CHECKED.clear()
        _CHECKED[sig] = out
    return out
