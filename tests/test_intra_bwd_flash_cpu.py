"""intra_chunk_attention_bwd (FlashAttention-2 style on tensor cores) on the CPU (no GPU needed).

* the host shim's PTX emulation (tests/bwd_host_emu.py: mma.sync m16n8k16 bf16/f16, ldmatrix(.trans),
  cp.async, the C -> A fragment reuse) against a plain matmul, through a one-warp test kernel;
* the same emulation runs the GPU-verified forward kernel (templates/intra_chunk_attention.cu.j2, same
  primitives) to the float64 reference: the emulated semantics are the hardware's, as far as they go;
* the flash kernels executed on the CPU against the float64 emulation (bwd_emulation.intra_bwd), both
  exact and with the kernel's bf16 operand rounding, outputs poisoned with NaN before the run;
* the launcher (fp16 inputs, the quadratic path) against the float64 emulation (the whole backward op:
  tests/test_backward_kernels_cpu.py);
* the emulation catches a missing cp.async wait, a wrong mask and a wrong ldmatrix (mutated sources).
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from vidrial.core.errors import ConfigError
from vidrial.core.render import RenderedKernel, environment
from vidrial.reference import backward as em
from vidrial.kernels.power_retention.intra_chunk_attention_bwd import (
    FAMILY as IB,
    IntraBwdConfig,
    IntraBwdKey,
    flash_default,
)

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402

F64 = torch.float64
NAN = float("nan")
pytestmark = pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")


def rel(got, want) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values (unwritten outputs are NaN)"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# ---- the PTX emulation against a plain matmul -------------------------------------------------------
_MMA_TEST = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
{% include "common/ptx.cuh" %}
{% include "common/elem.cuh" %}
{% include "common/tiles.cuh" %}
using namespace vd;
// one warp: A [16][32], Bt [16][32], Bk [32][16] b16 -> C1 = A Bt^T, C2 = A Bk, C3 = bf16(C1) Bk[0:16] (fp32 [16][16])
extern "C" __global__ void {{ entry }}(const __nv_bfloat16* A, const __nv_bfloat16* Bt, const __nv_bfloat16* Bk,
                                       float* C1, float* C2, float* C3) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const u32 sA = smem_u32(smem_raw), sBt = sA + 16 * 32 * 2, sBk = sBt + 16 * 32 * 2;
  vd::load_tile<16, 32, 32>(sA, A, 32, 16, A);
  vd::load_tile<16, 32, 32>(sBt, Bt, 32, 16, A);
  cp_async_commit();
  vd::load_tile<32, 16, 32>(sBk, Bk, 16, 32, A);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  float c1[2][4] = {}, c2[2][4] = {}, c3[2][4] = {};
  for (int kk = 0; kk < 2; ++kk) {
    u32 a[4], b[4];
    vd::frag_a<32>(a, sA, 0, kk, lane);
    vd::frag_b<32>(b, sBt, 0, kk, lane);
    {{ mma }}(c1[0], a, b[0], b[1]);
    {{ mma }}(c1[1], a, b[2], b[3]);
    vd::frag_bt<16>(b, sBk, kk * 16, 0, lane);
    {{ mma }}(c2[0], a, b[0], b[1]);
    {{ mma }}(c2[1], a, b[2], b[3]);
  }
  u32 a[4], b[4];
  vd::acc_to_a(a, c1[0], c1[1]);
  vd::frag_bt<16>(b, sBk, 0, 0, lane);
  {{ mma }}(c3[0], a, b[0], b[1]);
  {{ mma }}(c3[1], a, b[2], b[3]);
  for (int nb = 0; nb < 2; ++nb)
    for (int e = 0; e < 4; ++e) {
      const int o = (g + 8 * (e >> 1)) * 16 + nb * 8 + 2 * t + (e & 1);
      C1[o] = c1[nb][e]; C2[o] = c2[nb][e]; C3[o] = c3[nb][e];
    }
}
"""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ptx_emulation_against_matmul(dtype):
    mma = "mma_16816_bf16" if dtype == torch.bfloat16 else "mma_16816_f16"
    entry = f"mma_emu_test_{mma}"
    src = environment().from_string(_MMA_TEST).render(entry=entry, mma=mma)
    launch = bwd_host_emu.host_kernel(RenderedKernel(entry=entry, source=src, template="test"), ("ptr",) * 6)
    gen = torch.Generator().manual_seed(0)
    A, Bt, Bk = (torch.randn(*s, generator=gen).to(dtype) for s in ((16, 32), (16, 32), (32, 16)))
    C1, C2, C3 = (torch.full((16, 16), NAN) for _ in range(3))
    launch(1, 32, (2 * 16 * 32 + 32 * 16) * 2, (A, Bt, Bk, C1, C2, C3))
    w1 = A.double() @ Bt.double().T
    assert rel(C1, w1) < 1e-6 and rel(C2, A.double() @ Bk.double()) < 1e-6
    if dtype == torch.bfloat16:  # acc_to_a packs bf16
        assert rel(C3, C1.bfloat16().double() @ Bk[:16].double()) < 1e-6


