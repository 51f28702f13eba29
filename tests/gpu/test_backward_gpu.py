"""Backward on a real GPU (docs/MATH.md section 4).

* each backward kernel against the float64 emulation of its algorithm (bwd_emulation.py, itself
  proven against autograd in tests/test_backward_math_cpu.py), incl. a gate that varies across chunks;
* vidrial.power_retention's gradients (Q, K, V, log_G, initial_state, sum_of_keys, through Y and the
  final state) against float64 autograd of reference.power_retention_reference over the forward
  matrix (GQA, padding, p = 4, quadratic path, initial state);
* torch.compile(fullgraph=True) gives the same outputs and gradients;
* CUDA-graph capture of forward + backward, replayed on new data, gives the eager results.

    python3 -m pytest -m gpu -q tests/gpu/test_backward_gpu.py
"""
from __future__ import annotations

import math

import pytest
import torch

from vidrial.reference import backward as em
from vidrial.reference import forward as ref
from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim

pytestmark = pytest.mark.gpu

DEV = "cuda"
F64 = torch.float64


def poison():
    """Fill the caching allocator's free blocks with NaN so that unwritten outputs show up."""
    free, _ = torch.cuda.mem_get_info()
    n = min(int(free * 0.25), 2 << 30) // 4
    x = torch.full((n,), float("nan"), device=DEV)
    del x


def rel_err(out, exp) -> float:
    out, exp = out.double(), exp.double()
    assert out.shape == exp.shape, (out.shape, exp.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - exp).norm() / exp.norm().clamp_min(1e-30)).item()


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def varying_gates(b, t, h, g, lo=0.5, hi=5.0):
    """log gates whose level changes along the sequence (so chunk gates differ from chunk to chunk)."""
    base = torch.linspace(lo, hi, t, device=DEV)[None, :, None]
    return torch.nn.functional.logsigmoid(base + torch.randn(b, t, h, device=DEV, generator=g))


# ---- kernels vs their emulation --------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, dict(threads=256, per_thread=8), dict(threads=512, per_thread=16)],
                         ids=["dispatched", "256x8", "512x16"])
@pytest.mark.parametrize("gating,final,init", [(True, True, True), (True, False, False), (False, True, False)])
def test_discumsum_bwd_kernel(gating, final, init, config):
    from vidrial.kernels.power_retention.discumsum_bwd import DiscumsumBwdConfig, discumsum_bwd

    b, n, h, D, d = 2, 6, 3, 2304, 64
    g = gen(0)
    dSbar = torch.randn(b, n, h, D, d, device=DEV, generator=g)
    dsbar = torch.randn(b, n, h, D, device=DEV, generator=g)
    Sb16 = torch.randn(b, n, h, D, d, device=DEV, generator=g).bfloat16()
    sb = torch.randn(b, n + 1, h, D, device=DEV, generator=g)
    L = (-torch.rand(b, n, h, device=DEV, generator=g) * 2) if gating else None  # varies across chunks
    dSf = torch.randn(b, h, D, d, device=DEV, generator=g) if final else None
    dsf = torch.randn(b, h, D, device=DEV, generator=g) if final else None
    want = em.discumsum_bwd(dSbar.double(), dsbar.double(), Sb16.double(), sb[:, :n].double(),
                            None if L is None else L.double(), None if dSf is None else dSf.double(),
                            None if dsf is None else dsf.double())
    poison()
    cfg = DiscumsumBwdConfig(**config) if config else None
    dS, ds, dL, dS0, ds0 = discumsum_bwd(dSbar.clone(), dsbar.clone(), Sb16, sb, L, dSf, dsf, want_initial=init,
                                         config=cfg)
    assert rel_err(dS, want[0]) < 1e-5 and rel_err(ds, want[1]) < 1e-5
    dS16, ds, _, _, _ = discumsum_bwd(dSbar.clone(), dsbar.clone(), Sb16, sb, L, dSf, dsf, dS_dtype=torch.bfloat16,
                                      config=cfg)  # what the backward hands update_state_bwd
    assert dS16.dtype == torch.bfloat16 and rel_err(dS16, want[0]) < 4e-3 and rel_err(ds, want[1]) < 1e-5
    if gating:
        assert rel_err(dL, want[2]) < 1e-4
    if init:
        assert rel_err(dS0, want[3]) < 1e-5 and rel_err(ds0, want[4]) < 1e-5


