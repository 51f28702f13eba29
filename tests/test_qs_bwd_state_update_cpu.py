"""CPU: query_state_bwd's state pass on the forward update_state kernel (qs_bwd_state_update.py).

update_state itself needs a GPU; here it is replaced at the module's seam by a float64 emulation that
rounds like the kernel (bf16 inputs, phi(K') by bf16 multiplies, fp32 outputs) and first runs the real
launcher's input checks. Checked: the composition is exact w.r.t. its bf16 inputs (layout, GQA sum,
folded factors), it stays within bf16 tolerance of the state pass's float64 emulation and of float64
autograd (full gradients), the inputs pass update_state's checks and its kernels for these chunk
lengths compile (NVRTC sm_80/sm_90), and query_state_bwd runs it (the only state pass)."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from vidrial.core.errors import InputError
from vidrial.reference import backward as em
from vidrial.kernels.power_retention import qs_bwd_state_update as mod
from vidrial.reference.forward import phi, power_retention_reference
from vidrial.kernels.power_retention.update_state import update_state as real_update_state

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402
import test_backward_kernels_cpu as kernels_cpu  # noqa: E402  (module import: its tests are not re-collected)

F64 = torch.float64


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


emulated_update_state = bwd_host_emu.emulated_update_state  # the stand-in for update_state


def _rows_pass(b, t, hq, h, d, deg, d_tile, c, gating, seed):
    """Float64 forward + rows pass on inputs padded to a multiple of c (as vidrial.autograd pads):
    returns Q (bf16, padded), qscale, dAh, dBh (float64)."""
    gen = torch.Generator().manual_seed(seed)
    tp = -(-t // c) * c
    pad = lambda x: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, tp - t))  # noqa: E731
    Q = pad(torch.randn(b, t, hq, d, generator=gen).bfloat16())
    K = pad(torch.randn(b, t, h, d, generator=gen).bfloat16())
    V = pad(torch.randn(b, t, h, d, generator=gen).bfloat16())
    lg = pad(torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=F64) + 1.0)) if gating else None
    dY = pad(torch.randn(b, t, hq, d, generator=gen, dtype=F64))
    scale = 1.0 / math.sqrt(d)
    f = em.forward_pieces(Q, K, V, lg, deg, scale, c, d_tile)
    n = tp // c
    g = f["g"] if gating else torch.zeros(b, tp, h, dtype=F64)
    _, _, _, dAh, dBh, qscale, _ = em.qs_bwd_rows(Q.double(), g, f["Sbar"][:, :n], f["sbar"][:, :n], f["O"], f["l"],
                                                  f["m"], f["Y"], dY, deg, d_tile, scale, c)
    return Q, qscale, dAh, dBh, scale


# d, deg, d_tile, r (GQA), gating, t, chunk: partial last chunks (t < n c), p = 4 at a small D
CASES = [(32, 2, 8, 1, True, 40, 16), (32, 2, 8, 4, False, 48, 16), (64, 2, 8, 4, True, 44, 16),
         (64, 2, 8, 1, False, 64, 32), (32, 4, 2, 1, True, 24, 16), (32, 4, 2, 4, False, 32, 16)]


@pytest.mark.parametrize("d,deg,d_tile,r,gating,t,c", CASES)
def test_state_pass_matches_emulation(d, deg, d_tile, r, gating, t, c, monkeypatch):
    b, h = 2 if deg == 2 else 1, 2 if r == 1 else 1
    hq = h * r
    Q, qscale, dAh, dBh, scale = _rows_pass(b, t, hq, h, d, deg, d_tile, c, gating, seed=d + t)
    want_S, want_s = em.qs_bwd_state(Q.double(), qscale, dAh, dBh, h, deg, d_tile, scale, c)
    args = (Q, qscale.float(), dAh.float(), dBh.float(), h)
    kw = dict(deg=deg, d_tile=d_tile, scale=scale, chunk_size=c)

    # exact w.r.t. its bf16 inputs: the layout, the GQA sum and the folded factors are right
    monkeypatch.setattr(mod, "update_state", emulated_update_state(round_phi=False))
    dS, ds = mod.state_pass_update_state(*args, **kw)
    Kp, Vp = mod.state_pass_inputs(Q, args[1], args[2], h, scale=scale, chunk_size=c)
    n = Q.shape[1] // c

    def as_rows(x):  # [b, n*r*c, h, d] view of [b, h, n, r, c, d] -> [b, t, hq, d]
        return x.transpose(1, 2).reshape(b, h, n, r, c, d).permute(0, 2, 4, 1, 3, 5).reshape(Q.shape)

    ones = torch.ones_like(qscale)
    exact_S, exact_s = em.qs_bwd_state(as_rows(Kp).double(), ones, as_rows(Vp).double(), dBh.float().double(), h,
                                       deg, d_tile, 1.0, c)
    assert dS.dtype == ds.dtype == torch.float32 and dS.is_contiguous() and ds.is_contiguous()
    assert dS.shape == want_S.shape and ds.shape == want_s.shape
    assert rel(dS, exact_S) < 1e-6 and rel(ds, exact_s) < 1e-5
    assert rel(as_rows(Kp), Q.double() * (scale * qscale).unsqueeze(-1)) < 4e-3  # bf16 rounding only

    # bf16 error budget of the kernel's arithmetic vs float64 (bf16 inputs and phi, fp32 sums)
    monkeypatch.setattr(mod, "update_state", emulated_update_state(round_phi=True))
    dS, ds = mod.state_pass_update_state(*args, **kw)
    assert rel(dS, want_S) < 1e-2 and rel(ds, want_s) < 1e-2, (rel(dS, want_S), rel(ds, want_s))


def _autograd(Q, K, V, lg, dY, deg, scale, c, d_tile):
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (Q, K, V, lg)]
    out = power_retention_reference(*leaves, deg=deg, scale=scale, chunk_size=c, d_tile=d_tile)
    (out * dY).sum().backward()
    return [x.grad if x is not None else None for x in leaves]


@pytest.mark.parametrize("d,deg,d_tile,r,t,c", [(32, 2, 8, 4, 40, 16), (64, 2, 8, 1, 60, 32), (32, 4, 2, 2, 24, 16)])
def test_full_backward_with_update_state_pass_matches_autograd(d, deg, d_tile, r, t, c, monkeypatch):
    """The emulated backward (bwd_emulation.emulate_backward) with its state pass replaced by this one
    (bf16-faithful update_state), padded like vidrial.autograd, vs float64 autograd of the reference."""
    b, h = 1, 2 if deg == 2 else 1
    hq = h * r
    gen = torch.Generator().manual_seed(t + d)
    Q, K, V = (torch.randn(b, t, x, d, generator=gen, dtype=F64) for x in (hq, h, h))
    base = torch.linspace(-2.0, 1.0, t, dtype=F64)[None, :, None]  # a gate that varies across chunks
    lg = torch.nn.functional.logsigmoid(base + torch.randn(b, t, h, generator=gen, dtype=F64))
    dY = torch.randn(b, t, hq, d, generator=gen, dtype=F64)
    scale = 0.8 / math.sqrt(d)
    monkeypatch.setattr(mod, "update_state", emulated_update_state(round_phi=True))

    def state_pass(Q, qscale, dAh, dBh, h, deg, d_tile, scale, c):
        dS, ds = mod.state_pass_update_state(Q.bfloat16(), qscale.float(), dAh.float(), dBh.float(), h, deg=deg,
                                             d_tile=d_tile, scale=scale, chunk_size=c)
        return dS.double(), ds.double()  # the fp32 outputs, into the float64 emulation of the rest

    monkeypatch.setattr(em, "qs_bwd_state", state_pass)
    tp = -(-t // c) * c
    padded = [torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, tp - t)) for x in (Q, K, V, lg, dY)]
    got = em.emulate_backward(*padded, deg=deg, scale=scale, chunk_size=c, d_tile=d_tile)
    want = _autograd(Q, K, V, lg, dY, deg, scale, c, d_tile)
    errs = {k: rel(got[k][:, :t], w) for k, w in zip(("dQ", "dK", "dV", "dlog_G"), want)}
    assert max(errs.values()) < 1e-2, errs  # the GPU fwd+bwd tests allow 2e-2


def test_inputs_are_what_update_state_accepts():
    b, t, h, r, d, c = 2, 64, 3, 2, 64, 32
    gen = torch.Generator().manual_seed(0)
    Q = torch.randn(b, t, h * r, d, generator=gen).half()  # fp16 inputs still give bf16 operands
    qscale, dAh = torch.rand(b, t, h * r, generator=gen), torch.randn(b, t, h * r, d, generator=gen)
    Kp, Vp = mod.state_pass_inputs(Q, qscale, dAh, h, scale=0.125, chunk_size=c)
    T = t * r
    for x in (Kp, Vp):
        assert x.dtype == torch.bfloat16 and x.shape == (b, T, h, d)
        assert x.stride() == (h * T * d, d, T * d, 1) and x.data_ptr() % 16 == 0
    # rows of chunk nu of KV head j: the r query heads j*r .. j*r+r-1 at times nu*c .. nu*c+c-1
    assert torch.equal(Vp[1, r * c + c + 5, 2], dAh[1, c + 5, 2 * r + 1].bfloat16())  # nu=1, j=1, tau=5
    # every launcher check passes; only the device is refused on the CPU ...
    with pytest.raises(InputError, match=r"^K: got device cpu; expected a CUDA tensor"):
        real_update_state(Kp, Vp, None, deg=2, d_tile=8, chunk_size=r * c)
    # ... which is not what a bad layout gets
    with pytest.raises(InputError, match=r"^K: got strides"):
        real_update_state(Kp[..., 1:33], Vp[..., 1:33], None, deg=2, d_tile=8, chunk_size=r * c)


@pytest.mark.parametrize("deg,d_tile", [(2, 8), (4, 2)])
def test_weighted_feature_sums_in_batches(deg, d_tile, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 24, 32, generator=gen).bfloat16()
    w = torch.randn(5, 24, generator=gen)
    want = torch.einsum("mRD,mR->mD", phi(X, deg, d_tile), w.double())
    monkeypatch.setattr(mod, "MOMENT_ELEMS", 1)  # one (chunk, head) per batch: the loop's edges
    got = mod.weighted_feature_sums(X, w, deg=deg, d_tile=d_tile)
    assert got.dtype == torch.float32 and rel(got, want) < 1e-6


def test_update_state_kernels_for_the_state_pass_compile():
    """The update_state kernels this path launches (no gating, chunk r*c) compile for sm_80/sm_90
    without spills: shape A (r=1, c=1024), GQA 4 at c=1024, d=128, p=4, and r*c = 304 (tile_k 16)."""
    from vidrial.core.compile import CompiledKernel, compile_many
    from vidrial.kernels.power_retention.update_state import UpdateStateKey, family

    jobs = []
    for d, p, dt, chunk in ((64, 2, 8, 1024), (64, 2, 8, 4096), (128, 2, 8, 256), (32, 4, 4, 512), (64, 2, 8, 304)):
        key = UpdateStateKey(head_dim=d, deg=p, d_tile=dt, dtype="bfloat16", chunk_size=chunk, gating=False)
        cfg = family.default_config(key)
        for arch in ("sm_80", "sm_90"):
            family.check(key, cfg, arch)
            jobs.append((family.render(key, cfg), arch, (), key.label()))
    results = compile_many(jobs)
    bad = [str(r)[:500] for r in results if not isinstance(r, CompiledKernel)]
    assert not bad, bad[0]
    assert not [r.facts for r in results if r.facts.spills]


@pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")
def test_backward_op_on_cpu_with_update_state_pass(monkeypatch):
    """vidrial::power_retention_bwd on the CPU (other kernels host-executed, real launchers and glue):
    query_state_bwd must route its state pass here; gradients vs float64 autograd."""
    calls = []
    emulated = emulated_update_state(round_phi=True)

    def counted(*args, **kwargs):
        calls.append(kwargs["chunk_size"])
        return emulated(*args, **kwargs)

    monkeypatch.setattr(mod, "update_state", counted)
    for name, err in kernels_cpu._backward_op_errors(True, True, 2, 48, update_state=counted).items():
        assert err < 2e-2, f"{name}: {err:.3e}"
    assert calls == [2 * 48]  # one update_state chunk per (chunk, KV head): r * c rows


def test_state_pass_errors():
    with pytest.raises(InputError, match=r"^Q: .*head_dim in \(32, 64, 128\)"):
        mod.check_supported(96, 1, 64)
    with pytest.raises(InputError, match=r"^chunk_size: .*multiple of 16"):
        mod.check_supported(64, 1, 40)


def test_split_bf16_gram_is_near_fp32():
    """p = 4's moment GEMM on bf16 halves: Z = x (x) x of bf16 x splits exactly into hi + lo, and the three
    products stay within ~2^-16 of the float64 Gram matrix (signed weights: cancellation included)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 96, 16, generator=gen).bfloat16().float()
    Z = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    hi = Z.bfloat16()
    assert torch.equal(hi.float() + torch.sub(Z, hi, out=torch.empty_like(hi)).float(), Z)
    W = Z * torch.randn(3, 96, 1, generator=gen)
    want = Z.double().transpose(1, 2) @ W.double()
    got = mod.split_bf16_gram(Z, W)
    assert got.dtype == torch.float32 and rel(got, want) < 2e-5
    assert rel(Z.bfloat16().float().transpose(1, 2) @ W.bfloat16().float(), want) > 1e-3  # plain bf16 would not
