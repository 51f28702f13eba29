"""Float64 torch emulation of the backward kernels' algorithms (docs/MATH.md section 4).

Each function here mirrors one CUDA backward kernel step by step (same intermediate quantities,
same stabiliser, same order of reductions up to summation order), in float64 on any device. The
CPU test tests/test_backward_math_cpu.py checks the composition against float64 autograd through
``reference.power_retention_reference``; the GPU tests compare each kernel with its emulation.

Notation (per batch, KV head h, query head i -> KV head i // r, chunk nu of c steps):

    g[tau]   cumulative log gate inside the chunk,  L_nu = g[c-1]
    k~ = k exp((L - g)/p),   phi(k~) = phi(k) exp(L - g)             (update_state)
    q~ = q exp(g/p)                                                 (query_state, unscaled)
    A = s^p phi(q~).Sbar_nu,  B = s^p phi(q~).sbar_nu
    Y = (O e^m + A) / (l e^m + B)           (O, l, m: intra-chunk attention, merge mode)

Row stabiliser (any value cancels; this one never overflows): M = max(m, log B), and with
``qh = q exp((g - M)/p)`` (so phi(qh) = phi(q~) e^-M), ``Ah = A e^-M``, ``Bh = B e^-M``:

    Den = l e^(m-M) + Bh,   dAh = dY / Den,   dBh = -(dY.Y) / Den
    dO  = dAh e^(m-M),      dl  = dBh e^(m-M)          (gradient w.r.t. the shifted O, l)
    dphi(qh) = s^p (Sbar dAh + sbar dBh),  dq = chain(qh, dphi) exp((g-M)/p)
    dg_row   = phi(qh).dphi(qh) + dO.O + dl (l - 1e-6)       (gate: both halves are prop. to e^g_i)
    dSbar_nu = s^p sum_rows phi(qh) dAh^T,   dsbar_nu = s^p sum_rows phi(qh) dBh

discumsum (reverse scan, acc = dSbar_n = gradient of the final state or 0):
    dS_nu = acc;  dL_nu = e^L_nu (<Sbar_nu, acc> + <sbar_nu, acc_s>);  acc = dSbar_nu + e^L_nu acc
    d initial_state = acc after nu = 0.

update_state (per key row): dphi = dS_nu v + ds_nu, dv = phi(k~)^T dS_nu,
    dk = chain(k~, dphi) exp((L-g)/p),  e = phi(k~).dphi  ->  dg -= e, dL += e.

intra-chunk attention (flash style, m treated as a constant: O e^m and l e^m do not depend on it):
    x = s q_i.k_j, w = (|x| + 1e-7)^p e^(g_i - g_j), P = w e^-m_i, dP = dO_i.v_j + dl_i
    dv_j += P dO_i,  dx = p sign(x) (|x|+1e-7)^(p-1) e^(g_i-g_j-m_i) dP,
    dq_i += s dx k_j,  dk_j += s dx q_i,  dg_j -= P dP  (the row part is in dg_row above)

log_G: dlog_G[sigma] = sum_{tau >= sigma in its chunk} dg[tau] + dL_nu.
"""
from __future__ import annotations

import math

import torch

from vidrial.reference.forward import (
    LOG_EPS,
    DENOM_EPS,
    discumsum_reference,
    phi,
    update_state_reference,
)
from vidrial.kernels.power_retention.sympow import default_d_tile, layout

__all__ = ["sympow_chain", "qs_bwd_rows", "qs_bwd_rows_mma16", "qs_bwd_state", "discumsum_bwd", "update_state_bwd",
           "intra_bwd", "forward_pieces", "emulate_backward", "dlog_G_from_dg"]

_F64 = torch.float64
EPS = LOG_EPS          # the forward kernels' weight guard: w = (|x| + 1e-7)^p
D_EPS = DENOM_EPS      # the forward kernels' l guard


def sympow_chain(x, dphi, deg, d_tile):
    """d/dx of sum_f dphi_f phi_f(x) for x [..., d], dphi [..., D]: for feature f with factor
    indices idx[f, :] and coefficient c_f, d/dx[idx_j] += dphi_f c_f prod_{l != j} x[idx_l]."""
    idx, coef = layout(x.shape[-1], deg, d_tile).feature_indices()
    idx, coef = idx.to(x.device), coef.to(x.device, _F64)
    out = torch.zeros_like(x, dtype=_F64)
    fac = [x[..., idx[:, k]] for k in range(deg)]
    for j in range(deg):
        prod = dphi * coef
        for k in range(deg):
            if k != j:
                prod = prod * fac[k]
        out.index_add_(-1, idx[:, j], prod)
    return out