def _us_bwd_inputs(b, h, c, n, d, p, dt, gating, seed):
    """update_state_bwd's inputs: K, V [b,n*c,h,d] bf16, dS, ds fp32, chunk-local cumulative gates or None."""
    t, D = n * c, feature_dim(d, p, dt)
    g = gen(seed)
    K = (torch.randn(b, t, h, d, device=DEV, generator=g) * 0.6).bfloat16()
    V = torch.randn(b, t, h, d, device=DEV, generator=g).bfloat16()
    dS = torch.randn(b, n, h, D, d, device=DEV, generator=g) * 0.1
    ds = torch.randn(b, n, h, D, device=DEV, generator=g) * 0.1
    gc = varying_gates(b, t, h, g).view(b, n, c, h).cumsum(2).view(b, t, h) if gating else None
    return K, V, dS, ds, gc


@pytest.mark.parametrize("d,p,gating", [(64, 2, True), (32, 2, False), (128, 2, True), (32, 4, True)])
def test_update_state_bwd_mma16_kernel(d, p, gating):
    """bf16 tensor cores (dS rounded to bf16 by the launcher, phi(k) to bf16 for dV; CPU runs measured
    ~2e-3 vs float64) against the float64 emulation; c=96 leaves a
    partial 128-row CTA at d <= 64, b = 2 and h = 3 check the grid."""
    from vidrial.kernels.power_retention.update_state_bwd import (
        UpdateStateBwdKey, mma16_config, update_state_bwd)

    b, h, n = 2, 3, 3
    for c in (128, 96):
        dt = default_d_tile(d, p)
        K, V, dS, ds, gc = _us_bwd_inputs(b, h, c, n, d, p, dt, gating, seed=2)
        key = UpdateStateBwdKey(head_dim=d, deg=p, d_tile=dt)
        poison()
        dK, dV, E = update_state_bwd(K, V, gc, dS, ds, deg=p, d_tile=dt, chunk_size=c, config=mma16_config(key))
        wK, wV, wE = em.update_state_bwd(K.double(), V.double(), None if gc is None else gc.double(), dS.double(),
                                         ds.double(), p, dt, c)
        assert (E is None) == (not gating)
        for got, want in ((dK, wK), (dV, wV), (E, wE)):
            if got is None:  # E without gating
                continue
            assert rel_err(got, want) < 1e-2



@pytest.mark.parametrize("warps,stages", [(8, 4), (4, 3), (8, 6)])
@pytest.mark.parametrize("gating,dtype", [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float16)])
def test_update_state_bwd_wgmma_kernel(warps, stages, gating, dtype):
    """The Hopper kernel (impl='wgmma', sm_90a) against the float64 emulation: c = 96 and 1000 leave
    partial CTAs (64 or 128 rows), b = 2 and h = 3 check the grid; fp16 V is rounded to bf16 as in the
    mma_sync kernel."""
    from vidrial.kernels.power_retention.update_state_bwd import UpdateStateBwdConfig, update_state_bwd

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma kernel needs a Hopper GPU (sm_90)")
    b, h, d, p, dt = 2, 3, 64, 2, 8
    cfg = UpdateStateBwdConfig(impl="wgmma", warps=warps, stages=stages)
    for c, n in ((128, 3), (96, 2), (1000, 2)):
        K, V, dS, ds, gc = _us_bwd_inputs(b, h, c, n, d, p, dt, gating, seed=5)
        K, V = K.to(dtype), V.to(dtype)
        poison()
        dK, dV, E = update_state_bwd(K, V, gc, dS, ds, deg=p, d_tile=dt, chunk_size=c, config=cfg)
        wK, wV, wE = em.update_state_bwd(K.double(), V.bfloat16().double(), None if gc is None else gc.double(),
                                         dS.double(), ds.double(), p, dt, c)
        assert (E is None) == (not gating)
        for name, got, want in (("dK", dK, wK), ("dV", dV, wV), ("E", E, wE)):
            if got is not None:
                assert rel_err(got, want) < 1e-2, (name, c, rel_err(got, want))

