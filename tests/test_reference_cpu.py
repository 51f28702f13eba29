"""CPU tests of the float64 references (vidrial/reference/forward.py).

Every check compares against an independent computation written here (a feature map built from
the sympow docstring, the recurrent view of docs/MATH.md section 1 as a loop over time, closed forms for
the chunk sums), never against the same code path. Inputs are fresh random tensors (seeded
torch.Generator), gates are logsigmoid of random numbers (never zeros).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from vidrial.core.errors import InputError
from vidrial.reference import forward as ref
from vidrial.kernels.power_retention.sympow import feature_dim

F64 = torch.float64
EXACT = dict(log_eps=0.0, denom_eps=0.0)  # guards off: float64 rounding is the only difference
# phi(q).phi(k) sums D products to get (q.k)^p, so a row whose only weight is tiny loses relative
# digits to cancellation; 1e-8 is still orders of magnitude below any real bug.
TIGHT = dict(rtol=1e-8, atol=1e-8)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(g, *shape, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _inputs(seed, b=2, t=9, h=2, r=1, d=4, gating=True):
    g = _gen(seed)
    Q = _rand(g, b, t, h * r, d)
    K = _rand(g, b, t, h, d)
    V = _rand(g, b, t, h, d)
    log_G = torch.nn.functional.logsigmoid(_rand(g, b, t, h) + 1.0) if gating else None
    return Q, K, V, log_G


def _divisors(d):
    return [T for T in range(1, d + 1) if d % T == 0]


# ---------------------------------------------------------------------------------------------
# independent implementations
# ---------------------------------------------------------------------------------------------

def _phi_indep(x, p, T):
    """phi built from the sympow.py docstring: blocks in combinations_with_replacement order,
    sqrt(p!/prod mult!) times the row-major outer product of the tiles."""
    d = x.shape[-1]
    n = d // T
    tiles = [x[..., i * T:(i + 1) * T].to(F64) for i in range(n)]
    blocks = []
    for M in itertools.combinations_with_replacement(range(n), p):
        dup = math.factorial(p)
        for mult in Counter(M).values():
            dup //= math.factorial(mult)
        out = tiles[M[0]]
        for i in M[1:]:
            out = (out.unsqueeze(-1) * tiles[i].unsqueeze(-2)).flatten(-2)
        blocks.append(math.sqrt(dup) * out)
    return torch.cat(blocks, -1)


def _recurrent(Q, K, V, log_G, p, T, scale=None, S0=None, s0=None):
    """docs/MATH.md recurrent view, one step at a time: S_i = a_i S_{i-1} + phi(k_i) v_i^T,
    z_i = a_i z_{i-1} + phi(k_i), Y_i = phi(s q_i).S_i / phi(s q_i).z_i. Returns Y, S_t, z_t."""
    b, t, hq, d = Q.shape
    h = K.shape[2]
    r = hq // h
    s = 1 / math.sqrt(d) if not scale else scale
    D = feature_dim(d, p, T)
    S = S0.clone() if S0 is not None else torch.zeros(b, h, D, d, dtype=F64)
    z = s0.clone() if s0 is not None else torch.zeros(b, h, D, dtype=F64)
    Ys = []
    for i in range(t):
        if log_G is not None:
            a = torch.exp(log_G[:, i])  # [b, h]
            S, z = a[..., None, None] * S, a[..., None] * z
        pk = _phi_indep(K[:, i], p, T)  # [b, h, D]
        S = S + pk.unsqueeze(-1) * V[:, i].unsqueeze(-2)
        z = z + pk
        pq = _phi_indep(s * Q[:, i], p, T)  # [b, hq, D]
        head = torch.arange(hq) // r
        num = torch.einsum("bhD,bhDe->bhe", pq, S[:, head])
        den = torch.einsum("bhD,bhD->bh", pq, z[:, head])
        Ys.append(num / den.unsqueeze(-1))
    return torch.stack(Ys, 1), S, z


def _prefix_state(seed, b, h, d, p, T, t0=6):
    """A legitimate state: the recurrent state after a random prefix (returned with the prefix)."""
    Qp, Kp, Vp, Gp = _inputs(seed, b=b, t=t0, h=h, d=d)
    _, S0, s0 = _recurrent(Qp[:, :, :h], Kp, Vp, Gp, p, T)
    return S0, s0, (Kp, Vp, Gp)


# ---------------------------------------------------------------------------------------------
# phi and D
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 6, 8])
def test_phi_inner_product_every_layout(d, p):
    g = _gen(100 + 10 * d + p)
    x, y = _rand(g, 3, d), _rand(g, 3, d)
    for T in _divisors(d):
        px, py = ref.phi(x, p, T), ref.phi(y, p, T)
        assert px.dtype == F64
        n = d // T
        D = math.comb(n + p - 1, p) * T**p
        assert px.shape == (3, D) == (3, feature_dim(d, p, T))
        torch.testing.assert_close((px * py).sum(-1), (x * y).sum(-1) ** p, rtol=1e-12, atol=1e-12)
        # THE order: identical, entry by entry, to the layout described in sympow.py
        torch.testing.assert_close(px, _phi_indep(x, p, T), rtol=0, atol=1e-14)


def test_phi_batched_shapes_and_dtype():
    g = _gen(7)
    x = _rand(g, 2, 3, 4, 8, dtype=torch.float32)
    out = ref.phi(x, 2, 4)
    assert out.shape == (2, 3, 4, feature_dim(8, 2, 4)) and out.dtype == F64
    torch.testing.assert_close(out, _phi_indep(x, 2, 4))


def test_feature_dim_formula_known_values():
    assert feature_dim(64, 2, 1) == math.comb(65, 2) == 2080
    assert feature_dim(64, 2, 8) == 2304
    assert feature_dim(64, 2, 16) == 2560
    assert feature_dim(8, 4, 1) == math.comb(11, 4)
    x = torch.ones(64, dtype=F64)
    for T, D in [(1, 2080), (8, 2304), (16, 2560)]:
        assert ref.phi(x, 2, T).shape[-1] == D


# ---------------------------------------------------------------------------------------------
# update_state and discumsum
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gating", [False, True])
@pytest.mark.parametrize("p,T", [(2, 1), (2, 2), (4, 2)])
def test_update_state_vs_direct_sum(gating, p, T):
    b, t, h, d, c = 2, 12, 2, 4, 4
    _, K, V, log_G = _inputs(11 + p + T, b=b, t=t, h=h, d=d, gating=gating)
    S, s = ref.update_state_reference(K, V, log_G, p, T, c)
    n = t // c
    D = feature_dim(d, p, T)
    assert S.shape == (b, n, h, D, d) and s.shape == (b, n, h, D) and S.dtype == F64
    for nu in range(n):
        S_ref = torch.zeros(b, h, D, d, dtype=F64)
        s_ref = torch.zeros(b, h, D, dtype=F64)
        for tau in range(c):
            i = nu * c + tau
            decay = torch.ones(b, h, dtype=F64)
            if gating:
                for k in range(i + 1, (nu + 1) * c):  # gates strictly after tau, up to the chunk end
                    decay = decay * torch.exp(log_G[:, k])
            pk = decay[..., None] * _phi_indep(K[:, i], p, T)
            S_ref += pk.unsqueeze(-1) * V[:, i].unsqueeze(-2)
            s_ref += pk
        torch.testing.assert_close(S[:, nu], S_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s[:, nu], s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("gating", [False, True])
def test_discumsum_vs_closed_form(with_initial, gating):
    g = _gen(21 + with_initial + 2 * gating)
    b, n, h, D, d = 2, 5, 3, 6, 4
    S, s = _rand(g, b, n, h, D, d), _rand(g, b, n, h, D)
    L = torch.nn.functional.logsigmoid(_rand(g, b, n, h)) if gating else None
    S0 = _rand(g, b, h, D, d) if with_initial else None
    s0 = _rand(g, b, h, D) if with_initial else None
    Sbar, sbar = ref.discumsum_reference(S, s, L, S0, s0)
    assert Sbar.shape == (b, n + 1, h, D, d) and sbar.shape == (b, n + 1, h, D)
    Lz = L if gating else torch.zeros(b, n, h, dtype=F64)
    for nu in range(n + 1):
        # Sbar_nu = exp(sum_{k<nu} L_k) S0 + sum_{mu<nu} exp(sum_{mu<k<nu} L_k) S_mu
        want_S = torch.zeros(b, h, D, d, dtype=F64)
        want_s = torch.zeros(b, h, D, dtype=F64)
        if with_initial:
            w = torch.exp(Lz[:, :nu].sum(1))
            want_S += w[..., None, None] * S0
            want_s += w[..., None] * s0
        for mu in range(nu):
            w = torch.exp(Lz[:, mu + 1:nu].sum(1))
            want_S += w[..., None, None] * S[:, mu]
            want_s += w[..., None] * s[:, mu]
        torch.testing.assert_close(Sbar[:, nu], want_S, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sbar[:, nu], want_s, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# quadratic formula == recurrent view
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("gating", [False, True])
def test_recurrent_view_equals_quadratic(p, r, gating):
    Q, K, V, log_G = _inputs(31 + p + r + gating, b=2, t=7, h=2, r=r, d=4, gating=gating)
    Y_rec, _, _ = _recurrent(Q, K, V, log_G, p, 1)
    Y = ref.attention_reference(Q, K, V, log_G, deg=p, **EXACT)
    assert Y.shape == Q.shape and Y.dtype == F64
    torch.testing.assert_close(Y, Y_rec, **TIGHT)
    # default guards: a perturbation far below bf16 resolution
    Yg = ref.attention_reference(Q, K, V, log_G, deg=p)
    torch.testing.assert_close(Yg, Y_rec, rtol=1e-4, atol=1e-4)


def test_attention_guards_handle_zero_rows_and_dtype():
    Q, K, V, log_G = _inputs(41, b=1, t=5, h=1, d=4)
    Q[:, 2] = 0.0  # an all-zero query row: no -inf/NaN, with or without guards
    for kw in ({}, EXACT):
        Y = ref.attention_reference(Q, K, V, log_G, deg=2, **kw)
        assert torch.isfinite(Y).all()
    Yb = ref.attention_reference(Q.bfloat16(), K.bfloat16(), V.bfloat16(), log_G.float(), deg=2)
    assert Yb.dtype == F64 and torch.isfinite(Yb).all()


def test_scale_semantics():
    Q, K, V, log_G = _inputs(43, b=1, t=6, h=2, r=2, d=4)
    d = Q.shape[-1]
    Y_none = ref.attention_reference(Q, K, V, log_G, 2, None)
    torch.testing.assert_close(ref.attention_reference(Q, K, V, log_G, 2, 0), Y_none, rtol=0, atol=0)
    torch.testing.assert_close(ref.attention_reference(Q, K, V, log_G, 2, 1 / math.sqrt(d)), Y_none, rtol=0, atol=0)
    # the normalised output does not depend on the scale; the row shift moves by p*log(scale ratio)
    Y_a = ref.attention_reference(Q, K, V, log_G, 2, 0.3, **EXACT)
    Y_b = ref.attention_reference(Q, K, V, log_G, 2, 1.7, **EXACT)
    torch.testing.assert_close(Y_a, Y_b, rtol=1e-12, atol=1e-12)
    _, _, m_a = ref.intra_chunk_attention_reference(Q, K, V, log_G, 2, 0.3, 3, **EXACT)
    _, _, m_b = ref.intra_chunk_attention_reference(Q, K, V, log_G, 2, 1.7, 3, **EXACT)
    torch.testing.assert_close(m_b - m_a, torch.full_like(m_a, 2 * math.log(1.7 / 0.3)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# intra-chunk (O, l, m)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,c", [(8, 4), (7, 3), (5, 8)])
def test_intra_chunk_olm_definition(t, c):
    p, r, scale = 2, 2, 0.7
    Q, K, V, log_G = _inputs(51 + t + c, b=2, t=t, h=2, r=r, d=4)
    hq = Q.shape[2]
    head = torch.arange(hq) // r
    # raw weights w_ij = (s q_i.k_j)^p prod_{j<k<=i} G_k, same chunk and j <= i
    x = scale * torch.einsum("bihd,bjhd->bhij", Q, K[:, :, head])
    Gc = torch.cumsum(log_G, 1)[:, :, head].transpose(1, 2)  # [b, hq, t]
    pos = torch.arange(t)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] // c == pos[:, None] // c)
    w = torch.where(mask, x**p * torch.exp(Gc[..., :, None] - Gc[..., None, :]), torch.zeros(()))
    num = torch.einsum("bhij,bjhe->bihe", w, V[:, :, head])
    den = w.sum(-1).transpose(1, 2)
    logmax = torch.log(w.amax(-1)).transpose(1, 2)

    O, l, m = ref.intra_chunk_attention_reference(Q, K, V, log_G, p, scale, c, **EXACT)
    assert O.shape == Q.shape and l.shape == m.shape == Q.shape[:3]
    torch.testing.assert_close(m, logmax, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(O * torch.exp(m).unsqueeze(-1), num, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l * torch.exp(m), den, rtol=1e-10, atol=1e-12)

    # with the default guards: m is the max of p*log(|x| + 1e-7) + g_i - g_j, l >= 1 + 1e-6,
    # and O / l is the normalised attention restricted to the chunk
    Og, lg, mg = ref.intra_chunk_attention_reference(Q, K, V, log_G, p, scale, c)
    a = torch.where(mask, p * torch.log(x.abs() + ref.LOG_EPS) + Gc[..., :, None] - Gc[..., None, :],
                    torch.tensor(float("-inf"), dtype=F64))
    torch.testing.assert_close(mg, a.amax(-1).transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert (lg >= 1 + ref.DENOM_EPS - 1e-12).all()
    torch.testing.assert_close(Og / lg.unsqueeze(-1), num / den.unsqueeze(-1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# chunked == quadratic == recurrent
# ---------------------------------------------------------------------------------------------

CHUNK_CASES = [
    # t, c, r, gating, p
    (8, 4, 1, True, 2),
    (9, 4, 4, True, 2),
    (1, 4, 1, True, 2),
    (1, 1, 4, False, 2),
    (7, 3, 1, False, 2),
    (10, 5, 4, False, 4),
    (6, 8, 1, True, 4),
    (13, 2, 2, True, 2),
]


@pytest.mark.parametrize("t,c,r,gating,p", CHUNK_CASES)
def test_chunked_equals_quadratic(t, c, r, gating, p):
    Q, K, V, log_G = _inputs(61 + t + 7 * c + r + p, b=2, t=t, h=2, r=r, d=4, gating=gating)
    Y_quad = ref.attention_reference(Q, K, V, log_G, deg=p, **EXACT)
    Y = ref.power_retention_reference(Q, K, V, log_G, deg=p, chunk_size=c, **EXACT)
    assert Y.shape == Q.shape and Y.dtype == F64
    torch.testing.assert_close(Y, Y_quad, **TIGHT)
    Y_def = ref.power_retention_reference(Q, K, V, log_G, deg=p, chunk_size=c)  # default guards
    torch.testing.assert_close(Y_def, Y_quad, rtol=1e-4, atol=1e-4)
    Y_none = ref.power_retention_reference(Q, K, V, log_G, deg=p, chunk_size=None, **EXACT)
    torch.testing.assert_close(Y_none, Y_quad, rtol=0, atol=0)


@pytest.mark.parametrize("t,c,r,gating", [(9, 4, 1, True), (8, 4, 4, True), (1, 2, 2, True), (7, 3, 2, False)])
def test_initial_and_final_state_vs_recurrent(t, c, r, gating):
    b, h, d, p, T = 2, 2, 4, 2, 2
    Q, K, V, log_G = _inputs(71 + t + c + r, b=b, t=t, h=h, r=r, d=d, gating=gating)
    S0, s0, _ = _prefix_state(171 + t, b, h, d, p, T)
    Y_rec, S_rec, z_rec = _recurrent(Q, K, V, log_G, p, T, S0=S0, s0=s0)
    for chunk in (c, None):
        Y, S_f, s_f = ref.power_retention_reference(Q, K, V, log_G, S0, s0, return_final_state=True, deg=p,
                                                    chunk_size=chunk, d_tile=T, **EXACT)
        assert S_f.shape == (b, h, feature_dim(d, p, T), d) and s_f.shape == (b, h, feature_dim(d, p, T))
        torch.testing.assert_close(Y, Y_rec, **TIGHT)
        torch.testing.assert_close(S_f, S_rec, **TIGHT)
        torch.testing.assert_close(s_f, z_rec, **TIGHT)
    # without an initial state (chunked and quadratic paths)
    _, S_rec0, z_rec0 = _recurrent(Q, K, V, log_G, p, T)
    for chunk in (c, None):
        _, S_f, s_f = ref.power_retention_reference(Q, K, V, log_G, return_final_state=True, deg=p,
                                                    chunk_size=chunk, d_tile=T)
        torch.testing.assert_close(S_f, S_rec0, **TIGHT)
        torch.testing.assert_close(s_f, z_rec0, **TIGHT)


def test_initial_state_equals_running_the_prefix():
    """Splitting a sequence: state of the prefix + the rest == the whole sequence (quadratic)."""
    b, h, r, d, p, T = 1, 2, 2, 4, 2, 1
    Q, K, V, log_G = _inputs(81, b=b, t=11, h=h, r=r, d=d)
    cut = 5
    Y_full = ref.attention_reference(Q, K, V, log_G, deg=p, **EXACT)
    _, S0, s0 = ref.power_retention_reference(Q[:, :cut], K[:, :cut], V[:, :cut], log_G[:, :cut],
                                              return_final_state=True, deg=p, chunk_size=2, d_tile=T)
    Y_rest = ref.power_retention_reference(Q[:, cut:], K[:, cut:], V[:, cut:], log_G[:, cut:], S0, s0,
                                           deg=p, chunk_size=4, d_tile=T, **EXACT)
    torch.testing.assert_close(Y_rest, Y_full[:, cut:], **TIGHT)


@pytest.mark.parametrize("p,d", [(2, 8), (4, 4)])
def test_y_independent_of_d_tile(p, d):
    Q, K, V, log_G = _inputs(91 + p, b=1, t=7, h=2, r=2, d=d)
    g = _gen(92)
    q_probe = _rand(g, 1, 2, d)
    outs, probes = [], []
    for T in _divisors(d):
        Y, S_f, s_f = ref.power_retention_reference(Q, K, V, log_G, return_final_state=True, deg=p,
                                                    chunk_size=3, d_tile=T, **EXACT)
        outs.append(Y)
        pq = ref.phi(q_probe, p, T)  # layout-free readout of the state
        probes.append((torch.einsum("bhD,bhDe->bhe", pq, S_f), torch.einsum("bhD,bhD->bh", pq, s_f)))
    for Y, (a, z) in zip(outs[1:], probes[1:]):
        torch.testing.assert_close(Y, outs[0], **TIGHT)
        torch.testing.assert_close(a, probes[0][0], **TIGHT)
        torch.testing.assert_close(z, probes[0][1], **TIGHT)


def test_state_layout_mismatch_is_an_error():
    Q, K, V, log_G = _inputs(95, b=1, t=4, h=1, d=8)
    D8, D1 = feature_dim(8, 2, 8), feature_dim(8, 2, 1)
    S0, s0 = torch.zeros(1, 1, D8, 8, dtype=F64), torch.zeros(1, 1, D8, dtype=F64)
    with pytest.raises(InputError, match="d_tile"):
        ref.power_retention_reference(Q, K, V, log_G, S0, s0, deg=2, chunk_size=2, d_tile=1)
    assert D1 != D8
    with pytest.raises(InputError, match="sum_of_keys"):
        ref.power_retention_reference(Q, K, V, log_G, S0, None, deg=2, chunk_size=2, d_tile=8)
    with pytest.raises(InputError, match="Q"):
        ref.attention_reference(Q[:, :, :, :4], K, V)
    with pytest.raises(InputError, match="chunk_size"):
        ref.update_state_reference(K, V, log_G, 2, 8, 3)


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("gating", [False, True])
def test_inference_cache_and_state(tq, gating):
    b, h, r, d, p, T = 2, 2, 2, 4, 2, 2
    tk = 5
    Qp, Kp, Vp, Gp = _inputs(101 + tq + gating, b=b, t=6, h=h, r=r, d=d, gating=gating)
    Q, K, V, log_G = _inputs(102 + tq + gating, b=b, t=tk, h=h, r=r, d=d, gating=gating)
    # ground truth: the recurrent view over prefix + cache; the state is the prefix's
    _, S_start, z_start = _recurrent(Qp, Kp, Vp, Gp, p, T)
    cat = lambda a, z: None if a is None else torch.cat([a, z], 1)  # noqa: E731
    Y_all, S_end, z_end = _recurrent(cat(Qp, Q), cat(Kp, K), cat(Vp, V), cat(Gp, log_G), p, T)

    # (1) state + cache, no compression (tk < switch_over): state returned unchanged
    Y, S1, s1 = ref.power_retention_inference_reference(Q[:, -tq:], K, V, log_G, S_start, z_start, deg=p,
                                                        switch_over_seq_len=tk + 1, d_tile=T, **EXACT)
    assert Y.shape == (b, tq, h * r, d) and Y.dtype == F64
    torch.testing.assert_close(Y, Y_all[:, -tq:], **TIGHT)
    torch.testing.assert_close(S1, S_start, rtol=0, atol=0)
    torch.testing.assert_close(s1, z_start, rtol=0, atol=0)

    # (2) the cache reaches switch_over: compressed into the state (= the recurrent state at the end)
    Y2, S2, s2 = ref.power_retention_inference_reference(Q[:, -tq:], K, V, log_G, S_start, z_start, deg=p,
                                                         switch_over_seq_len=tk, d_tile=T)
    torch.testing.assert_close(Y2, Y_all[:, -tq:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S2, S_end, **TIGHT)
    torch.testing.assert_close(s2, z_end, **TIGHT)

    # (3) no state: plain attention over the cache; compression gives the cache's own state
    Y3, S3, s3 = ref.power_retention_inference_reference(Q[:, -tq:], K, V, log_G, None, None, deg=p,
                                                         switch_over_seq_len=tk, d_tile=T, **EXACT)
    Y_cache, S_cache, z_cache = _recurrent(Q, K, V, log_G, p, T)
    torch.testing.assert_close(Y3, Y_cache[:, -tq:], **TIGHT)
    torch.testing.assert_close(S3, S_cache, **TIGHT)
    torch.testing.assert_close(s3, z_cache, **TIGHT)
    Y4, S4, s4 = ref.power_retention_inference_reference(Q[:, -tq:], K, V, log_G, None, None, deg=p,
                                                         switch_over_seq_len=None, d_tile=T)
    assert S4 is None and s4 is None


def test_inference_state_only():
    b, h, r, d, p, T = 2, 2, 4, 4, 2, 1
    S0, s0, _ = _prefix_state(111, b, h, d, p, T)
    g = _gen(112)
    q = _rand(g, b, 1, h * r, d)
    Y, S1, s1 = ref.power_retention_inference_reference(q, None, None, None, S0, s0, deg=p, scale=0.4, d_tile=T)
    pq = _phi_indep(q[:, 0], p, T)  # scale cancels in the ratio
    head = torch.arange(h * r) // r
    want = torch.einsum("bhD,bhDe->bhe", pq, S0[:, head]) / torch.einsum("bhD,bhD->bh", pq, s0[:, head]).unsqueeze(-1)
    torch.testing.assert_close(Y[:, 0], want, **TIGHT)
    torch.testing.assert_close(S1, S0, rtol=0, atol=0)
    with pytest.raises(InputError):
        ref.power_retention_inference_reference(q, None, None, None, None, None, deg=p)


# ---------------------------------------------------------------------------------------------
# gradients (issue 4): float64 gradcheck on tiny shapes
# ---------------------------------------------------------------------------------------------

def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def test_gradcheck_attention_reference():
    Q, K, V, log_G = _inputs(121, b=1, t=4, h=1, r=2, d=4)
    args = tuple(map(_leaf, (Q, K, V, log_G)))
    assert torch.autograd.gradcheck(lambda q, k, v, lg: ref.attention_reference(q, k, v, lg, deg=2), args)
    assert torch.autograd.gradcheck(lambda q, k, v, lg: ref.attention_reference(q, k, v, lg, deg=4, **EXACT), args)


def test_gradcheck_power_retention_reference():
    b, h, r, d, p, T = 1, 1, 2, 4, 2, 2
    Q, K, V, log_G = _inputs(131, b=b, t=5, h=h, r=r, d=d)
    S0, s0, _ = _prefix_state(132, b, h, d, p, T, t0=3)
    args = tuple(map(_leaf, (Q, K, V, log_G, S0, s0)))

    def f(q, k, v, lg, S, s):
        return ref.power_retention_reference(q, k, v, lg, S, s, return_final_state=True, deg=p,
                                             chunk_size=2, d_tile=T)

    assert torch.autograd.gradcheck(f, args)

    def f_nostate(q, k, v, lg):
        return ref.power_retention_reference(q, k, v, lg, deg=p, chunk_size=3, d_tile=T)

    assert torch.autograd.gradcheck(f_nostate, args[:4])


def test_gradients_chunked_match_quadratic():
    """Autograd through the chunked reference == through the quadratic formula (backward contract)."""
    Q, K, V, log_G = _inputs(141, b=1, t=7, h=2, r=2, d=4)
    g = _gen(142)
    dY = _rand(g, *Q.shape)
    grads = []
    for fn in (lambda *a: ref.attention_reference(*a, deg=2, **EXACT),
               lambda *a: ref.power_retention_reference(*a, deg=2, chunk_size=3, **EXACT)):
        args = tuple(map(_leaf, (Q, K, V, log_G)))
        grads.append(torch.autograd.grad(fn(*args), args, dY))
    for a, z in zip(*grads):
        torch.testing.assert_close(a, z, rtol=1e-9, atol=1e-9)
