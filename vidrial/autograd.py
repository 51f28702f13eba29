"""Differentiable power retention (docs/MATH.md section 4): the torch.library custom ops and their autograd.

Two custom ops, both with fake (meta) implementations, so that ``torch.compile(fullgraph=True)``
traces ``power_retention`` as two opaque nodes without graph breaks:

* ``vidrial::power_retention_fwd`` = vidrial.pipeline.forward.pieces: the forward kernels, returning
  also what the backward needs (O, l, m and the states the forward keeps anyway, Sbar16 and sbar;
  nothing of size t x D (phi) is ever stored). chunk_size 0: quadratic.
* ``vidrial::power_retention_bwd`` = vidrial.pipeline.backward.power_retention_backward.

``torch.library.register_autograd`` ties them together. Every launch goes on the current stream with
outputs from torch's allocator and no host synchronisation, so forward+backward can be captured in
a CUDA graph (after one warm-up call that compiles and loads the kernels and builds the block tables).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vidrial.pipeline import backward as _backward_pipeline
from vidrial.pipeline import forward as _forward_pipeline

__all__ = ["power_retention", "power_retention_fwd", "power_retention_bwd"]

Tensor = torch.Tensor
_EMPTY = (0,)


@torch.library.custom_op("vidrial::power_retention_fwd", mutates_args=())
def power_retention_fwd(Q: Tensor, K: Tensor, V: Tensor, log_G: Optional[Tensor], initial_state: Optional[Tensor],
                        sum_of_keys: Optional[Tensor], deg: int, scale: float, chunk_size: int, d_tile: int,
                        want_final: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Y, O, l, m, Sbar16, sbar, S_final, s_final); see vidrial.pipeline.forward.pieces."""
    return _forward_pipeline.pieces(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, d_tile,
                                    want_final)


@power_retention_fwd.register_fake
def _fwd_fake(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, d_tile, want_final):
    from vidrial.kernels.power_retention.sympow import feature_dim

    if _recording_on_meta(Q):  # the real composition, planned only: each kernel call records its key
        return _forward_pipeline.pieces(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, d_tile,
                                        want_final)

    b, t, hq, d = Q.shape
    h = K.shape[2]
    f32 = dict(device=Q.device, dtype=torch.float32)
    Y = Q.new_empty(Q.shape)
    O = Q.new_empty((b, t, hq, d), dtype=torch.float32)
    l = Q.new_empty((b, t, hq), dtype=torch.float32)
    m = Q.new_empty((b, t, hq), dtype=torch.float32)
    if chunk_size == 0:
        return Y, O, l, m, torch.empty(_EMPTY, **f32), torch.empty(_EMPTY, **f32), torch.empty(_EMPTY, **f32), \
            torch.empty(_EMPTY, **f32)
    n = t // chunk_size
    D = feature_dim(d, deg, d_tile)
    Sbar16 = Q.new_empty((b, n, h, D, d), dtype=torch.bfloat16)
    sbar = Q.new_empty((b, n + 1, h, D), dtype=torch.float32)
    if want_final:
        S_final, s_final = Q.new_empty((b, h, D, d), dtype=torch.float32), Q.new_empty((b, h, D), dtype=torch.float32)
    else:
        S_final, s_final = torch.empty(_EMPTY, **f32), torch.empty(_EMPTY, **f32)
    return Y, O, l, m, Sbar16, sbar, S_final, s_final