def _forward_pieces(b, t, hq, h, d, p, c, gating, seed):
    """Real forward kernels' outputs (as the autograd op keeps them) plus float64 copies."""
    from vidrial.autograd import power_retention_fwd

    g = gen(seed)
    Q = torch.randn(b, t, hq, d, device=DEV, generator=g).bfloat16()
    K = torch.randn(b, t, h, d, device=DEV, generator=g).bfloat16()
    V = torch.randn(b, t, h, d, device=DEV, generator=g).bfloat16()
    lg = varying_gates(b, t, h, g) if gating else None
    dt = default_d_tile(d, p)
    scale = 1.0 / math.sqrt(d)
    Y, O, l, m, Sb16, sb, _, _ = power_retention_fwd(Q, K, V, lg, None, None, p, scale, c, dt, False)
    return Q, K, V, lg, dt, scale, Y, O, l, m, Sb16, sb


@pytest.mark.parametrize("d,p,r,gating,c", [(64, 2, 1, True, 128), (64, 2, 2, True, 96), (32, 2, 4, False, 128),
                                            (32, 4, 1, True, 64), (128, 2, 2, True, 128), (64, 2, 1, True, 1024)])
def test_query_state_bwd_mma16_rows(d, p, r, gating, c):
    """The tensor-core rows pass against the float64 rows pass (partial row tiles: c=96 with 128-row CTAs; GQA; p=4; d=128 with 64-row CTAs; the training chunk)."""
    from vidrial.kernels.power_retention.query_state_bwd import mma16_config

    _check_qs_rows(d, p, r, gating, c, lambda key: mma16_config(key))


@pytest.mark.parametrize("warps,stages", [(4, 4), (8, 3), (4, 6)])
@pytest.mark.parametrize("r,gating,c", [(1, True, 128), (2, True, 96), (1, False, 1008), (4, True, 1024)])
def test_query_state_bwd_wgmma_rows(warps, stages, r, gating, c):
    """The Hopper rows pass (impl='wgmma', sm_90a) against the float64 rows pass: partial CTAs (c = 96,
    1008), GQA, ungated, the training chunk."""
    from vidrial.kernels.power_retention.query_state_bwd import QueryStateBwdConfig

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma kernel needs a Hopper GPU (sm_90)")
    _check_qs_rows(64, 2, r, gating, c, lambda key: QueryStateBwdConfig(impl="wgmma", warps=warps, stages=stages))


def _check_qs_rows(d, p, r, gating, c, config_of):
    from vidrial.kernels.power_retention.query_state_bwd import QueryStateBwdKey, query_state_bwd

    b, h, n = 1, 2, 3
    t, hq = n * c, h * r
    Q, K, V, lg, dt, scale, Y, O, l, m, Sb16, sb = _forward_pieces(b, t, hq, h, d, p, c, gating, 4)
    dY = torch.randn(b, t, hq, d, device=DEV, generator=gen(5)).bfloat16()
    gc = lg.view(b, n, c, h).cumsum(2).view(b, t, h) if gating else None
    key = QueryStateBwdKey(head_dim=d, deg=p, d_tile=dt)
    args = (Q, gc, Sb16, sb, O, l, m, Y, dY)
    kw = dict(deg=p, d_tile=dt, scale=scale, chunk_size=c)
    poison()
    out = query_state_bwd(*args, config=config_of(key), **kw)
    gz = gc.double() if gating else torch.zeros(b, t, h, device=DEV, dtype=F64)
    from vidrial.kernels.power_retention.query_state_bwd import ROW_OUTPUTS, rows_reference_outputs

    w = rows_reference_outputs(em.qs_bwd_rows(Q.double(), gz, Sb16[:, :n].double(), sb[:, :n].double(), O.double(),
                                              l.double(), m.double(), Y.double(), dY.double(), p, dt, scale, c),
                               dY.double(), O.double(), l.double())
    terms = (out["dl"].abs() * l).norm().item()
    for name, want in zip(ROW_OUTPUTS, w):
        got = out[name]
        if name == "dg":  # phi.dphi + dO.O + dl l: cancelling terms; error relative to their size
            assert torch.isfinite(got).all() and (got.double() - want).norm().item() < 1e-4 * terms, name
        else:
            assert rel_err(got, want) < 1e-3, name


