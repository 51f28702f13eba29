"""Differentiable power retention (MATH.md section 4): torch.library custom ops + autograd.

Two custom ops, both with fake (meta) implementations, so that ``torch.compile(fullgraph=True)``
traces ``power_retention`` as two opaque nodes without graph breaks:

* ``vidrial::power_retention_fwd`` runs the forward kernels (update_state -> discumsum ->
  intra-chunk attention (merge mode) -> query_state; or the quadratic intra-chunk attention over the
  whole sequence with ``chunk_size = 0``) and also returns what the backward needs:
  ``O, l, m`` (fp32, [b,t,hq,(d)]) and the states the forward already keeps, the bf16 copy
  ``Sbar16 [b,n,h,D,d]`` and ``sbar [b,n+1,h,D]``. Nothing of size t x D (phi) is ever stored.
* ``vidrial::power_retention_bwd`` runs the backward kernels in the order
  query_state_bwd (rows, state) -> discumsum_bwd -> update_state_bwd, and intra_chunk_attention_bwd
  (dkv, dq), then combines the pieces (sums over GQA heads, the gate's reverse cumsum) in torch.

``torch.library.register_autograd`` ties them together. Every launch goes on the current stream with
outputs from torch's allocator and no host synchronisation, so forward+backward can be captured in
a CUDA graph (after one warm-up call that compiles and loads the kernels and builds the block tables).

Saved for the backward: Q, K, V, log_G, Y (inputs/outputs), O (fp32 [b,t,hq,d]), l, m (fp32 [b,t,hq]),
Sbar16 (bf16 [b,n,h,D,d]) and sbar (fp32 [b,n+1,h,D]). The backward's temporaries: dSbar (fp32
[b,n,h,D,d], turned into dS in place by discumsum_bwd) and O(b t hq d) fp32 row buffers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["power_retention", "power_retention_fwd", "power_retention_bwd"]

_EMPTY = (0,)


def _empty(device):
    return torch.empty(_EMPTY, device=device, dtype=torch.float32)


def _intra_row_term(dO, O, dl, l):
    """sum_j P dP of each row in fp32 from the forward's O, l: dO.O + dl (l - 1e-6) [b,t,hq]."""
    # an elementwise product and a row sum, not einsum: einsum makes this a batched GEMV of 1 x d by d x 1
    # (b t hq of them), which cuBLAS splits into 8+ launches (0.68 ms at shape A against ~0.1 ms)
    return (dO * O).sum(-1) + dl * (l - 1e-6)


def _scan_time(x, reverse: bool = False):
    """Cumulative sums of x [..., T, h] along T (from the end when `reverse`), contiguous. The scan runs on
    a [..., h, T] copy: torch's scan over a non-innermost dim (h = 8 innermost) is ~25x slower."""
    y = x.transpose(-1, -2).contiguous()
    y = y.flip(-1).cumsum(-1).flip(-1) if reverse else y.cumsum(-1)
    return y.transpose(-1, -2).contiguous()