@torch.library.custom_op("vidrial::power_retention_bwd", mutates_args=())
def power_retention_bwd(dY: Tensor, dS_final: Optional[Tensor], ds_final: Optional[Tensor], Q: Tensor, K: Tensor,
                        V: Tensor, log_G: Optional[Tensor], Y: Tensor, O: Tensor, l: Tensor, m: Tensor,
                        Sbar16: Tensor, sbar: Tensor, deg: int, scale: float, chunk_size: int, d_tile: int,
                        has_state: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dQ, dK, dV, dlog_G, d_initial_state, d_sum_of_keys); see vidrial.pipeline.backward."""
    return _backward_pipeline.power_retention_backward(dY, dS_final, ds_final, Q, K, V, log_G, Y, O, l, m, Sbar16,
                                                       sbar, deg, scale, chunk_size, d_tile, has_state)


@power_retention_bwd.register_fake
def _bwd_fake(dY, dS_final, ds_final, Q, K, V, log_G, Y, O, l, m, Sbar16, sbar, deg, scale, chunk_size, d_tile,
              has_state):
    if _recording_on_meta(Q):
        return _backward_pipeline.power_retention_backward(dY, dS_final, ds_final, Q, K, V, log_G, Y, O, l, m, Sbar16,
                                                           sbar, deg, scale, chunk_size, d_tile, has_state)
    dQ, dK, dV = Q.new_empty(Q.shape), K.new_empty(K.shape), V.new_empty(V.shape)
    dlog_G = log_G.new_empty(log_G.shape) if log_G is not None else Q.new_empty(_EMPTY, dtype=torch.float32)
    if has_state and chunk_size != 0:
        b, h = K.shape[0], K.shape[2]
        D, d = Sbar16.shape[3], Sbar16.shape[4]
        return dQ, dK, dV, dlog_G, Q.new_empty((b, h, D, d), dtype=torch.float32), \
            Q.new_empty((b, h, D), dtype=torch.float32)
    e = Q.new_empty(_EMPTY, dtype=torch.float32)
    return dQ, dK, dV, dlog_G, e, e.clone()


def _recording_on_meta(Q: Tensor) -> bool:
    """Eager meta tensors inside vidrial.tuning.record: run the pipeline (its kernel calls are planned, not
    launched) so the keys it dispatches are recorded. Fake tensors while torch.compile traces carry the real
    device, so tracing keeps the plain fake."""
    from vidrial.dispatch.record import recording

    return Q.device.type == "meta" and recording() and not torch.compiler.is_compiling()


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, d_tile, want_final = inputs
    Y, O, l, m, Sbar16, sbar, _, _ = output
    ctx.save_for_backward(Q, K, V, log_G, Y, O, l, m, Sbar16, sbar)
    ctx.meta = (deg, scale, chunk_size, d_tile, initial_state is not None, log_G is not None)
    ctx.mark_non_differentiable(O, l, m, Sbar16, sbar)


def _backward(ctx: Any, dY, dO, dl, dm, dSbar16, dsbar, dS_final, ds_final) -> tuple:
    Q, K, V, log_G, Y, O, l, m, Sbar16, sbar = ctx.saved_tensors
    deg, scale, chunk_size, d_tile, has_state, gated = ctx.meta
    if dY is None:
        dY = torch.zeros_like(Y)
    if dS_final is not None and dS_final.numel() == 0:
        dS_final = None
    if ds_final is not None and ds_final.numel() == 0:
        ds_final = None
    dQ, dK, dV, dlog_G, dS0, ds0 = torch.ops.vidrial.power_retention_bwd(
        dY, dS_final, ds_final, Q, K, V, log_G, Y, O, l, m, Sbar16, sbar, deg, scale, chunk_size, d_tile,
        has_state and chunk_size != 0)
    return (dQ, dK, dV, dlog_G if gated else None, dS0 if has_state else None, ds0 if has_state else None,
            None, None, None, None, None)


power_retention_fwd.register_autograd(_backward, setup_context=_setup_context)


def power_retention(Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, return_final_state=False, deg=2,
                    scale=None, chunk_size=None, switch_over_seq_len=None, d_tile=None):
    """``vidrial.power_retention`` always through the custom op, so with gradients (same arguments, semantics
    and results). Gradients flow to Q, K, V, log_G, initial_state and sum_of_keys, also through the returned
    final state: with ``return_final_state=True`` and a state to return the chunked path runs."""
    return _forward_pipeline.power_retention_forward(Q, K, V, log_G, initial_state, sum_of_keys, return_final_state,
                                                     deg, scale, chunk_size, switch_over_seq_len, d_tile,
                                                     op=torch.ops.vidrial.power_retention_fwd)
