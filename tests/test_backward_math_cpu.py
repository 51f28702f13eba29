"""CPU: the float64 emulation of the backward kernels (bwd_emulation.py) equals float64 autograd
through reference.power_retention_reference (docs/MATH.md section 4)."""
import math

import pytest
import torch

from vidrial.reference import backward as em
from vidrial.reference.forward import phi, power_retention_reference
from vidrial.kernels.power_retention.sympow import layout

F64 = torch.float64


def _inputs(b, t, hq, h, d, gating, seed, varying=True, state=False, D=None):
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(b, t, hq, d, generator=gen, dtype=F64)
    K = torch.randn(b, t, h, d, generator=gen, dtype=F64)
    V = torch.randn(b, t, h, d, generator=gen, dtype=F64)
    lg = None
    if gating:
        if varying:  # a gate that varies across chunks (and inside them)
            base = torch.linspace(-3.0, 0.5, t, dtype=F64)[None, :, None]
            lg = torch.nn.functional.logsigmoid(base + torch.randn(b, t, h, generator=gen, dtype=F64))
        else:
            lg = torch.full((b, t, h), -0.05, dtype=F64)
    dY = torch.randn(b, t, hq, d, generator=gen, dtype=F64)
    S0 = s0 = None
    if state:
        S0 = torch.randn(b, h, D, d, generator=gen, dtype=F64) * 0.1
        s0 = torch.rand(b, h, D, generator=gen, dtype=F64) * 0.1
    return Q, K, V, lg, dY, S0, s0


def _autograd(Q, K, V, lg, dY, deg, scale, c, d_tile, S0=None, s0=None, dSf=None, dsf=None):
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (Q, K, V, lg, S0, s0)]
    out = power_retention_reference(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5],
                                    return_final_state=dSf is not None, deg=deg, scale=scale, chunk_size=c,
                                    d_tile=d_tile)
    if dSf is not None:
        Y, Sf, sf = out
        loss = (Y * dY).sum() + (Sf * dSf).sum() + (sf * dsf).sum()
    else:
        loss = (out * dY).sum()
    loss.backward()
    return [x.grad if x is not None else None for x in leaves]


def _close(a, b, tol=2e-5):
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item() / scale
    assert err < tol, err


@pytest.mark.parametrize("deg,d,d_tile", [(2, 8, 2), (2, 8, 1), (2, 16, 4), (4, 8, 2)])
@pytest.mark.parametrize("gating", ["none", "const", "varying"])
@pytest.mark.parametrize("gqa", [1, 2])
def test_emulated_backward_matches_autograd(deg, d, d_tile, gating, gqa):
    b, t, h, c = 2, 48, 2, 16
    Q, K, V, lg, dY, _, _ = _inputs(b, t, h * gqa, h, d, gating != "none", 1, varying=gating == "varying")
    scale = 0.7 / math.sqrt(d)
    got = em.emulate_backward(Q, K, V, lg, dY, deg, scale, c, d_tile)
    want = _autograd(Q, K, V, lg, dY, deg, scale, c, d_tile)
    _close(got["dQ"], want[0])
    _close(got["dK"], want[1])
    _close(got["dV"], want[2])
    if lg is not None:
        _close(got["dlog_G"], want[3])


@pytest.mark.parametrize("deg,d_tile", [(2, 2), (4, 2)])
def test_emulated_backward_with_state_and_final_state(deg, d_tile):
    b, t, h, d, c = 1, 48, 2, 8, 16
    D = layout(d, deg, d_tile).feature_dim
    Q, K, V, lg, dY, S0, s0 = _inputs(b, t, 2 * h, h, d, True, 3, state=True, D=D)
    gen = torch.Generator().manual_seed(9)
    dSf = torch.randn(b, h, D, d, generator=gen, dtype=F64) * 1e-2
    dsf = torch.randn(b, h, D, generator=gen, dtype=F64) * 1e-2
    got = em.emulate_backward(Q, K, V, lg, dY, deg, None, c, d_tile, S0, s0, dSf, dsf)
    want = _autograd(Q, K, V, lg, dY, deg, None, c, d_tile, S0, s0, dSf, dsf)
    for k, w in zip(("dQ", "dK", "dV", "dlog_G", "d_initial_state", "d_sum_of_keys"), want):
        _close(got[k], w)


def test_sympow_chain_is_the_jacobian():
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    for deg, T in ((2, 1), (2, 4), (4, 2)):
        D = layout(8, deg, T).feature_dim
        dphi = torch.randn(3, D, dtype=F64)
        (g,) = torch.autograd.grad((phi(x, deg, T) * dphi).sum(), x)
        _close(em.sympow_chain(x.detach(), dphi, deg, T), g, 1e-12)


def test_discumsum_bwd_varying_gate_against_autograd():
    from vidrial.reference.forward import discumsum_reference

    gen = torch.Generator().manual_seed(0)
    b, n, h, D, d = 2, 5, 3, 6, 4
    S = torch.randn(b, n, h, D, d, generator=gen, dtype=F64, requires_grad=True)
    s = torch.randn(b, n, h, D, generator=gen, dtype=F64, requires_grad=True)
    L = (-torch.rand(b, n, h, generator=gen, dtype=F64) * 2).requires_grad_(True)
    S0 = torch.randn(b, h, D, d, generator=gen, dtype=F64, requires_grad=True)
    s0 = torch.randn(b, h, D, generator=gen, dtype=F64, requires_grad=True)
    Sbar, sbar = discumsum_reference(S, s, L, S0, s0)
    dSbar = torch.randn_like(Sbar)
    dsbar = torch.randn_like(sbar)
    grads = torch.autograd.grad((Sbar * dSbar).sum() + (sbar * dsbar).sum(), (S, s, L, S0, s0))
    got = em.discumsum_bwd(dSbar[:, :n], dsbar[:, :n], Sbar.detach(), sbar.detach(), L.detach(),
                           dSbar[:, n], dsbar[:, n])
    for a, w in zip(got, grads):
        _close(a, w, 1e-12)


@pytest.mark.parametrize("deg,d_tile,gating,gqa", [(2, 4, True, 2), (4, 2, True, 1), (2, 1, False, 1)])
def test_rows_pass_as_the_tensor_core_kernel_computes_it(deg, d_tile, gating, gqa):
    """qs_bwd_rows_mma16 (raw-q chain, row factors applied last, dg by Euler's theorem) equals the
    row pass qs_bwd_rows, including rows whose state term dominates the intra-chunk half."""
    b, h, c, n, d = 1, 2, 16, 3, 8
    hq, t = h * gqa, n * c
    Q, K, V, lg, dY, _, _ = _inputs(b, t, hq, h, d, gating, 7)
    f = em.forward_pieces(Q, K, V, lg, deg, 1 / math.sqrt(d), c, d_tile)
    g = f["g"] if gating else torch.zeros(b, t, h, dtype=F64)
    args = (Q, g, f["Sbar"][:, :n], f["sbar"][:, :n], f["O"], f["l"], f["m"] - 3.0, f["Y"], dY, deg, d_tile,
            1 / math.sqrt(d), c)
    for name, a, w in zip(("dQ", "dO", "dl", "dAh", "dBh", "qscale", "dg"), em.qs_bwd_rows_mma16(*args),
                          em.qs_bwd_rows(*args)):
        _close(a, w, 1e-11)