@pytest.mark.parametrize("d,p,r,gating", [(64, 2, 1, True), (64, 2, 4, True), (32, 2, 2, False), (32, 4, 2, True)])
def test_query_state_bwd_update_state_pass(d, p, r, gating):
    """The state pass on the forward update_state kernel (bf16 operands, hence the 1e-2 tolerance) vs the
    emulation."""
    from vidrial.kernels.power_retention.query_state_bwd import query_state_bwd

    b, h, c, n = 1, 2, 128, 3
    t, hq = n * c, h * r
    Q, K, V, lg, dt, scale, Y, O, l, m, Sb16, sb = _forward_pieces(b, t, hq, h, d, p, c, gating, 5)
    dY = torch.randn(b, t, hq, d, device=DEV, generator=gen(6)).bfloat16()
    gc = lg.view(b, n, c, h).cumsum(2).view(b, t, h) if gating else None
    args = (Q, gc, Sb16, sb, O, l, m, Y, dY)
    kw = dict(deg=p, d_tile=dt, scale=scale, chunk_size=c)
    poison()
    out = query_state_bwd(*args, **kw)
    wS, ws = em.qs_bwd_state(Q.double(), out["qscale"].double(), out["dAh"].double(), out["dBh"].double(), h, p, dt,
                             scale, c)
    assert out["dSbar"].shape == wS.shape and out["dsbar"].shape == ws.shape
    assert out["dSbar"].is_contiguous() and out["dsbar"].is_contiguous()
    assert rel_err(out["dSbar"], wS) < 1e-2 and rel_err(out["dsbar"], ws) < 1e-2


def intra_bwd_inputs(d, p, r, c, gating, seed, b=2, h=2, n=3):
    """Q, K, V (bf16), gc (chunk-local cumsum of varying gates or None), m (the forward's), dO, dl, scale."""
    from vidrial.kernels.power_retention.intra_chunk_attention import intra_chunk_attention

    t, hq = n * c, h * r
    g = gen(seed)
    Q = torch.randn(b, t, hq, d, device=DEV, generator=g).bfloat16()
    K = torch.randn(b, t, h, d, device=DEV, generator=g).bfloat16()
    V = torch.randn(b, t, h, d, device=DEV, generator=g).bfloat16()
    lg = varying_gates(b, t, h, g) if gating else None
    scale = 1.0 / math.sqrt(d)
    _, _, m = intra_chunk_attention(Q, K, V, lg, deg=p, scale=scale, chunk_size=c, normalize=False)
    dO = torch.randn(b, t, hq, d, device=DEV, generator=g)
    dl = torch.randn(b, t, hq, device=DEV, generator=g)
    gc = lg.view(b, n, c, h).cumsum(2).view(b, t, h) if gating else None
    return Q, K, V, gc, m, dO, dl, scale


@pytest.mark.parametrize("d,p,r,c,gating", [(64, 2, 1, 128, True), (64, 2, 2, 256, True), (128, 2, 1, 64, False),
                                            (32, 4, 2, 128, True)])
