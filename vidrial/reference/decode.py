"""The decode kernel's algorithm (templates/decode_step.cu.j2) step by step in float64 torch.

The CPU tests prove the kernel's math with it before any GPU run: the same split of D into state
slices, the same cache tiles with their own max shift, the same gate bookkeeping and stabilised merge
(docs/MATH.md section 5). vidrial.reference.power_retention_inference_reference is the definition it
is checked against."""
from __future__ import annotations

import math

import torch

from vidrial.kernels.power_retention.sympow import default_d_tile, layout
from vidrial.reference.forward import phi

__all__ = ["emulate_decode_step"]


def emulate_decode_step(Q, K, V, log_G, state, sum_of_keys, *, deg: int, d_tile: int | None = None,
                        scale: float | None = None, tile_f: int = 256, cache_tile: int = 64):
    """The decode kernel's algorithm step by step in float64 torch: the same split of D into
    state slices of `tile_f` rows (ungated partial numerators/denominators), the same cache tiles
    of `cache_tile` tokens with their own max shift, the same gate bookkeeping (G_pos from a
    prefix sum) and the same stabilised merge. Used by the CPU tests to prove the math against
    the float64 reference before any GPU run. Returns Y float64 [b, tq, hq, d]."""
    f64 = torch.float64
    b, tq, hq, d = Q.shape
    L = 0 if K is None else K.shape[1]
    h = state.shape[1] if state is not None else K.shape[2]
    r = hq // h
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    if not scale:
        scale = 1.0 / math.sqrt(d)
    D = layout(d, deg, d_tile).feature_dim
    # rows of KV head hh: rho = i * r + gi  <->  Q[:, i, hh * r + gi]
    q = (scale * Q.to(f64)).reshape(b, tq, h, r, d).permute(0, 2, 1, 3, 4).reshape(b, h, tq * r, d)
    R = tq * r
    A = B = None
    if state is not None:
        S, z = state.to(f64), sum_of_keys.to(f64)
        pq = phi(q, deg, d_tile)  # [b, h, R, D]
        A = torch.zeros(b, h, R, d, dtype=f64, device=Q.device)
        B = torch.zeros(b, h, R, dtype=f64, device=Q.device)
        for f0 in range(0, D, tile_f):  # state CTAs, summed in order
            sl = slice(f0, min(D, f0 + tile_f))
            A = A + torch.einsum("bhrf,bhfe->bhre", pq[..., sl], S[:, :, sl])
            B = B + torch.einsum("bhrf,bhf->bhr", pq[..., sl], z[:, :, sl])
    if L == 0:
        Y = A / B[..., None]
    else:
        Kx, Vx = K.to(f64).permute(0, 2, 1, 3), V.to(f64).permute(0, 2, 1, 3)  # [b, h, L, d]
        G = log_G.to(f64).cumsum(1).permute(0, 2, 1) if log_G is not None else torch.zeros(b, h, L, dtype=f64)
        pos = torch.arange(tq).repeat_interleave(r) + (L - tq)  # [R] cache position of each row
        gq = G[:, :, pos]  # [b, h, R]
        parts = []
        for j0 in range(0, L, cache_tile):  # cache CTAs
            js = torch.arange(j0, min(L, j0 + cache_tile))
            x = torch.einsum("bhrd,bhjd->bhrj", q, Kx[:, :, js])
            a = deg * torch.log(x.abs() + 1e-7) + gq[..., None] - G[:, :, js][:, :, None, :]
            a = a.masked_fill(js[None, :] > pos[:, None], float("-inf"))
            m = a.amax(-1)
            w = torch.where(torch.isinf(m)[..., None], torch.zeros_like(a), torch.exp(a - m[..., None]))
            parts.append((w @ Vx[:, :, js], w.sum(-1), m))
        m = torch.stack([p[2] for p in parts]).amax(0)
        def rescale(mc, M):
            return torch.where(torch.isinf(mc), torch.zeros_like(mc), torch.exp(mc - M))
        l = sum(p[1] * rescale(p[2], m) for p in parts) + 1e-6
        if state is None:
            M, den, eA = m, l, None
        else:
            logB = torch.log(B.clamp_min(1e-30)) + gq
            M = torch.maximum(m, logB)
            eA = torch.exp(gq - M)
            den = l * torch.exp(m - M) + B * eA
        num = sum(p[0] * rescale(p[2], M)[..., None] for p in parts)
        if state is not None:
            num = num + A * eA[..., None]
        Y = num / den[..., None]
    return Y.reshape(b, h, tq, r, d).permute(0, 2, 1, 3, 4).reshape(b, tq, hq, d)