def _rep(x, r, dim):
    return x if r == 1 else x.repeat_interleave(r, dim=dim)


def qs_bwd_rows(Q, g, Sbar, sbar, O, l, m, Y, dY, deg, d_tile, scale, c):
    """Row pass of the query_state backward. Q,O,Y,dY [b,t,hq,d]; g [b,t,h] chunk-local cumsum;
    Sbar [b,n,h,D,d], sbar [b,n,h,D] (states at the start of each chunk); l, m [b,t,hq].
    Returns dq [b,t,hq,d], dO, dl, dAh, dBh, qscale [b,t,hq], dg_row [b,t,hq]."""
    b, t, hq, d = Q.shape
    h = Sbar.shape[2]
    r = hq // h
    n = t // c
    sp = scale**deg
    gq = _rep(g, r, 2)  # [b,t,hq]
    qg = Q * torch.exp(gq / deg).unsqueeze(-1)
    D = sbar.shape[-1]
    # rows as [b, n, c, h, r, ...] (query head = kv head * r + j): no per-row copies of the state
    B = sp * torch.einsum("bnchrD,bnhD->bnchr", phi(qg, deg, d_tile).reshape(b, n, c, h, r, D), sbar)
    B = B.reshape(b, t, hq)
    logB = torch.log(B.clamp_min(1e-300)).where(B > 0, torch.full_like(B, -math.inf))
    M = torch.maximum(m, logB)
    em = torch.exp(m - M)
    Den = l * em + B * torch.exp(-M)
    inv = 1.0 / Den
    dAh = dY * inv.unsqueeze(-1)
    dBh = -(dY * Y).sum(-1) * inv
    dO = dAh * em.unsqueeze(-1)
    dl = dBh * em
    qscale = torch.exp((gq - M) / deg)
    qh = Q * qscale.unsqueeze(-1)
    ph = phi(qh, deg, d_tile)
    dphi = sp * (torch.einsum("bnhDe,bnchre->bnchrD", Sbar, dAh.reshape(b, n, c, h, r, d))
                 + sbar[:, :, None, :, None, :] * dBh.reshape(b, n, c, h, r, 1))
    dphi = dphi.reshape(b, t, hq, D)
    dq = sympow_chain(qh, dphi, deg, d_tile) * qscale.unsqueeze(-1)
    dg_row = (ph * dphi).sum(-1) + (dO * O).sum(-1) + dl * (l - D_EPS)
    return dq, dO, dl, dAh, dBh, qscale, dg_row


def qs_bwd_rows_mma16(Q, g, Sbar, sbar, O, l, m, Y, dY, deg, d_tile, scale, c):
    """The rows pass as the tensor-core kernel (impl="mma16", templates/query_state_bwd_mma16.cu.j2)
    computes it: one loop over the features with no row scalar known in advance. Since
    dAh = dY inv and dBh = -(dY.Y) inv share the row factor inv = 1/Den, and phi is homogeneous
    of degree p (q~ = q e^(g/p), qh = q e^((g-M)/p)):

        dphi' = Sbar dY - (dY.Y) sbar            (bf16 x bf16 GEMM, fp32; no B needed yet)
        u     = chain(q, dphi'),  Bq = phi(q).sbar  (raw q: the input itself, no exponentials)
        B = s^p e^g Bq,  fq = s^p inv e^(g-M):  dq = fq u,  phi(qh).dphi = fq (q.u) / p  (Euler)

    Same signature and outputs as qs_bwd_rows."""
    b, t, hq, d = Q.shape
    h = Sbar.shape[2]
    r, n = hq // h, t // c
    sp = scale**deg
    gq = _rep(g, r, 2)
    D = sbar.shape[-1]
    rows = lambda x: x.reshape(b, n, c, h, r, *x.shape[3:])  # noqa: E731
    yy = (dY * Y).sum(-1)
    dphi = (torch.einsum("bnhDe,bnchre->bnchrD", Sbar, rows(dY))
            - sbar[:, :, None, :, None, :] * rows(yy).unsqueeze(-1)).reshape(b, t, hq, D)
    u = sympow_chain(Q, dphi, deg, d_tile)
    Bq = torch.einsum("bnchrD,bnhD->bnchr", rows(phi(Q, deg, d_tile)), sbar).reshape(b, t, hq)
    B = sp * torch.exp(gq) * Bq
    logB = torch.log(B.clamp_min(1e-300)).where(B > 0, torch.full_like(B, -math.inf))
    M = torch.maximum(m, logB)
    em = torch.exp(m - M)
    inv = 1.0 / (l * em + B * torch.exp(-M))
    fq = sp * inv * torch.exp(gq - M)
    dBh = -yy * inv
    dl = dBh * em
    dAh = dY * inv.unsqueeze(-1)
    dO = dAh * em.unsqueeze(-1)
    dg = fq * (Q * u).sum(-1) / deg + em * inv * (dY * O).sum(-1) + dl * (l - D_EPS)
    return fq.unsqueeze(-1) * u, dO, dl, dAh, dBh, torch.exp((gq - M) / deg), dg