def test_intra_chunk_attention_bwd_kernels(d, p, r, c, gating):
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import (IntraBwdKey, flash_default,
                                                                           intra_chunk_attention_bwd)

    Q, K, V, gc, m, dO, dl, scale = intra_bwd_inputs(d, p, r, c, gating, seed=4)
    key = IntraBwdKey(head_dim=d, deg=p)
    cfg, qcfg = flash_default(key), flash_default(key.model_copy(update={"stage": "dq"}))
    poison()
    dQ, dK, dV, dg = intra_chunk_attention_bwd(Q, K, V, gc, m, dO, dl, deg=p, scale=scale, chunk_size=c,
                                               config=cfg, dq_config=qcfg)
    args = (Q.double(), K.double(), V.double(), None if gc is None else gc.double(), m.double(), dO.double(),
            dl.double(), p, scale, c)
    wQ, wK, wV, wg = em.intra_bwd(*args)
    tol = 6e-3  # bf16 operands
    assert rel_err(dQ, wQ) < tol and rel_err(dK, wK) < tol and rel_err(dV, wV) < tol
    if gating:
        assert rel_err(dg, wg) < tol
    # the algorithm with its bf16 operand rounding, up to fp32 accumulation
    for got, want in zip((dQ, dK, dV, dg), em.intra_bwd(*args, bf16_operands=True)):
        if got is not None:
            assert rel_err(got, want) < 1e-3


@pytest.mark.parametrize("d,p,r,c", [(64, 2, 1, 128), (64, 2, 2, 256), (32, 4, 2, 128), (128, 2, 1, 64)])
def test_intra_chunk_attention_bwd_flash_dgrow(d, p, r, c):
    """want_dgrow: dgrow = sum_j P dP (dq pass) against the float64 emulation, exact and with the kernel's
    bf16 operands; it cancels dgcol (dkv pass) over each chunk up to fp32 accumulation; the other outputs
    are those of the call without want_dgrow."""
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import (IntraBwdKey, flash_default,
                                                                           intra_chunk_attention_bwd)

    b, n = 2, 3
    Q, K, V, gc, m, dO, dl, scale = intra_bwd_inputs(d, p, r, c, True, seed=7, b=b, n=n)
    t, hq = Q.shape[1:3]
    key = IntraBwdKey(head_dim=d, deg=p)
    cfg, qcfg = flash_default(key), flash_default(key.model_copy(update={"stage": "dq"}))
    poison()
    out = intra_chunk_attention_bwd(Q, K, V, gc, m, dO, dl, deg=p, scale=scale, chunk_size=c, config=cfg,
                                    dq_config=qcfg, want_dgrow=True)
    assert len(out) == 5 and out[4].shape == (b, t, hq) and out[4].dtype == torch.float32
    plain = intra_chunk_attention_bwd(Q, K, V, gc, m, dO, dl, deg=p, scale=scale, chunk_size=c, config=cfg,
                                      dq_config=qcfg)
    for a, w in zip(out[:4], plain):
        assert torch.equal(a, w)
    args = (Q.double(), K.double(), V.double(), gc.double(), m.double(), dO.double(), dl.double(), p, scale, c)
    dgrow = out[4]
    assert rel_err(dgrow, em.intra_bwd(*args, want_dgrow=True)[4]) < 6e-3
    assert rel_err(dgrow, em.intra_bwd(*args, bf16_operands=True, want_dgrow=True)[4]) < 1e-3
    per_chunk = lambda x: x.double().view(b, n, c, -1).sum((2, 3))  # noqa: E731
    resid = per_chunk(dgrow) + per_chunk(out[3])
    assert (resid.abs() <= 1e-5 * per_chunk(dgrow.abs())).all(), resid


