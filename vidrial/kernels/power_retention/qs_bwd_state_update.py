"""query_state_bwd's state pass, on the forward update_state kernel (the only implementation: 1.21 ms
vs 21.4 ms for the retired row-loop state kernel at shape A on the H200, docs/PERF_NOTES.md).
CPU-verified against the float64 emulation and autograd (tests/test_qs_bwd_state_update_cpu.py),
GPU-verified on the H200 (tests/gpu/test_backward_gpu.py). update_state is dispatched with its own key
(ungated, chunk r*c) and its own tuned configs.

The state pass computes, per batch, KV head and chunk nu, summed over the chunk's c rows and the r
query heads of the KV head (reference.backward.qs_bwd_state):

    dSbar_nu = s^p sum_rows phi(qh) dAh^T,   dsbar_nu = s^p sum_rows phi(qh) dBh,   qh = q * qscale

phi is homogeneous of degree p, so s^p phi(qh) = phi(s qh): dSbar is update_state's S for the keys
K' = s q qscale and the values V' = dAh, without gating, when the r*c rows of one (chunk, KV head)
form one update_state chunk. K' and V' are written once, in bf16, as [b, h, n, r, c, d] and passed as
the strided view [b, n*r*c, h, d] (time stride d, head stride n*r*c*d): chunk nu of KV head h is then
one contiguous block of its r*c rows (update_state takes any batch/time/head strides).

dsbar has signed row weights dBh: update_state's s is unweighted and V' has no free column. It comes
from the weighted moments of the same bf16 K' instead (weighted_feature_sums): one fp32 batched GEMM
of d^(p/2) x d^(p/2) per (chunk, KV head), for p = 2 a 2/d fraction of the main GEMM's FLOPs
(d=64: 3%), on fp32 (not bf16) operands because it is cheap and sbar is fp32 in the forward too.
For p = 4 (a d^2 x d^2 GEMM, ~10% of the fwd+bwd in fp32) it runs on tensor cores as three bf16
GEMMs of hi/lo halves (split_bf16_gram: ~2^-16 relative error, fp32 accumulation).

Precision: K' and V' are bf16 (relative rounding 2^-9) and update_state forms phi(K') with bf16
multiplies (p - 1 more roundings), fp32 accumulation; fp16 inputs also go through bf16 (fp32's
exponent range: dAh = dY / Den is unbounded in fp16 terms). This is the precision the forward
already uses for phi(k~) v^T and for the bf16 copy of Sbar it feeds to query_state, so the gradients
move by the same relative amount as Y does. Measured on the CPU with a bf16-faithful emulation of
update_state (tests/test_qs_bwd_state_update_cpu.py): dSbar/dsbar within 2-6e-3 (norm-relative) of
float64, the full gradients within 1e-4..5e-3 of float64 autograd (p = 4 the largest), against the
2e-2 tolerance of the fwd+bwd GPU tests. The reverse scan (discumsum_bwd) adds chunks' independent
errors, so the relative error does not grow with t.
"""
from __future__ import annotations

from typing import Any

from vidrial.core.errors import InputError
from vidrial.kernels.power_retention.update_state import HEAD_DIMS, UpdateStateConfig, update_state

__all__ = ["check_supported", "state_pass_inputs", "weighted_feature_sums", "split_bf16_gram", "state_pass_update_state"]

# fp32 elements of Z and M per batch of (chunk, KV head) pairs in weighted_feature_sums: its
# temporaries stay at a few hundred MB whatever the problem size (shape A: three batches).
MOMENT_ELEMS = 1 << 24


def check_supported(head_dim: int, r: int, chunk_size: int) -> None:
    """Raises InputError unless update_state can run the state pass of this problem."""
    if head_dim not in HEAD_DIMS:
        raise InputError("Q", f"head_dim {head_dim}", f"head_dim in {HEAD_DIMS} (update_state's head dims, which "
                                                      "run the state pass)")
    if (r * chunk_size) % 16:
        raise InputError("chunk_size", chunk_size, f"(query heads per KV head) * chunk_size a multiple of 16 (one "
                                                   f"update_state chunk per chunk and KV head); got {r} * {chunk_size}")


def _rows_by_kv_head(x, b: int, n: int, c: int, h: int, r: int):
    """[b, t, hq, ...] -> view [b, n, c, h, r, ...] (query head = KV head * r + j)."""
    return x.view(b, n, c, h, r, *x.shape[3:])


def state_pass_inputs(Q, qscale, dAh, h: int, *, scale: float, chunk_size: int):
    """update_state's inputs (K', V'): bf16 [b, n*r*c, h, d] views of [b, h, n, r, c, d] buffers with
    K' = s * Q * qscale, V' = dAh. Q, dAh [b,t,hq,d], qscale [b,t,hq] (t a multiple of chunk_size).
    One elementwise pass each (fp32 math, bf16 store)."""
    import torch

    b, t, hq, d = Q.shape
    c = int(chunk_size)
    n, r = t // c, hq // h
    to_rows = (0, 2, 4, 1, 3, 5)  # [b, h, n, r, c, d] buffer seen as [b, n, c, h, r, d]
    Kb = torch.empty(b, h, n, r, c, d, device=Q.device, dtype=torch.bfloat16)
    Vb = torch.empty_like(Kb)
    w = _rows_by_kv_head(qscale * scale, b, n, c, h, r).unsqueeze(-1)
    torch.mul(_rows_by_kv_head(Q, b, n, c, h, r), w, out=Kb.permute(to_rows))
    Vb.permute(to_rows).copy_(_rows_by_kv_head(dAh, b, n, c, h, r))
    return (Kb.view(b, h, n * r * c, d).transpose(1, 2), Vb.view(b, h, n * r * c, d).transpose(1, 2))