def qs_bwd_state(Q, qscale, dAh, dBh, h, deg, d_tile, scale, c):
    """State pass: dSbar [b,n,h,D,d], dsbar [b,n,h,D] (gradient w.r.t. the state at the start of
    each chunk), summed over the r query heads of each KV head and the rows of the chunk."""
    b, t, hq, d = Q.shape
    r, n = hq // h, t // c
    sp = scale**deg
    ph = phi(Q * qscale.unsqueeze(-1), deg, d_tile)  # [b,t,hq,D]
    ph = ph.reshape(b, n, c, h, r, -1)
    dS = sp * torch.einsum("bnchrD,bnchre->bnhDe", ph, dAh.reshape(b, n, c, h, r, d))
    ds = sp * torch.einsum("bnchrD,bnchr->bnhD", ph, dBh.reshape(b, n, c, h, r))
    return dS, ds


def discumsum_bwd(dSbar, dsbar, Sbar, sbar, L, dS_final=None, ds_final=None):
    """dSbar [b,n,h,D,d] / dsbar [b,n,h,D]: gradients w.r.t. Sbar_0..Sbar_{n-1}; Sbar, sbar the
    forward states (index nu = start of chunk nu); L [b,n,h] or None. Returns
    dS [b,n,h,D,d], ds [b,n,h,D], dL [b,n,h], d_init [b,h,D,d], d_sum_of_keys [b,h,D]."""
    b, n, h, D, d = dSbar.shape
    acc = dS_final.clone() if dS_final is not None else dSbar.new_zeros(b, h, D, d)
    acc_s = ds_final.clone() if ds_final is not None else dsbar.new_zeros(b, h, D)
    dS, ds = torch.empty_like(dSbar), torch.empty_like(dsbar)
    dL = dSbar.new_zeros(b, n, h)
    for nu in range(n - 1, -1, -1):
        dS[:, nu], ds[:, nu] = acc, acc_s
        gate = torch.exp(L[:, nu]) if L is not None else torch.ones(b, h, dtype=dSbar.dtype, device=dSbar.device)
        dL[:, nu] = gate * ((Sbar[:, nu] * acc).sum((-1, -2)) + (sbar[:, nu] * acc_s).sum(-1))
        acc = dSbar[:, nu] + gate[..., None, None] * acc
        acc_s = dsbar[:, nu] + gate[..., None] * acc_s
    return dS, ds, dL, acc, acc_s


def update_state_bwd(K, V, g, dS, ds, deg, d_tile, c):
    """K, V [b,t,h,d], g [b,t,h] chunk-local cumsum or None, dS [b,n,h,D,d], ds [b,n,h,D].
    Returns dK, dV [b,t,h,d] and e [b,t,h] = phi(k~).dphi (gate: dg -= e, dL_nu += sum e)."""
    b, t, h, d = K.shape
    n = t // c
    if g is not None:
        L = g.reshape(b, n, c, h)[:, :, -1:].expand(b, n, c, h).reshape(b, t, h)
        kscale = torch.exp((L - g) / deg)
    else:
        kscale = torch.ones(b, t, h, dtype=_F64, device=K.device)
    kt = K * kscale.unsqueeze(-1)
    pk = phi(kt, deg, d_tile)  # emulation only; the kernel forms it tile by tile
    D = ds.shape[-1]
    pkc = pk.reshape(b, n, c, h, D)
    dphi = (torch.einsum("bnhDe,bnche->bnchD", dS, V.reshape(b, n, c, h, d)) + ds[:, :, None]).reshape(b, t, h, D)
    dV = torch.einsum("bnchD,bnhDe->bnche", pkc, dS).reshape(b, t, h, d)
    dK = sympow_chain(kt, dphi, deg, d_tile) * kscale.unsqueeze(-1)
    e = (pk * dphi).sum(-1)
    return dK, dV, e


