"""The backward composition (docs/MATH.md section 4): the body of the custom op vidrial::power_retention_bwd.

Chunked: query_state_bwd (rows, state) -> discumsum_bwd -> update_state_bwd, and
intra_chunk_attention_bwd (dkv, dq); then the pieces are combined in torch (sums over GQA heads, the
gate's reverse cumsum). Quadratic (chunk_size 0): intra_chunk_attention_bwd over the whole sequence.
Every launch goes on the current stream with outputs from torch's allocator and no host sync.

Inputs are the forward's saved tensors (forward.pieces): Q, K, V, log_G, Y, O (fp32 [b,t,hq,d]), l, m
(fp32 [b,t,hq]), Sbar16 (bf16 [b,n,h,D,d]) and sbar (fp32 [b,n+1,h,D]). Temporaries: dSbar (fp32
[b,n,h,D,d]), dS (bf16, written by discumsum_bwd for update_state_bwd) and O(b t hq d) fp32 row buffers.
"""
from __future__ import annotations

from typing import Optional

import torch

from vidrial.pipeline.forward import placeholder as _empty

__all__ = ["power_retention_backward", "Grads"]

Tensor = torch.Tensor
Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # dQ, dK, dV, dlog_G, d_initial_state, d_sum_of_keys


def intra_row_term(dO: Tensor, O: Tensor, dl: Tensor, l: Tensor) -> Tensor:
    """sum_j P dP of each row in fp32 from the forward's O, l: dO.O + dl (l - 1e-6) [b,t,hq]."""
    # an elementwise product and a row sum, not einsum: einsum makes this a batched GEMV of 1 x d by d x 1
    # (b t hq of them), which cuBLAS splits into 8+ launches (0.68 ms at shape A against ~0.1 ms)
    return (dO * O).sum(-1) + dl * (l - 1e-6)


def scan_time(x: Tensor, reverse: bool = False) -> Tensor:
    """Cumulative sums of x [..., T, h] along T (from the end when `reverse`), contiguous. The scan runs on
    a [..., h, T] copy: torch's scan over a non-innermost dim (h = 8 innermost) is ~25x slower."""
    y = x.transpose(-1, -2).contiguous()
    y = y.flip(-1).cumsum(-1).flip(-1) if reverse else y.cumsum(-1)
    return y.transpose(-1, -2).contiguous()


