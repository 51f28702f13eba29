"""Public ops: `power_retention` (training forward; MATH.md sections 1-3).

Semantics follow the `retention` package 1.0.7 (`retention.triton.power_retention`):

* t is padded with zeros (log_G with 0) to a multiple of chunk_size and the padding is dropped
  from Y. Padded keys are 0 (phi(0) = 0) and padded gates are 0 (no decay), so the final state
  Sbar_n is the state at the true end of the sequence.
* `switch_over_seq_len` defaults to chunk_size; the plain quadratic formula (intra-chunk attention
  kernel in normalised mode over the whole sequence) runs when chunk_size is None or the padded t
  <= switch_over_seq_len, unless an initial_state is given (then the chunked path runs; with
  chunk_size None as one chunk of length t).
* return_final_state=True returns (Y, S_final [b,h,D,d], s_final [b,h,D]) (fp32, unscaled, in the
  d_tile layout); on the quadratic path with padded t < switch_over_seq_len the state is
  (None, None) as in retention, at t == switch_over_seq_len it is computed.

Chunked path: update_state -> discumsum (bf16 copy of the states for the MMA, fp32 sum of keys,
fp32 final state only) -> intra_chunk_attention (merge mode: O, l, m) -> query_state (merge).
All launches go on the current stream; no host synchronisation, except the eager check that log_G <= 0
(one max; skipped under CUDA-graph capture and torch.compile).
"""
from __future__ import annotations

import math

from vidrial.core.errors import InputError

__all__ = ["power_retention"]

HEAD_DIMS = (32, 64, 128)


def _check_log_G_values(log_G) -> None:
    """log_G <= 0 (gates exp(log_G) in (0, 1]): a positive (or NaN) gate would grow the state instead of
    decaying it, a silently wrong result. Reading the maximum is a device->host sync, which CUDA-graph
    capture forbids and which would break a torch.compile graph: those skip the check (their eager calls,
    e.g. the warm-up before capture, do it); elsewhere it is one small reduction."""
    import torch

    if log_G is None or log_G.numel() == 0 or log_G.device.type == "meta" or torch.compiler.is_compiling():
        return
    if log_G.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    top = float(log_G.max())
    if not top <= 0:  # NaN fails this too
        raise InputError("log_G", f"max value {top:g}", "values <= 0 (log gates: exp(log_G) in (0, 1])")


def _check_inputs(Q, K, V, log_G, deg, d_tile, chunk_size, switch_over_seq_len, scale):
    import torch

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
    if d not in HEAD_DIMS:
        raise InputError("Q", f"head_dim {d}", f"one of {HEAD_DIMS}")
    if isinstance(deg, bool) or not isinstance(deg, int) or deg not in (2, 4):
        raise InputError("deg", deg, "2 or 4 (an even degree keeps the weights non-negative)")
    if d_tile is not None and (isinstance(d_tile, bool) or not isinstance(d_tile, int) or d_tile < 1 or d % d_tile):
        raise InputError("d_tile", d_tile, f"None or a divisor of head_dim={d}: "
                                           f"{[x for x in range(1, d + 1) if d % x == 0]}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 16 or chunk_size % 16):
        raise InputError("chunk_size", chunk_size, "None (quadratic) or a positive multiple of 16")
    if switch_over_seq_len is not None and (isinstance(switch_over_seq_len, bool)
                                            or not isinstance(switch_over_seq_len, int) or switch_over_seq_len < 0):
        raise InputError("switch_over_seq_len", switch_over_seq_len, "None or a non-negative integer")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise InputError("scale", scale, "None (or 0: 1/sqrt(head_dim)) or a finite number")
    if log_G is not None:
        if not isinstance(log_G, torch.Tensor):
            raise InputError("log_G", type(log_G).__name__, "None or a float32 torch.Tensor [batch, time, kv_heads]")
        if log_G.dtype != torch.float32:
            raise InputError("log_G", f"dtype {log_G.dtype}", "torch.float32")
        if tuple(log_G.shape) != (b, t, h):
            raise InputError("log_G", f"shape {tuple(log_G.shape)}", f"shape {(b, t, h)} = [batch, time, kv_heads]")
        _check_log_G_values(log_G)
    # devices last, so that shape and dtype errors are reported the same on any device
    if Q.device.type != "cuda":
        raise InputError("Q", f"device {Q.device}", "a CUDA tensor")
    if K.device != Q.device or V.device != Q.device:
        raise InputError("K/V", f"devices {K.device}/{V.device}", f"the device of Q ({Q.device})")
    if log_G is not None and log_G.device != Q.device:
        raise InputError("log_G", f"device {log_G.device}", f"the device of Q ({Q.device})")
    return b, t, hq, h, d


def _check_state(initial_state, sum_of_keys, b, h, D, d, deg, d_tile, device):
    import torch

    if (initial_state is None) != (sum_of_keys is None):
        raise InputError("sum_of_keys" if sum_of_keys is None else "initial_state", None,
                         "initial_state and sum_of_keys given together (both or neither)")
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


def _pad_time(x, pad: int):
    import torch

    if pad == 0:
        return x
    if x.dim() == 4:
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    return torch.nn.functional.pad(x, (0, 0, 0, pad))


def _chunked_states(K, V, log_G, deg, d_tile, c, initial_state, sum_of_keys, *, want_copy: bool, want_final: bool):
    """update_state -> discumsum. Returns discumsum_forward's dict (Sbar16, sbar, S_final)."""
    from vidrial.kernels.power_retention.discumsum import discumsum_forward
    from vidrial.kernels.power_retention.update_state import update_state

    b, t, h, _ = K.shape
    n = t // c
    S, s = update_state(K, V, log_G, deg=deg, d_tile=d_tile, chunk_size=c)
    L = log_G.view(b, n, c, h).sum(2) if log_G is not None else None
    return discumsum_forward(S, s, L, initial_state, sum_of_keys, fp32_states=False, bf16_copy=want_copy,
                             final_state=want_final)


def _use_autograd(*tensors) -> bool:
    """The differentiable path (vidrial.autograd: custom ops + backward kernels) when an input requires
    grad, or under torch.compile (custom ops trace without graph breaks)."""
    import torch

    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)