def _round_bf16(x):
    return x.to(torch.bfloat16).to(x.dtype)


def intra_bwd(Q, K, V, g, m, dO, dl, deg, scale, c, bf16_operands: bool = False, want_dgrow: bool = False,
              in_dtype=torch.bfloat16):
    """Flash-style intra-chunk backward. Q, dO [b,t,hq,d], K, V [b,t,h,d], g [b,t,h] chunk-local
    cumsum or None, m, dl [b,t,hq]. Returns dQ [b,t,hq,d], dK, dV [b,t,h,d], dg_col [b,t,h]
    (+ dg_row [b,t,hq] = sum_j P dP with want_dgrow).
    bf16_operands: what impl="flash" feeds its tensor cores when its launcher has dO alone (flash_dO_operands'
    fallback): dO = alpha dY with alpha = max |dO_i| and dY rounded to `in_dtype`; S = Q K^T and dP = dY V^T
    on the inputs as given; P alpha, s*dx rounded to bf16 and Q, K, dY rounded to bf16 before the second
    GEMMs; so that the emulation matches that kernel up to fp32 accumulation."""
    R = _round_bf16 if bf16_operands else (lambda x: x)
    alpha = torch.ones_like(dO[..., :1])
    if bf16_operands:
        amax = dO.abs().amax(-1, keepdim=True)
        alpha = torch.where(amax > 0, amax, torch.ones_like(amax))
        dO = alpha * (dO / alpha).to(in_dtype).to(dO.dtype)
    Vr = V
    b, t, hq, d = Q.shape
    h = K.shape[2]
    r, n = hq // h, t // c
    Qc = Q.reshape(b, n, c, hq, d).permute(0, 1, 3, 2, 4)  # [b,n,hq,c,d]
    Kc = _rep(K, r, 2).reshape(b, n, c, hq, d).permute(0, 1, 3, 2, 4)
    Vc = _rep(Vr, r, 2).reshape(b, n, c, hq, d).permute(0, 1, 3, 2, 4)
    dOc = dO.reshape(b, n, c, hq, d).permute(0, 1, 3, 2, 4)
    alc = alpha.reshape(b, n, c, hq, 1).permute(0, 1, 3, 2, 4)  # [b,n,hq,c,1]
    mc = m.reshape(b, n, c, hq).permute(0, 1, 3, 2)
    dlc = dl.reshape(b, n, c, hq).permute(0, 1, 3, 2)
    if g is not None:
        gc = _rep(g, r, 2).reshape(b, n, c, hq).permute(0, 1, 3, 2)
        gd = gc.unsqueeze(-1) - gc.unsqueeze(-2)
    else:
        gd = torch.zeros(1, dtype=_F64, device=Q.device)
    x = scale * Qc @ Kc.transpose(-1, -2)
    ax = x.abs() + EPS
    mask = torch.ones(c, c, dtype=torch.bool, device=Q.device).tril()
    E = torch.exp(gd - mc.unsqueeze(-1)).masked_fill(~mask, 0.0)
    P = ax**deg * E
    dP = dOc @ Vc.transpose(-1, -2) + dlc.unsqueeze(-1)
    dx = deg * torch.sign(x) * ax ** (deg - 1) * E * dP
    ds, Pm = scale * dx, P
    if bf16_operands:
        ds = _round_bf16(ds)
    dQ = ds @ R(Kc)
    dKr = ds.transpose(-1, -2) @ R(Qc)
    dVr = R(Pm * alc).transpose(-1, -2) @ R(dOc / alc)
    col = (P * dP).sum(-2)  # [b,n,hq,c]

    def back(x, last):
        x = x.permute(0, 1, 3, 2, *([4] if last else [])).reshape(b, t, hq, *([d] if last else []))
        return x

    dQ = back(dQ, True)
    dK = back(dKr, True).reshape(b, t, h, r, d).sum(3)
    dV = back(dVr, True).reshape(b, t, h, r, d).sum(3)
    dg_col = -back(col, False).reshape(b, t, h, r).sum(3)
    if want_dgrow:
        return dQ, dK, dV, dg_col, back((P * dP).sum(-1), False)
    return dQ, dK, dV, dg_col


def dlog_G_from_dg(dg, dL, c):
    """dg [b,t,h] (gradient w.r.t. the chunk-local cumsum g), dL [b,n,h] -> dlog_G [b,t,h]."""
    b, t, h = dg.shape
    n = t // c
    x = dg.reshape(b, n, c, h)
    rev = x.flip(2).cumsum(2).flip(2)
    return (rev + dL.unsqueeze(2)).reshape(b, t, h)