@pytest.mark.parametrize("dtype,chunk", [(torch.float16, 128), (torch.bfloat16, None)])
def test_intra_chunk_attention_bwd_flash_launcher(dtype, chunk):
    """The launcher with fp16 inputs and on the quadratic path (one chunk of the whole sequence, partial
    tiles), against the float64 emulation."""
    from vidrial.kernels.power_retention.intra_chunk_attention import intra_chunk_attention
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import (IntraBwdKey, flash_default,
                                                                           intra_chunk_attention_bwd)

    b, h, r, d, t = 2, 2, 2, 64, 1000
    g = gen(5)
    Q = torch.randn(b, t, h * r, d, device=DEV, generator=g).to(dtype)
    K = torch.randn(b, t, h, d, device=DEV, generator=g).to(dtype)
    V = torch.randn(b, t, h, d, device=DEV, generator=g).to(dtype)
    lg = varying_gates(b, t, h, g)
    _, _, m = intra_chunk_attention(Q, K, V, lg, deg=2, scale=0.125, chunk_size=chunk, normalize=False)
    dO = torch.randn(b, t, h * r, d, device=DEV, generator=g)
    dl = torch.randn(b, t, h * r, device=DEV, generator=g)
    c = chunk or t
    n = -(-t // c)
    G = torch.nn.functional.pad(lg, (0, 0, 0, n * c - t)).view(b, n, c, h).cumsum(2).view(b, n * c, h)[:, :t]
    key = IntraBwdKey(head_dim=d)
    poison()
    out = intra_chunk_attention_bwd(Q, K, V, G.contiguous(), m, dO, dl, deg=2, scale=0.125, chunk_size=chunk,
                                    config=flash_default(key), dq_config=flash_default(key.model_copy(
                                        update={"stage": "dq"})))
    pad = n * c - t
    P = lambda x: torch.nn.functional.pad(x.double(), (0, 0) * (x.dim() - 2) + (0, pad))  # noqa: E731
    want = em.intra_bwd(P(Q), P(K), P(V), P(G), P(m), P(dO), P(dl), 2, 0.125, c)
    for a, w in zip(out, want):
        assert rel_err(a, w[:, :t]) < 6e-3


# ---- the differentiable op vs float64 autograd -------------------------------------------------------
GRAD_CASES = [
    # t, d, p, r, gating, chunk, init, final, dtype
    (256, 64, 2, 1, True, 64, False, False, torch.bfloat16),
    (1000, 64, 2, 4, True, 128, True, True, torch.bfloat16),     # padded, GQA 4, initial + final state
    (512, 32, 2, 2, False, 64, False, True, torch.float16),
    (384, 128, 2, 2, True, 128, True, False, torch.bfloat16),
    (128, 32, 4, 1, True, 64, False, True, torch.bfloat16),      # p = 4
    (100, 64, 2, 2, True, 128, False, False, torch.bfloat16),    # quadratic (t_pad <= switch)
    (700, 64, 2, 2, True, None, False, False, torch.bfloat16),   # chunk_size None: quadratic
    (300, 64, 2, 1, True, None, True, True, torch.bfloat16),     # chunk_size None + state: one chunk
    (4096, 64, 2, 1, True, 1024, False, True, torch.bfloat16),   # the training chunk size
]


def _make(t, d, p, r, gating, init, dtype, seed):
    b, h = (1 if t >= 4096 else 2), (2 if r == 1 else 1)
    hq = h * r
    g = gen(seed)
    Q = torch.randn(b, t, hq, d, device=DEV, generator=g).to(dtype)
    K = torch.randn(b, t, h, d, device=DEV, generator=g).to(dtype)
    V = torch.randn(b, t, h, d, device=DEV, generator=g).to(dtype)
    lg = varying_gates(b, t, h, g) if gating else None
    dt = default_d_tile(d, p)
    S0 = s0 = None
    if init:
        Kp = torch.randn(b, 64, h, d, device=DEV, dtype=F64, generator=g)
        S0, s0 = ref.update_state_reference(Kp, torch.randn_like(Kp), None, p, dt, 64)
        S0, s0 = S0[:, 0].float(), s0[:, 0].float()
    dY = torch.randn(b, t, hq, d, device=DEV, generator=g).to(dtype)
    return Q, K, V, lg, S0, s0, dY, dt


def _leaves(*xs, dtype=None):
    return [None if x is None else x.detach().clone().to(dtype or x.dtype).requires_grad_(True) for x in xs]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"t{c[0]}-d{c[1]}-p{c[2]}-r{c[3]}-g{int(c[4])}-c{c[5]}-i{int(c[6])}"
                                                  f"-f{int(c[7])}-{str(c[8])[6:]}" for c in GRAD_CASES])