def power_retention(Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, return_final_state=False, deg=2,
                    scale=None, chunk_size=None, switch_over_seq_len=None, d_tile=None):
    """Symmetric power retention (MATH.md), forward, on the GPU with vidrial's kernels.

    Q [b,t,hq,d], K, V [b,t,h,d] (bf16 or fp16, same dtype, CUDA; d in 32/64/128; hq a multiple
    of h: query head i uses KV head i // (hq/h)); log_G [b,t,h] float32 per-step log gates (<= 0)
    or None; initial_state [b,h,D,d] + sum_of_keys [b,h,D] float32 (both or neither), with
    D = feature_dim(d, deg, d_tile); deg 2 or 4; scale None/0 = 1/sqrt(d); chunk_size None or a
    multiple of 16; switch_over_seq_len None (= chunk_size) or an int; d_tile None (default layout,
    sympow.default_d_tile) or a divisor of d. Returns Y [b,t,hq,d] in Q's dtype, or with
    return_final_state=True (Y, S_final, s_final) (see the module docstring for when these are None).
    """
    from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim

    if _use_autograd(Q, K, V, log_G, initial_state, sum_of_keys):
        from vidrial.autograd import power_retention as differentiable

        return differentiable(Q, K, V, log_G, initial_state, sum_of_keys, return_final_state, deg, scale, chunk_size,
                              switch_over_seq_len, d_tile)
    b, t, hq, h, d = _check_inputs(Q, K, V, log_G, deg, d_tile, chunk_size, switch_over_seq_len, scale)
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    D = feature_dim(d, deg, d_tile)
    _check_state(initial_state, sum_of_keys, b, h, D, d, deg, d_tile, Q.device)
    if not scale:
        scale = 1.0 / math.sqrt(d)
    scale = float(scale)

    import torch

    from vidrial.kernels.power_retention.intra_chunk_attention import intra_chunk_attention
    from vidrial.kernels.power_retention.query_state import query_state

    if t == 0 or b == 0:
        Y = Q.new_empty(Q.shape)
        if not return_final_state:
            return Y
        if initial_state is not None:
            return Y, initial_state.clone(), sum_of_keys.clone()
        return Y, None, None

    # retention: pad to a multiple of the chunk first; switch_over_seq_len defaults to chunk_size
    t_pad = t if chunk_size is None else -(-t // chunk_size) * chunk_size
    switch = switch_over_seq_len if switch_over_seq_len is not None else chunk_size
    quadratic = (switch is None or t_pad <= switch) and initial_state is None

    if quadratic:
        Y = intra_chunk_attention(Q, K, V, log_G, deg=deg, scale=scale, chunk_size=None, normalize=True)
        if not return_final_state:
            return Y
        if switch is not None and t_pad < switch:
            return Y, None, None
        # the final state does not depend on the chunking: one pass of update_state + discumsum
        c = chunk_size if chunk_size is not None else 64
        tp = -(-t // c) * c
        Kp, Vp = _pad_time(K, tp - t), _pad_time(V, tp - t)
        lg = _pad_time(log_G, tp - t) if log_G is not None else None
        st = _chunked_states(Kp, Vp, lg, deg, d_tile, c, None, None, want_copy=False, want_final=True)
        n = tp // c
        return Y, st["S_final"], st["sbar"][:, n].contiguous()

    # chunked path (with chunk_size None: one chunk of the whole, 16-padded, sequence)
    c = chunk_size if chunk_size is not None else -(-t // 16) * 16
    t_pad = -(-t // c) * c
    pad = t_pad - t
    n = t_pad // c
    Qp, Kp, Vp = _pad_time(Q, pad), _pad_time(K, pad), _pad_time(V, pad)
    lg = _pad_time(log_G, pad) if log_G is not None else None
    st = _chunked_states(Kp, Vp, lg, deg, d_tile, c, initial_state, sum_of_keys, want_copy=True,
                         want_final=return_final_state)
    O, l, m = intra_chunk_attention(Qp, Kp, Vp, lg, deg=deg, scale=scale, chunk_size=c, normalize=False)
    Y = query_state(Qp, st["Sbar16"], st["sbar"], O, l, m, lg, deg=deg, d_tile=d_tile, scale=scale, chunk_size=c,
                    zero_first_state=initial_state is None)
    if pad:
        Y = Y[:, :t]
    if return_final_state:
        return Y, st["S_final"], st["sbar"][:, n].contiguous()
    return Y