def forward_pieces(Q, K, V, log_G, deg, scale, c, d_tile, initial_state=None, sum_of_keys=None):
    """Float64 forward on padded inputs (t a multiple of c), keeping what the backward uses."""
    from vidrial.reference.forward import intra_chunk_attention_reference

    b, t, hq, d = Q.shape
    h = K.shape[2]
    r, n = hq // h, t // c
    Q, K, V = Q.to(_F64), K.to(_F64), V.to(_F64)
    g = log_G.to(_F64).reshape(b, n, c, h).cumsum(2).reshape(b, t, h) if log_G is not None else None
    L = g.reshape(b, n, c, h)[:, :, -1] if g is not None else None
    S, s = update_state_reference(K, V, log_G, deg, d_tile, c)
    Sbar, sbar = discumsum_reference(S, s, L, initial_state, sum_of_keys)
    O, l, m = intra_chunk_attention_reference(Q, K, V, log_G, deg, scale, c)
    gq = _rep(g, r, 2) if g is not None else torch.zeros(b, t, hq, dtype=_F64)
    qg = Q * torch.exp(gq / deg).unsqueeze(-1)
    ph = phi(qg, deg, d_tile)
    D = ph.shape[-1]
    ph = ph.reshape(b, n, c, h, r, D)
    sp = scale**deg
    A = sp * torch.einsum("bnchrD,bnhDe->bnchre", ph, Sbar[:, :n]).reshape(b, t, hq, d)
    B = sp * torch.einsum("bnchrD,bnhD->bnchr", ph, sbar[:, :n]).reshape(b, t, hq)
    Y = (O * torch.exp(m).unsqueeze(-1) + A) / (l * torch.exp(m) + B).unsqueeze(-1)
    return dict(g=g, L=L, Sbar=Sbar, sbar=sbar, O=O, l=l, m=m, Y=Y)


def emulate_backward(Q, K, V, log_G, dY, deg=2, scale=None, chunk_size=64, d_tile=None, initial_state=None,
                     sum_of_keys=None, dS_final=None, ds_final=None):
    """The full chunked backward, composed of the per-kernel emulations (t a multiple of c).
    Returns dict dQ, dK, dV, dlog_G (or None), d_initial_state, d_sum_of_keys (or None)."""
    b, t, hq, d = Q.shape
    h = K.shape[2]
    c = chunk_size
    n = t // c
    scale = 1.0 / math.sqrt(d) if not scale else float(scale)
    d_tile = default_d_tile(d, deg) if d_tile is None else d_tile
    f = forward_pieces(Q, K, V, log_G, deg, scale, c, d_tile, initial_state, sum_of_keys)
    Q, K, V, dY = Q.to(_F64), K.to(_F64), V.to(_F64), dY.to(_F64)
    g = f["g"] if f["g"] is not None else torch.zeros(b, t, h, dtype=_F64)
    dq_s, dO, dl, dAh, dBh, qscale, dg_row = qs_bwd_rows(Q, g, f["Sbar"][:, :n], f["sbar"][:, :n], f["O"], f["l"],
                                                          f["m"], f["Y"], dY, deg, d_tile, scale, c)
    dSbar, dsbar = qs_bwd_state(Q, qscale, dAh, dBh, h, deg, d_tile, scale, c)
    dS, ds, dL, dS0, ds0 = discumsum_bwd(dSbar, dsbar, f["Sbar"], f["sbar"], f["L"],
                                         None if dS_final is None else dS_final.to(_F64),
                                         None if ds_final is None else ds_final.to(_F64))
    dK_u, dV_u, e = update_state_bwd(K, V, f["g"], dS, ds, deg, d_tile, c)
    dQ_i, dK_i, dV_i, dg_col = intra_bwd(Q, K, V, f["g"], f["m"], dO, dl, deg, scale, c)
    out = dict(dQ=dq_s + dQ_i, dK=dK_u + dK_i, dV=dV_u + dV_i, dlog_G=None,
               d_initial_state=dS0 if initial_state is not None else None,
               d_sum_of_keys=ds0 if initial_state is not None else None)
    if log_G is not None:
        r = hq // h
        dg = dg_row.reshape(b, t, h, r).sum(3) + dg_col - e
        dLt = dL + e.reshape(b, n, c, h).sum(2)
        out["dlog_G"] = dlog_G_from_dg(dg, dLt, c)
    return out