def test_gradients_match_float64_autograd(case):
    import vidrial

    t, d, p, r, gating, c, init, final, dtype = case
    Q, K, V, lg, S0, s0, dY, dt = _make(t, d, p, r, gating, init, dtype, seed=t + d)
    D = feature_dim(d, p, dt)
    b, h = K.shape[0], K.shape[2]
    g = gen(99)
    dSf = torch.randn(b, h, D, d, device=DEV, generator=g) * 1e-3 if final else None
    dsf = torch.randn(b, h, D, device=DEV, generator=g) * 1e-3 if final else None

    mine = _leaves(Q, K, V, lg, S0, s0)
    poison()
    out = vidrial.power_retention(*mine, return_final_state=final, deg=p, chunk_size=c)
    Y = out[0] if final else out
    loss = (Y.float() * dY.float()).sum()
    if final:
        loss = loss + (out[1] * dSf).sum() + (out[2] * dsf).sum()
    loss.backward()

    refl = _leaves(Q, K, V, lg, S0, s0, dtype=F64)
    outr = ref.power_retention_reference(*refl, return_final_state=True, deg=p, chunk_size=c, d_tile=dt)
    lr = (outr[0] * dY.double()).sum()
    if final:
        lr = lr + (outr[1] * dSf.double()).sum() + (outr[2] * dsf.double()).sum()
    lr.backward()
    assert rel_err(Y, outr[0]) < 1e-2
    names = ("dQ", "dK", "dV", "dlog_G", "d_initial_state", "d_sum_of_keys")
    for name, a, w in zip(names, mine, refl):
        if a is None:
            continue
        assert a.grad is not None, name
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        err = rel_err(a.grad, w.grad)
        assert err < 2e-2, f"{name}: relative error {err:.3e}"


def test_gradients_with_chunks_smaller_than_a_flash_tile():
    """chunk_size 32 < the 64-row flash tile: the default picks 32-row tiles (flash_default) and the
    gradients match float64 (GQA 2, final state, gate varying across chunks)."""
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import FAMILY, IntraBwdKey

    key = IntraBwdKey(head_dim=64, deg=2, chunk_size=32, stage="dq")
    assert FAMILY.default_config(key).tile == 32
    test_gradients_match_float64_autograd((256, 64, 2, 2, True, 32, False, True, torch.bfloat16))