def chunk_cumsum(log_G: Tensor, c: int) -> Tensor:
    """[b,t,h] per-step log gates -> chunk-local cumulative sums (fp32), t a multiple of c."""
    b, t, h = log_G.shape
    return scan_time(log_G.float().view(b, t // c, c, h)).view(b, t, h)


def _quadratic_backward(dY: Tensor, Q: Tensor, K: Tensor, V: Tensor, log_G: Optional[Tensor], O: Tensor,
                        l: Tensor, m: Tensor, deg: int, scale: float) -> Grads:
    """Y = O / l (fp32 O, l), one causal block over the whole sequence."""
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import intra_chunk_attention_bwd

    dev = Q.device
    b, t, hq, _ = Q.shape
    h = K.shape[2]
    inv = 1.0 / l
    Yf = O * inv.unsqueeze(-1)
    dYf = dY.float()
    dO = dYf * inv.unsqueeze(-1)
    dl = -(dYf * Yf).sum(-1) * inv
    G = scan_time(log_G.float()) if log_G is not None else None
    dQ, dK, dV, dgcol, dgrow = intra_chunk_attention_bwd(Q, K, V, G, m, dO, dl, deg=deg, scale=scale,
                                                         chunk_size=None, want_dgrow=True, dY=dY)
    dlog_G = _empty(dev)
    if log_G is not None:
        # the row part sum_j P dP: from the kernel when it made dgcol from bf16 operands (impl="flash": the
        # two cancel over the sequence only when they share P and dP), else in fp32 from O and l
        dg_row = dgrow if dgrow is not None else intra_row_term(dO, O, dl, l)
        dg = dg_row.view(b, t, h, hq // h).sum(3) + dgcol
        dlog_G = scan_time(dg, reverse=True)
    return dQ.to(Q.dtype), dK.to(K.dtype), dV.to(V.dtype), dlog_G, _empty(dev), _empty(dev)


def power_retention_backward(dY: Tensor, dS_final: Optional[Tensor], ds_final: Optional[Tensor], Q: Tensor,
                             K: Tensor, V: Tensor, log_G: Optional[Tensor], Y: Tensor, O: Tensor, l: Tensor,
                             m: Tensor, Sbar16: Tensor, sbar: Tensor, deg: int, scale: float, chunk_size: int,
                             d_tile: int, has_state: bool) -> Grads:
    """(dQ, dK, dV, dlog_G, d_initial_state, d_sum_of_keys); the last three are empty when not applicable.
    fp32 gradients written in the input dtypes."""
    from vidrial.kernels.power_retention.discumsum_bwd import discumsum_bwd
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import intra_chunk_attention_bwd
    from vidrial.kernels.power_retention.query_state_bwd import query_state_bwd
    from vidrial.kernels.power_retention.update_state_bwd import update_state_bwd

    dY = dY.to(Q.dtype).contiguous()
    if chunk_size == 0:
        return _quadratic_backward(dY, Q, K, V, log_G, O, l, m, deg, scale)
    dev = Q.device
    b, t, hq, _ = Q.shape
    h = K.shape[2]
    c = chunk_size
    n = t // c
    g = chunk_cumsum(log_G, c) if log_G is not None else None
    L = log_G.float().view(b, n, c, h).sum(2) if log_G is not None else None
    # each temporary is dropped as soon as its consumer has run (the peak of the step is its live set)
    qs = query_state_bwd(Q, g, Sbar16, sbar, O, l, m, Y, dY, deg=deg, d_tile=d_tile, scale=scale, chunk_size=c)
    dSbar, dsbar = qs.pop("dSbar"), qs.pop("dsbar")
    for used in ("dAh", "dBh", "qscale"):  # the state pass's inputs: consumed inside query_state_bwd
        del qs[used]
    dS, ds, dL, dS0, ds0 = discumsum_bwd(dSbar, dsbar, Sbar16, sbar, L,
                                         dS_final.float() if dS_final is not None else None,
                                         ds_final.float() if ds_final is not None else None, want_initial=has_state,
                                         dS_dtype=torch.bfloat16)  # what update_state_bwd reads
    del dSbar, dsbar  # dS is its own bf16 tensor, ds is dsbar
    dK_u, dV_u, E = update_state_bwd(K, V, g, dS, ds, deg=deg, d_tile=d_tile, chunk_size=c)
    del dS, ds
    # dO = alpha dY row by row: the intra backward takes dY and the rows pass's alpha (no dO tensor, no norms)
    dQ_i, dK_i, dV_i, dgcol, dgrow = intra_chunk_attention_bwd(Q, K, V, g, m, None, qs["dl"], deg=deg, scale=scale,
                                                               chunk_size=c, want_dgrow=True, dY=dY,
                                                               alpha=qs["alpha"])
    # fp32 sums written straight in the input dtype: one pass instead of an fp32 sum and a cast
    dQ = torch.add(qs["dQ"], dQ_i, out=torch.empty_like(Q))
    dK = torch.add(dK_u, dK_i, out=torch.empty_like(K))
    dV = torch.add(dV_u, dV_i, out=torch.empty_like(V))
    dlog_G = _empty(dev)
    if log_G is not None:
        # the rows pass's dg without its fp32 intra row part dO.O + dl (l - 1e-6), plus the intra kernel's row
        # part, consistent with its dgcol (as in _quadratic_backward)
        dgq = qs["dgs"] + dgrow if dgrow is not None else qs["dg"]
        dg = dgq.view(b, t, h, hq // h).sum(3) + dgcol - E  # gradient w.r.t. the chunk-local cumsum g
        dLt = dL + E.view(b, n, c, h).sum(2)                 # gradient w.r.t. the chunk gates L
        rev = scan_time(dg.view(b, n, c, h), reverse=True)
        dlog_G = (rev + dLt.unsqueeze(2)).view(b, t, h)
    if has_state:
        return dQ, dK, dV, dlog_G, dS0, ds0
    return dQ, dK, dV, dlog_G, _empty(dev), _empty(dev)