def _chunk_cumsum(log_G, c: int):
    """[b,t,h] per-step log gates -> chunk-local cumulative sums (fp32), t a multiple of c."""
    b, t, h = log_G.shape
    return _scan_time(log_G.float().view(b, t // c, c, h)).view(b, t, h)


# ---------------------------------------------------------------------------------------------------
# forward op
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("vidrial::power_retention_fwd", mutates_args=())
def power_retention_fwd(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: Optional[torch.Tensor],
                        initial_state: Optional[torch.Tensor], sum_of_keys: Optional[torch.Tensor], deg: int,
                        scale: float, chunk_size: int, d_tile: int, want_final: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    """(Y, O, l, m, Sbar16, sbar, S_final, s_final). chunk_size 0: quadratic (states are empty);
    else t must be a multiple of chunk_size. S_final/s_final are empty unless want_final."""
    from vidrial.kernels.power_retention.intra_chunk_attention import intra_chunk_attention
    from vidrial.kernels.power_retention.query_state import query_state
    from vidrial.ops import _chunked_states

    dev = Q.device
    if chunk_size == 0:
        O, l, m = intra_chunk_attention(Q, K, V, log_G, deg=deg, scale=scale, chunk_size=None, normalize=False)
        Y = (O / l.unsqueeze(-1)).to(Q.dtype)
        return Y, O, l, m, _empty(dev), _empty(dev), _empty(dev), _empty(dev)
    b, t, h, _ = K.shape
    c = chunk_size
    n = t // c
    st = _chunked_states(K, V, log_G, deg, d_tile, c, initial_state, sum_of_keys, want_copy=True,
                         want_final=want_final)
    O, l, m = intra_chunk_attention(Q, K, V, log_G, deg=deg, scale=scale, chunk_size=c, normalize=False)
    Y = query_state(Q, st["Sbar16"], st["sbar"], O, l, m, log_G, deg=deg, d_tile=d_tile, scale=scale, chunk_size=c,
                    zero_first_state=initial_state is None)
    if want_final:
        S_final, s_final = st["S_final"], st["sbar"][:, n].clone()
    else:
        S_final, s_final = _empty(dev), _empty(dev)
    return Y, O, l, m, st["Sbar16"], st["sbar"], S_final, s_final


@power_retention_fwd.register_fake
def _fwd_fake(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, d_tile, want_final):
    from vidrial.kernels.power_retention.sympow import feature_dim

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


# ---------------------------------------------------------------------------------------------------
# backward op
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("vidrial::power_retention_bwd", mutates_args=())
def power_retention_bwd(dY: torch.Tensor, dS_final: Optional[torch.Tensor], ds_final: Optional[torch.Tensor],
                        Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: Optional[torch.Tensor],
                        Y: torch.Tensor, O: torch.Tensor, l: torch.Tensor, m: torch.Tensor, Sbar16: torch.Tensor,
                        sbar: torch.Tensor, deg: int, scale: float, chunk_size: int, d_tile: int, has_state: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV, dlog_G, d_initial_state, d_sum_of_keys); the last three are empty when not
    applicable. fp32 gradients cast to the input dtypes."""
    from vidrial.kernels.power_retention.discumsum_bwd import discumsum_bwd
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import intra_chunk_attention_bwd
    from vidrial.kernels.power_retention.query_state_bwd import query_state_bwd
    from vidrial.kernels.power_retention.update_state_bwd import update_state_bwd

    dev = Q.device
    b, t, hq, d = Q.shape
    h = K.shape[2]
    r = hq // h
    dY = dY.to(Q.dtype).contiguous()
    if chunk_size == 0:
        # quadratic: Y = O / l (fp32 O, l), one causal block over the whole sequence
        inv = 1.0 / l
        Yf = O * inv.unsqueeze(-1)
        dYf = dY.float()
        dO = dYf * inv.unsqueeze(-1)
        dl = -(dYf * Yf).sum(-1) * inv
        G = _scan_time(log_G.float()) if log_G is not None else None
        dQ, dK, dV, dgcol, dgrow = intra_chunk_attention_bwd(Q, K, V, G, m, dO, dl, deg=deg, scale=scale,
                                                             chunk_size=None, want_dgrow=True, dY=dY)
        dlog_G = _empty(dev)
        if log_G is not None:
            # the row part sum_j P dP: from the kernel when it made dgcol from bf16 operands (impl="flash": the
            # two cancel over the sequence only when they share P and dP), else in fp32 from O and l
            dg_row = dgrow if dgrow is not None else _intra_row_term(dO, O, dl, l)
            dg = dg_row.view(b, t, h, r).sum(3) + dgcol
            dlog_G = _scan_time(dg, reverse=True)
        return dQ.to(Q.dtype), dK.to(K.dtype), dV.to(V.dtype), dlog_G, _empty(dev), _empty(dev)

    c = chunk_size
    n = t // c
    g = _chunk_cumsum(log_G, c) if log_G is not None else None
    L = log_G.float().view(b, n, c, h).sum(2) if log_G is not None else None
    qs = query_state_bwd(Q, g, Sbar16, sbar, O, l, m, Y, dY, deg=deg, d_tile=d_tile, scale=scale, chunk_size=c)
    dS, ds, dL, dS0, ds0 = discumsum_bwd(qs["dSbar"], qs["dsbar"], Sbar16, sbar, L,
                                         dS_final.float() if dS_final is not None else None,
                                         ds_final.float() if ds_final is not None else None, want_initial=has_state)
    dK_u, dV_u, E = update_state_bwd(K, V, g, dS, ds, deg=deg, d_tile=d_tile, chunk_size=c)
    dQ_i, dK_i, dV_i, dgcol, dgrow = intra_chunk_attention_bwd(Q, K, V, g, m, qs["dO"], qs["dl"], deg=deg,
                                                               scale=scale, chunk_size=c, want_dgrow=True, dY=dY)
    # fp32 sums written straight in the input dtype: one pass instead of an fp32 sum and a cast
    dQ = torch.add(qs["dQ"], dQ_i, out=torch.empty_like(Q))
    dK = torch.add(dK_u, dK_i, out=torch.empty_like(K))
    dV = torch.add(dV_u, dV_i, out=torch.empty_like(V))
    dlog_G = _empty(dev)
    if log_G is not None:
        dgq = qs["dg"]  # includes the intra row part dO.O + dl (l - 1e-6) in fp32
        if dgrow is not None:  # impl="flash": swap it for the kernel's, consistent with its dgcol (as above)
            dgq = dgq - _intra_row_term(qs["dO"], O, qs["dl"], l) + dgrow
        dg = dgq.view(b, t, h, r).sum(3) + dgcol - E  # gradient w.r.t. the chunk-local cumsum g
        dLt = dL + E.view(b, n, c, h).sum(2)               # gradient w.r.t. the chunk gates L
        rev = _scan_time(dg.view(b, n, c, h), reverse=True)
        dlog_G = (rev + dLt.unsqueeze(2)).view(b, t, h)
    if has_state:
        return dQ, dK, dV, dlog_G, dS0, ds0
    return dQ, dK, dV, dlog_G, _empty(dev), _empty(dev)


@power_retention_bwd.register_fake
def _bwd_fake(dY, dS_final, ds_final, Q, K, V, log_G, Y, O, l, m, Sbar16, sbar, deg, scale, chunk_size, d_tile,
              has_state):
    dQ, dK, dV = Q.new_empty(Q.shape), K.new_empty(K.shape), V.new_empty(V.shape)
    dlog_G = log_G.new_empty(log_G.shape) if log_G is not None else Q.new_empty(_EMPTY, dtype=torch.float32)
    if has_state and chunk_size != 0:
        b, h = K.shape[0], K.shape[2]
        D, d = Sbar16.shape[3], Sbar16.shape[4]
        return dQ, dK, dV, dlog_G, Q.new_empty((b, h, D, d), dtype=torch.float32), \
            Q.new_empty((b, h, D), dtype=torch.float32)
    e = Q.new_empty(_EMPTY, dtype=torch.float32)
    return dQ, dK, dV, dlog_G, e, e.clone()


# ---------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, d_tile, want_final = inputs
    Y, O, l, m, Sbar16, sbar, _, _ = output
    ctx.save_for_backward(Q, K, V, log_G, Y, O, l, m, Sbar16, sbar)
    ctx.meta = (deg, scale, chunk_size, d_tile, initial_state is not None, log_G is not None)
    ctx.mark_non_differentiable(O, l, m, Sbar16, sbar)


def _backward(ctx, dY, dO, dl, dm, dSbar16, dsbar, dS_final, ds_final):
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
    """``vidrial.power_retention`` with gradients (same arguments, semantics and results; see
    vidrial.ops). Gradients flow to Q, K, V, log_G, initial_state and sum_of_keys, also through the
    returned final state. On the quadratic path with ``return_final_state=True`` and a state to
    return, the chunked path runs instead (same function), so the state is differentiable."""
    from vidrial.kernels.power_retention.sympow import default_d_tile
    from vidrial.ops import _check_inputs, _check_state, _pad_time

    b, t, hq, h, d = _check_inputs(Q, K, V, log_G, deg, d_tile, chunk_size, switch_over_seq_len, scale)
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    D = math.comb(d // d_tile + deg - 1, deg) * d_tile**deg  # sympow.feature_dim, without its cache (dynamo)
    _check_state(initial_state, sum_of_keys, b, h, D, d, deg, d_tile, Q.device)
    scale = 1.0 / math.sqrt(d) if not scale else float(scale)
    if t == 0 or b == 0:  # nothing to differentiate: the plain forward's empty results
        from vidrial.ops import power_retention as forward

        with torch.no_grad():
            return forward(Q, K, V, log_G, initial_state, sum_of_keys, return_final_state, deg, scale, chunk_size,
                           switch_over_seq_len, d_tile)
    t_pad = t if chunk_size is None else -(-t // chunk_size) * chunk_size
    switch = switch_over_seq_len if switch_over_seq_len is not None else chunk_size
    quadratic = (switch is None or t_pad <= switch) and initial_state is None
    if quadratic and return_final_state and not (switch is not None and t_pad < switch):
        quadratic = False  # a state is returned: run the chunked path, which produces it differentiably
    if quadratic:
        Y = torch.ops.vidrial.power_retention_fwd(Q, K, V, log_G, None, None, deg, scale, 0, d_tile, False)[0]
        return (Y, None, None) if return_final_state else Y
    c = chunk_size if chunk_size is not None else -(-t // 16) * 16
    t_pad = -(-t // c) * c
    pad = t_pad - t
    Qp, Kp, Vp = _pad_time(Q, pad), _pad_time(K, pad), _pad_time(V, pad)
    lg = _pad_time(log_G, pad) if log_G is not None else None
    out = torch.ops.vidrial.power_retention_fwd(Qp, Kp, Vp, lg, initial_state, sum_of_keys, deg, scale, c, d_tile,
                                                bool(return_final_state))
    Y = out[0][:, :t] if pad else out[0]
    if return_final_state:
        return Y, out[6], out[7]
    return Y