def _runs_chunked(case) -> bool:
    """Whether vidrial.autograd takes the chunked path (so query_state_bwd's state pass) for a GRAD_CASES row."""
    t, _, _, _, _, c, init, final, _ = case
    if init:
        return True
    if c is None:
        return False
    t_pad = -(-t // c) * c
    return t_pad > c or (final and t_pad == c)


STATE_PASS_CASES = [c for c in GRAD_CASES if _runs_chunked(c)]


@pytest.mark.parametrize("case", STATE_PASS_CASES)
def test_gradients_run_the_update_state_pass(case, monkeypatch):
    """Full fwd+bwd gradients vs float64 where query_state_bwd's state pass runs (on the forward update_state
    kernel); checks that it ran."""
    from vidrial.kernels.power_retention import qs_bwd_state_update as qsu

    calls = []
    real = qsu.state_pass_update_state
    monkeypatch.setattr(qsu, "state_pass_update_state", lambda *a, **k: calls.append(1) or real(*a, **k))
    test_gradients_match_float64_autograd(case)
    assert calls, "the state pass did not run"


def test_constant_and_varying_gate_both_match():
    """A constant gate hides discumsum index bugs; check both, with several chunks."""
    import vidrial

    for varying in (False, True):
        Q, K, V, _, _, _, dY, dt = _make(512, 64, 2, 1, False, False, torch.bfloat16, seed=7)
        b, t, h = K.shape[0], K.shape[1], K.shape[2]
        if varying:
            lg = varying_gates(b, t, h, gen(8), lo=-1.0, hi=4.0)
        else:
            lg = torch.full((b, t, h), -0.03, device=DEV)
        mine = _leaves(Q, K, V, lg)
        (vidrial.power_retention(*mine, chunk_size=64).float() * dY.float()).sum().backward()
        refl = _leaves(Q, K, V, lg, dtype=F64)
        (ref.power_retention_reference(*refl, chunk_size=64, d_tile=dt) * dY.double()).sum().backward()
        for name, a, w in zip(("dQ", "dK", "dV", "dlog_G"), mine, refl):
            err = rel_err(a.grad, w.grad)
            assert err < 2e-2, f"varying={varying} {name}: {err:.3e}"


def test_no_grad_path_unchanged():
    """Without requires_grad, vidrial.power_retention runs the plain forward (same Y as the autograd op)."""
    import vidrial

    Q, K, V, lg, _, _, _, _ = _make(512, 64, 2, 2, True, False, torch.bfloat16, seed=3)
    Y0 = vidrial.power_retention(Q, K, V, lg, chunk_size=128)
    Y1 = vidrial.power_retention(*_leaves(Q, K, V, lg), chunk_size=128)
    assert rel_err(Y1.detach(), Y0) < 1e-3


# ---- torch.compile and CUDA graphs ---------------------------------------------------------------
def _fwd_bwd(f, Q, K, V, lg, dY):
    leaves = _leaves(Q, K, V, lg)
    Y = f(*leaves)
    (Y.float() * dY.float()).sum().backward()
    return [Y.detach()] + [x.grad for x in leaves]


def test_torch_compile_fullgraph_same_outputs_and_gradients():
    import vidrial

    Q, K, V, lg, _, _, dY, _ = _make(640, 64, 2, 2, True, False, torch.bfloat16, seed=21)

    def f(Q, K, V, lg):
        return vidrial.power_retention(Q, K, V, lg, deg=2, chunk_size=128)

    eager = _fwd_bwd(f, Q, K, V, lg, dY)
    torch._dynamo.reset()
    compiled = _fwd_bwd(torch.compile(f, fullgraph=True), Q, K, V, lg, dY)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-5


def test_cuda_graph_capture_and_replay():
    import vidrial

    Q, K, V, lg, _, _, dY, _ = _make(1024, 64, 2, 2, True, False, torch.bfloat16, seed=31)
    sQ, sK, sV, slg = _leaves(Q, K, V, lg)
    sdY = dY.clone()

    def step():
        for x in (sQ, sK, sV, slg):
            x.grad = None
        Y = vidrial.power_retention(sQ, sK, sV, slg, deg=2, chunk_size=256)
        Y.backward(sdY)
        return Y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile, load, block tables, dispatch
            step()
    torch.cuda.current_stream().wait_stream(s)
    for x in (sQ, sK, sV, slg):
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        Ys = step()
    # replay on new data, compare with eager on the same data
    for seed in (41, 42):
        Q2, K2, V2, lg2, _, _, dY2, _ = _make(1024, 64, 2, 2, True, False, torch.bfloat16, seed=seed)
        with torch.no_grad():
            for dst, src in ((sQ, Q2), (sK, K2), (sV, V2), (slg, lg2), (sdY, dY2)):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = _fwd_bwd(lambda *a: vidrial.power_retention(*a, deg=2, chunk_size=256), Q2, K2, V2, lg2, dY2)
        for a, b in zip([Ys.detach(), sQ.grad, sK.grad, sV.grad, slg.grad], eager):
            assert rel_err(a, b) < 1e-5