def test_forward_kernel_runs_on_the_emulation():
    """The forward kernel (GPU-verified on the H200) uses the same PTX; on the emulation it must
    match the float64 reference."""
    from vidrial.kernels.power_retention import intra_chunk_attention as ica
    from vidrial.reference.forward import intra_chunk_attention_reference

    b, h, hq, d, deg, c, t = 1, 1, 2, 32, 2, 64, 120
    gen = torch.Generator().manual_seed(1)
    Q = torch.randn(b, t, hq, d, generator=gen).bfloat16()
    K, V = (torch.randn(b, t, h, d, generator=gen).bfloat16() for _ in range(2))
    lg = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen) + 1.0)
    scale = 1 / math.sqrt(d)
    undo = bwd_host_emu.install()  # the launcher's own plan (checks, key, grid, arguments), run on the host
    try:
        O, L, M = ica.intra_chunk_attention(Q, K, V, lg, deg=deg, scale=scale, chunk_size=c,
                                            out=tuple(torch.full(s, NAN) for s in ((b, t, hq, d), (b, t, hq), (b, t, hq))))
    finally:
        undo()
    Or, lr, mr = intra_chunk_attention_reference(Q, K, V, lg.double(), deg, scale, c)
    assert rel(O, Or) < 3e-3 and rel(L, lr) < 1e-5 and rel(M, mr) < 1e-5


# ---- the flash kernels on the CPU --------------------------------------------------------------------
def _problem(d, deg, c, gqa, gating, n=2, pad=7, seed=4):
    b, h = 1, 1
    hq, t = h * gqa, n * c - pad  # a partial last chunk
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(b, t, hq, d, generator=gen).bfloat16()
    K, V = (torch.randn(b, t, h, d, generator=gen).bfloat16() for _ in range(2))
    from vidrial.reference.forward import intra_chunk_attention_reference

    lg = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=F64) + 1.0) if gating else None
    _, _, m = intra_chunk_attention_reference(Q, K, V, lg, deg, 1 / math.sqrt(d), c)
    dO = torch.randn(b, t, hq, d, generator=gen)
    dl = torch.randn(b, t, hq, generator=gen)
    g = None
    if gating:
        gp = torch.nn.functional.pad(lg, (0, 0, 0, n * c - t)).reshape(b, n, c, h).cumsum(2).reshape(b, n * c, h)
        g = gp[:, :t].float().contiguous()
    return dict(Q=Q, K=K, V=V, g=g, m=m.float(), dO=dO, dl=dl, n=n, c=c, gqa=gqa, deg=deg, scale=1 / math.sqrt(d))


def _emulate(p, bf16_operands, want_dgrow=False):
    t = p["Q"].shape[1]
    pad = p["n"] * p["c"] - t
    P = lambda x: torch.nn.functional.pad(x.double(), (0, 0) * (x.dim() - 2) + (0, pad))  # noqa: E731
    out = em.intra_bwd(P(p["Q"]), P(p["K"]), P(p["V"]), None if p["g"] is None else P(p["g"]), P(p["m"]), P(p["dO"]),
                       P(p["dl"]), p["deg"], p["scale"], p["c"], bf16_operands=bf16_operands, want_dgrow=want_dgrow)
    return [x[:, :t] for x in out]