_INDEX: dict[tuple[int, int, int, Any], Any] = {}


def _moment_index(d: int, deg: int, d_tile: int, device):
    """(flat index into M [d^(p/2), d^(p/2)] of each feature, fp32 coefficient) in sympow order."""
    key = (d, deg, d_tile, device)
    if key not in _INDEX:
        from vidrial.kernels.power_retention.sympow import layout

        idx, coef = layout(d, deg, d_tile).feature_indices()
        half = deg // 2
        a = b = 0
        for j in range(half):
            a = a * d + idx[:, j]
            b = b * d + idx[:, half + j]
        _INDEX[key] = ((a * d**half + b).to(device), coef.float().to(device))
    return _INDEX[key]


def weighted_feature_sums(X, w, *, deg: int, d_tile: int):
    """sum_R w phi(X) [m, D] fp32 for X [m, R, d], w [m, R] (any signs), without forming phi:
    phi(x)[f] = coef_f prod_j x[idx_fj] = coef_f Z(x)[a_f] Z(x)[b_f] with Z(x) = x^{(x) p/2} (d^(p/2)
    entries), so the sum is coef_f M[a_f, b_f], M = Z^T diag(w) Z (fp32 batched GEMM)."""
    import torch

    m, R, d = X.shape
    half = deg // 2
    flat, coef = _moment_index(d, deg, d_tile, X.device)
    out = torch.empty(m, flat.numel(), device=X.device, dtype=torch.float32)
    step = max(1, MOMENT_ELEMS // (R * d**half + d ** (2 * half)))
    for i in range(0, m, step):
        x = X[i:i + step].float()
        Z = x
        for _ in range(half - 1):
            Z = (Z.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
        W = Z * w[i:i + step].unsqueeze(-1).float()
        M = split_bf16_gram(Z, W) if half >= 2 and Z.is_cuda else Z.transpose(1, 2) @ W
        torch.mul(M.flatten(1)[:, flat], coef, out=out[i:i + step])
    return out


def _bmm_bf16_fp32(a, b):
    """a @ b for bf16 a, b with fp32 accumulation and output (tensor cores on CUDA)."""
    import torch

    if a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError):  # a torch without bmm(out_dtype=): the fp32 GEMM below
            pass
    return torch.bmm(a.float(), b.float())


def split_bf16_gram(Z, W):
    """Z^T W [m, a, a] (fp32) for fp32 Z, W [m, R, a] from three bf16 GEMMs on hi/lo halves,
    Z^T W ~ Zh^T Wh + Zh^T Wl + Zl^T Wh (Zl^T Wl, ~2^-16 of the result, is dropped). For p = 4 the
    moment GEMM is a 1024 x 1024 x (r c) product per (chunk, KV head), ~10% of the whole fwd+bwd
    on fp32 CUDA cores; the three bf16 GEMMs take a quarter of that time (H200, d=32: 21.7 -> 5.6 ms;
    the halves and sums add ~7 ms of elementwise passes) at ~2^-16 relative error (Z = x (x) x of
    bf16 x is exact in the two halves), far below the bf16 rounding of dSbar."""
    import torch

    def halves(x):
        hi = x.to(torch.bfloat16)
        return hi, torch.sub(x, hi, out=torch.empty_like(hi))  # fp32 difference, rounded once

    Zh, Zl = halves(Z)
    Wh, Wl = halves(W)
    ZhT = Zh.transpose(1, 2)
    M = _bmm_bf16_fp32(ZhT, Wh)
    M += _bmm_bf16_fp32(ZhT, Wl)
    M += _bmm_bf16_fp32(Zl.transpose(1, 2), Wh)
    return M


def state_pass_update_state(Q, qscale, dAh, dBh, h: int, *, deg: int, d_tile: int, scale: float, chunk_size: int,
                            config: UpdateStateConfig | None = None):
    """dSbar [b,n,h,D,d], dsbar [b,n,h,D] (fp32, contiguous: what query_state_bwd's state kernel
    writes) from the rows pass's Q [b,t,hq,d], qscale [b,t,hq], dAh [b,t,hq,d] and dBh [b,t,hq].
    config: update_state's (None: its dispatcher). Current stream, no host sync; the first call per
    layout and device copies a feature index table to the device (and update_state its block table):
    run once before capturing a CUDA graph."""
    b, t, hq, d = Q.shape
    c = int(chunk_size)
    n, r = t // c, hq // h
    check_supported(d, r, c)
    Kp, Vp = state_pass_inputs(Q, qscale, dAh, h, scale=scale, chunk_size=c)
    dSbar, _ = update_state(Kp, Vp, None, deg=deg, d_tile=d_tile, chunk_size=r * c, config=config)
    X = Kp.transpose(1, 2).reshape(b * h * n, r * c, d)  # a view: the [b, h, n, r, c, d] buffer
    w = _rows_by_kv_head(dBh, b, n, c, h, r).permute(0, 3, 1, 4, 2).reshape(b * h * n, r * c)
    ds = weighted_feature_sums(X, w, deg=deg, d_tile=d_tile)
    dsbar = ds.view(b, h, n, -1).transpose(1, 2).contiguous()
    return dSbar, dsbar