def _run_flash(p, cfg_kv, cfg_q, render=None, stages=("dkv", "dq")):
    """The passes as the launcher runs them (dO as a row scale times a bf16 dY), outputs poisoned with NaN."""
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import flash_dO_operands

    Q, K, V = p["Q"], p["K"], p["V"]
    dY, alpha = flash_dO_operands(p["dO"], None, Q.dtype)
    b, t, hq, d = Q.shape
    h = K.shape[2]
    gated = p["g"] is not None
    out = dict(dQ=torch.full((b, t, hq, d), NAN), dK=torch.full((b, t, h, d), NAN),
               dV=torch.full((b, t, h, d), NAN), dg=torch.full((b, t, h), NAN) if gated else None,
               dgrow=torch.full((b, t, hq), NAN) if gated else None)
    for stage, cfg, heads, dg in (("dkv", cfg_kv, h, out["dg"]), ("dq", cfg_q, hq, out["dgrow"])):
        if stage not in stages:
            continue
        key = IntraBwdKey(head_dim=d, deg=p["deg"], stage=stage)
        launch = bwd_host_emu.host_kernel((render or IB.render)(key, cfg), IB.signature)
        tiles = -(-p["c"] // cfg.tile)
        launch(b * heads * p["n"] * tiles, IB.threads_per_block(cfg), IB.dynamic_smem_bytes(key, cfg),
               (Q, K, V, p["g"], p["m"], dY, p["dl"], alpha, out["dQ"], out["dK"], out["dV"], dg, t, p["n"],
                p["c"], hq, p["gqa"], tiles, p["scale"]))
    return out


CASES = [  # d, deg, chunk, gqa, gating, dkv config, dq config (None: flash_default)
    (32, 2, 64, 2, True, None, None),
    (64, 2, 128, 2, True, None, None),
    (32, 4, 96, 1, False, dict(tile=32, step=16, warps=2), dict(tile=32, step=16, warps=1)),
    (64, 2, 128, 1, True, dict(tile=128, step=16, warps=4), dict(tile=128, step=32, warps=4)),  # 32 rows per warp
    (128, 2, 64, 1, True, None, None),
    (32, 2, 80, 1, True, dict(tile=32, step=32, warps=1), dict(tile=64, step=64, warps=2)),  # c % tile != 0
]


@pytest.mark.parametrize("d,deg,c,gqa,gating,kv,q", CASES)
def test_flash_kernels_on_cpu(d, deg, c, gqa, gating, kv, q):
    p = _problem(d, deg, c, gqa, gating)
    cfgs = [IntraBwdConfig(**x) if x else flash_default(IntraBwdKey(head_dim=d, stage=st))
            for x, st in ((kv, "dkv"), (q, "dq"))]
    for cfg, st in zip(cfgs, ("dkv", "dq")):
        IB.check(IntraBwdKey(head_dim=d, deg=deg, stage=st), cfg, "sm_90")
    out = _run_flash(p, *cfgs)
    exact, rounded = _emulate(p, False, True), _emulate(p, True, True)
    for i, name in enumerate(("dQ", "dK", "dV", "dg", "dgrow")):
        if out[name] is None:
            continue
        # the algorithm up to fp32 accumulation (and rare bf16 rounding-boundary flips of P, ds) ...
        assert rel(out[name], rounded[i]) < 1e-3, name
        # ... and the exact gradients within bf16 operand precision
        assert rel(out[name], exact[i]) < 6e-3, name
    if gating:  # the row and column parts of the gate gradient cancel over each chunk (same P, dP)
        t, n = p["Q"].shape[1], p["n"]
        pad = n * c - t
        chunk_sum = lambda x: torch.nn.functional.pad(x.double().sum(-1), (0, pad)).view(n, c).sum(1)  # noqa: E731
        resid = chunk_sum(out["dgrow"][0]) + chunk_sum(out["dg"][0])
        assert (resid.abs() <= 1e-5 * chunk_sum(out["dgrow"][0].abs())).all(), resid


@pytest.mark.parametrize("mutation", [
    ("cp_async_wait<1>();\n    __syncthreads();", "cp_async_wait<2>();\n    __syncthreads();"),  # data not waited for
    ("const bool ok = j <= i && i < lim;", "const bool ok = j < i && i < lim;"),  # mask drops the diagonal
    ("ldmatrix_x4_trans(b[0], b[1], b[2], b[3]", "ldmatrix_x4(b[0], b[1], b[2], b[3]"),  # B not transposed
])
def test_emulation_catches_kernel_bugs(mutation):
    old, new = mutation

    def render(key, cfg):
        r = IB.render(key, cfg)
        assert old in r.source
        return RenderedKernel(entry=r.entry, source=r.source.replace(old, new), template=r.template)

    p = _problem(32, 2, 64, 1, True)
    cfg = flash_default(IntraBwdKey(head_dim=32))
    out = _run_flash(p, cfg, cfg, render=render, stages=("dkv",))  # the dq pass shares the mutated code
    want = _emulate(p, True)
    errs = [rel(out[k], w) if torch.isfinite(out[k]).all() else math.inf for k, w in zip(("dK", "dV"), want[1:3])]
    assert max(errs) > 0.1, errs
    assert rel(_run_flash(p, cfg, cfg, stages=("dkv",))["dK"], want[1]) < 1e-3  # the unmutated kernel passes


# ---- launcher and the backward op ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype,chunk", [(torch.float16, 48), (torch.bfloat16, None)])
def test_launcher_flash_against_float64(dtype, chunk):
    """The launcher (fp16 inputs; the quadratic path chunk=None) executed on the CPU against the float64
    emulation on the same inputs."""
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import intra_chunk_attention_bwd

    p = _problem(32, 2, 48, 2, True, n=2, pad=5)
    Q, K, V = (p[k].to(dtype) for k in ("Q", "K", "V"))
    # the quadratic path (one chunk of the whole sequence) takes global cumulative gates
    g = p["g"] if chunk else -torch.rand(1, Q.shape[1], 1, generator=torch.Generator().manual_seed(6)).cumsum(1) * 0.2
    undo = bwd_host_emu.install()
    try:
        out = intra_chunk_attention_bwd(Q, K, V, g, p["m"], p["dO"], p["dl"], deg=2, scale=p["scale"],
                                        chunk_size=chunk, config=flash_default(IntraBwdKey(head_dim=32)),
                                        dq_config=flash_default(IntraBwdKey(head_dim=32, stage="dq")))
    finally:
        undo()
    t = Q.shape[1]
    c = chunk or t
    pad = -(-t // c) * c - t
    P = lambda x: torch.nn.functional.pad(x.double(), (0, 0) * (x.dim() - 2) + (0, pad))  # noqa: E731
    want = em.intra_bwd(P(Q), P(K), P(V), P(g), P(p["m"]), P(p["dO"]), P(p["dl"]), 2, p["scale"], c)
    for name, a, w in zip(("dQ", "dK", "dV", "dg"), out, want):
        assert rel(a, w[:, :t]) < 6e-3, name


def test_launcher_flash_fp16_small_diagonal_scores():
    """fp16 inputs whose chunk-first rows have a small score x_ii = s q_i.k_i (P_ii alone, normalised by
    e^-m_i = x_ii^-2, so dQ_i ~ dP / x_ii): S = Q K^T must use the fp16 values as given (an fp16 mma).
    Rounded to bf16 first (the launcher did so before), dQ and dK were off by 22% against float64."""
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import intra_chunk_attention_bwd
    from vidrial.reference.forward import intra_chunk_attention_reference

    d, c, t, hq, h = 32, 32, 91, 2, 1
    gen = torch.Generator().manual_seed(3)
    Q, K = torch.randn(1, t, hq, d, generator=gen, dtype=F64), torch.randn(1, t, h, d, generator=gen, dtype=F64)
    V = torch.randn(1, t, h, d, generator=gen).half()
    for i in range(0, t, c):  # q_i.k_i = 0.004 |q_i| |k_i|
        k = K[0, i, 0]
        q = Q[0, i]
        Q[0, i] = q - (q @ k)[:, None] / (k @ k) * k + 0.004 * q.norm(dim=-1, keepdim=True) / k.norm() * k
    Q, K = Q.half(), K.half()
    lg = torch.nn.functional.logsigmoid(torch.randn(1, t, h, generator=gen, dtype=F64) + 2.0)
    scale = 1 / math.sqrt(d)
    m = intra_chunk_attention_reference(Q, K, V, lg, 2, scale, c)[2].float()
    dO, dl = torch.randn(1, t, hq, d, generator=gen), torch.randn(1, t, hq, generator=gen)
    n = -(-t // c)
    pad = n * c - t
    G = torch.nn.functional.pad(lg, (0, 0, 0, pad)).reshape(1, n, c, h).cumsum(2).reshape(1, n * c, h)[:, :t]
    G = G.float().contiguous()
    key = IntraBwdKey(head_dim=d, dtype="float16")
    undo = bwd_host_emu.install()
    try:
        out = intra_chunk_attention_bwd(Q, K, V, G, m, dO, dl, deg=2, scale=scale, chunk_size=c,
                                        config=flash_default(key),
                                        dq_config=flash_default(key.model_copy(update={"stage": "dq"})))
    finally:
        undo()
    P = lambda x: torch.nn.functional.pad(x.double(), (0, 0) * (x.dim() - 2) + (0, pad))  # noqa: E731
    want = em.intra_bwd(P(Q), P(K), P(V), P(G), P(m), P(dO), P(dl), 2, scale, c)
    for name, got, w in zip(("dQ", "dK", "dV", "dg"), out, want):
        assert rel(got, w[:, :t]) < 6e-3, name


def test_flash_config_rules():
    with pytest.raises(Exception, match="warps"):
        IntraBwdConfig(tile=64, warps=1)  # 64 rows per warp
    with pytest.raises(Exception, match="step"):
        IntraBwdConfig(step=8)
    with pytest.raises(ConfigError, match="step"):
        IB.check(IntraBwdKey(head_dim=128), IntraBwdConfig(tile=64, step=64), "sm_90")
    with pytest.raises(ConfigError, match="head_dim"):
        IB.check(IntraBwdKey(head_dim=48), IntraBwdConfig(), "sm_90")
    assert IB.threads_per_block(IntraBwdConfig(tile=128, warps=8)) == 256
