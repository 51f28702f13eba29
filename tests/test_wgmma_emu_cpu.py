"""The host emulation of Hopper's warpgroup MMA (tests/bwd_host_emu.py: wgmma.mma_async m64nNk16, A from
registers, B through shared-memory descriptors; commit / wait groups) on the CPU:

* a one-warpgroup test kernel against float64 matmuls: the three B layouts the kernels use (128-byte
  swizzle K-major and MN-major, the MN-major second 64 columns one leading offset further, no swizzle
  K-major core matrices), bf16 and f16, chains of scale_d = 1 wgmmas across commit groups;
* what the emulated asynchrony catches: accumulators read before their wait are NaN, a B tile
  overwritten before the wait that covers its reader gives wrong results, and a layout the emulation does
  not know aborts with a message;
* the GPU-verified (H200) sm_90a kernels executed on the host against their float64 references:
  update_state_bwd impl='wgmma' (its kernel and its launcher), query_state_bwd's rows pass impl='wgmma',
  and the forward update_state / query_state impl='wgmma' (N = 72, 128, 136 with the leading offset to
  the next 64 columns, N = 8 without swizzle); update_state's also against its mma_sync kernel (same
  operands: equal to fp32 rounding);
* a weakened or missing wgmma_wait in update_state_bwd's kernel (mutated source) shows as NaN outputs.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from vidrial.core.render import RenderedKernel, environment
from vidrial.reference import backward as em
from vidrial.kernels.power_retention.sympow import block_table, layout

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402

F64 = torch.float64
NAN = float("nan")
pytestmark = pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")

# ---- the emulation against matmuls ----------------------------------------------------------------
_WG_TEST = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
{% include "common/ptx.cuh" %}
{% include "common/elem.cuh" %}
{% include "common/wgmma.cuh" %}
using namespace vd;
using T = {{ T }};
// One warpgroup. A, A2, B0, B1 [64][64], B3 [8][16] (16-bit T), C2 [64][64] fp32. Shared memory: B0, B1 as
// 64 rows of 128 bytes (16-byte chunk c of row r at chunk c ^ (r % 8)), 8 KB apart, then B3 as two core
// matrices (8 rows x 16 bytes: k 0-7, then k 8-15 128 bytes further).
//   D1 = A B0^T        K-major, 128B swizzle (as update_state_bwd's GEMM 1), a chain over two groups
//   D2 = C2 + A2 B0    MN-major, 128B swizzle (as its GEMM 2), scale_d = 1 from the first step
//   D4 = A2 [B0 | B1]  MN-major, N = 128: columns 64.. one leading offset (8 KB) further
//   D3 = A[:, :16] B3^T  K-major, no swizzle, N = 8
// mode 0: as above; 1: D1 stored before any wait; 2: the B0 tile zeroed after the issue, before the waits;
// 3: one more wgmma with a 64B-swizzled descriptor (not emulated). probe[tid] = d1[0] after the wait that
// performs D1's first group only (its later steps still pending).
__device__ __forceinline__ void frag(u32 (&a)[4], const T* M, int s, int row, int t) {
  const unsigned* p = reinterpret_cast<const unsigned*>(M + row * 64 + 16 * s + 2 * t);
  a[0] = p[0]; a[1] = p[8 * 32]; a[2] = p[4]; a[3] = p[8 * 32 + 4];
}
template <int NH>
__device__ __forceinline__ void store(float* D, const float (&d)[NH], int r0, int t) {
  for (int i = 0; i < NH; ++i) D[(r0 + 8 * ((i >> 1) & 1)) * (2 * NH) + 8 * (i >> 2) + 2 * t + (i & 1)] = d[i];
}
extern "C" __global__ void {{ entry }}(const T* A, const T* A2, const T* B0, const T* B1, const T* B3,
                                       const float* C2, float* D1, float* D2, float* D3, float* D4, float* probe,
                                       int mode) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  for (int i = tid; i < 2 * 64 * 8; i += 128) {
    const int m = i >> 9, r = (i >> 3) & 63, c = i & 7;
    const uint4 v = *reinterpret_cast<const uint4*>((m ? B1 : B0) + r * 64 + c * 8);
    sts128(base + m * 8192 + r * 128 + ((c ^ (r & 7)) << 4), v.x, v.y, v.z, v.w);
  }
  if (tid < 16) {
    const int n = tid & 7, kh = tid >> 3;
    const uint4 v = *reinterpret_cast<const uint4*>(B3 + n * 16 + kh * 8);
    sts128(base + 16384 + kh * 128 + n * 16, v.x, v.y, v.z, v.w);
  }
  fence_proxy_async();
  __syncthreads();
  const int r0 = 16 * warp + g;
  float d1[32], d2[32], d3[4], d4[64];
  for (int i = 0; i < 32; ++i) d2[i] = C2[(r0 + 8 * ((i >> 1) & 1)) * 64 + 8 * (i >> 2) + 2 * t + (i & 1)];
  u32 a[4][4], a2[4][4];
  for (int s = 0; s < 4; ++s) {
    frag(a[s], A, s, r0, t);
    frag(a2[s], A2, s, r0, t);
  }
  const u64 dk = smem_desc(base, 16, 1024, SWIZZLE_128B), dmn = smem_desc(base, 8192, 1024, SWIZZLE_128B);
  const u64 dn = smem_desc(base + 16384, 128, 256, SWIZZLE_NONE);
  wgmma_fence();
  for (int s = 0; s < 2; ++s) wgmma_rs_{{ ty }}<0>(d1, a[s], dk + ((32 * s) >> 4), s > 0);
  wgmma_commit();
  for (int s = 2; s < 4; ++s) wgmma_rs_{{ ty }}<0>(d1, a[s], dk + ((32 * s) >> 4), 1);
  for (int s = 0; s < 4; ++s) wgmma_rs_{{ ty }}<1>(d2, a2[s], dmn + ((16 * s * 128) >> 4), 1);
  wgmma_commit();
  wgmma_rs_{{ ty }}<0>(d3, a[0], dn, 0);
  for (int s = 0; s < 4; ++s) wgmma_rs_{{ ty }}<1>(d4, a2[s], dmn + ((16 * s * 128) >> 4), s > 0);
  if (mode == 3) wgmma_rs_{{ ty }}<0>(d3, a[0], smem_desc(base, 16, 1024, SWIZZLE_64B), 1);
  wgmma_commit();
  if (mode == 1) store(D1, d1, r0, t);
  if (mode == 2) {
    for (int i = tid; i < 64 * 8; i += 128) sts128(base + 16 * i, 0u, 0u, 0u, 0u);
    __syncthreads();
  }
  wgmma_wait<2>();
  probe[tid] = d1[0];
  wgmma_wait<0>();
  fence_operands(d1);
  if (mode != 1) store(D1, d1, r0, t);
  store(D2, d2, r0, t);
  store(D3, d3, r0, t);
  store(D4, d4, r0, t);
}
"""
_SIGNATURE = ("ptr",) * 11 + ("i32",)
_SMEM = 2 * 8192 + 256 + 1024


def _wg_test_kernel(dtype):
    ty = "bf16" if dtype == torch.bfloat16 else "f16"
    entry = f"wgmma_emu_test_{ty}"
    src = environment().from_string(_WG_TEST).render(
        entry=entry, ty=ty, T="__nv_bfloat16" if ty == "bf16" else "__half", wgmma_ns=(8, 64, 128))
    return bwd_host_emu.host_kernel(RenderedKernel(entry=entry, source=src, template="test"), _SIGNATURE)


def _run_wg_test(dtype, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ins = dict(A=(64, 64), A2=(64, 64), B0=(64, 64), B1=(64, 64), B3=(8, 16))
    x = {k: torch.randn(*s, generator=gen).to(dtype) for k, s in ins.items()}
    x["C2"] = torch.randn(64, 64, generator=gen)
    out = dict(D1=torch.full((64, 64), NAN), D2=torch.full((64, 64), NAN), D3=torch.full((64, 8), NAN),
               D4=torch.full((64, 128), NAN), probe=torch.zeros(128))
    _wg_test_kernel(dtype)(1, 128, _SMEM, (*x.values(), *out.values(), mode))
    return x, out


def _check_exact(got, want, bound, steps):
    """|got - want| within `steps` fp32 roundings (one per wgmma: exact products, one sum) of the
    magnitudes `bound` (sum |a b| + |c|)."""
    assert torch.isfinite(got).all(), "non-finite values (unwritten or poisoned accumulators)"
    err = (got.double() - want).abs()
    tol = steps * 2.0 ** -24 * bound + 1e-30
    assert (err <= tol).all(), f"max err / tol = {(err / tol).max().item():.2f}"
    assert (err.norm() / want.norm()).item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_emulation_against_matmul(dtype):
    x, out = _run_wg_test(dtype, 0)
    A, A2, B0, B1, B3 = (x[k].double() for k in ("A", "A2", "B0", "B1", "B3"))
    C2 = x["C2"].double()
    _check_exact(out["D1"], A @ B0.T, A.abs() @ B0.abs().T, 4)                 # K-major, 128B, chained
    _check_exact(out["D2"], C2 + A2 @ B0, C2.abs() + A2.abs() @ B0.abs(), 4)   # MN-major, 128B, from C
    B01 = torch.cat([B0, B1], 1)
    _check_exact(out["D4"], A2 @ B01, A2.abs() @ B01.abs(), 4)                 # N = 128: LBO
    _check_exact(out["D3"], A[:, :16] @ B3.T, A[:, :16].abs() @ B3.abs().T, 1)  # K-major, no swizzle
    # after the wait that performed D1's first group, its later steps are still pending: undefined (NaN)
    assert out["probe"].isnan().all()


def test_wgmma_accumulators_read_before_the_wait_are_poisoned():
    x, out = _run_wg_test(torch.bfloat16, 1)
    assert out["D1"].isnan().all()
    A2, B0 = x["A2"].double(), x["B0"].double()
    _check_exact(out["D2"], x["C2"].double() + A2 @ B0, x["C2"].double().abs() + A2.abs() @ B0.abs(), 4)


def test_wgmma_reads_b_at_the_wait():
    """B is read when the wait performs the wgmma: a tile overwritten after the issue, before the wait
    that covers its readers, shows in their results (as it may on the GPU)."""
    x, out = _run_wg_test(torch.bfloat16, 2)
    assert (out["D1"] == 0).all() and torch.equal(out["D2"], x["C2"])
    A2, B1 = x["A2"].double(), x["B1"].double()
    assert (out["D4"][:, :64] == 0).all()
    _check_exact(out["D4"][:, 64:], A2 @ B1, A2.abs() @ B1.abs(), 4)


def test_wgmma_unemulated_layout_aborts_with_a_message():
    """A descriptor whose layout the emulation does not decode (64-byte swizzle) aborts the process with a
    message naming it, instead of computing something (run in a child process: abort ends it)."""
    code = ("import sys, torch; sys.path.insert(0, %r); import test_wgmma_emu_cpu as t; "
            "t._run_wg_test(torch.bfloat16, 3)" % os.path.dirname(__file__))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "B layout not emulated" in res.stderr, res.stderr[-2000:]


# ---- update_state_bwd impl='wgmma' on the CPU ------------------------------------------------------
TOL = 1e-2        # vs float64 with the fp32 dS (the launcher's bf16 copy of dS, bf16 phi(k) for dV)
TOL_EXACT = 1e-4  # dK and E vs float64 on the kernel's own bf16 dS (and bf16 V): fp32 sums of exact products


def _us_problem(b, h, c, n, gating, dtype, seed):
    d, deg, d_tile = 64, 2, 8
    t, D = n * c, layout(d, deg, d_tile).feature_dim
    gen = torch.Generator().manual_seed(seed)
    K = (torch.randn(b, t, h, d, generator=gen) * 0.7).to(dtype)
    V = torch.randn(b, t, h, d, generator=gen).to(dtype)
    dS = torch.randn(b, n, h, D, d, generator=gen) * 0.1
    ds = torch.randn(b, n, h, D, generator=gen) * 0.1
    g = None
    if gating:
        base = torch.linspace(-2.0, 0.5, t, dtype=F64)[None, :, None]
        lg = torch.nn.functional.logsigmoid(base + torch.randn(b, t, h, generator=gen, dtype=F64))
        g = lg.reshape(b, n, c, h).cumsum(2).reshape(b, t, h).float()
    return K, V, g, dS, ds


def _rel(got, want):
    assert torch.isfinite(got).all(), "NaN (unwritten) or inf"
    got, want = got.to(F64), want.to(F64)
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _us_check(got, K, V, g, dS, ds, c):
    g64 = None if g is None else g.double()
    Vb = V.bfloat16().double()  # the kernel's A operand: V rounded to bf16 (fp16 inputs too)
    want = em.update_state_bwd(K.double(), Vb, g64, dS.double(), ds.double(), 2, 8, c)
    errs = [_rel(x, w) for x, w in zip(got, want) if x is not None]
    assert max(errs) < TOL, errs
    own = em.update_state_bwd(K.double(), Vb, g64, dS.bfloat16().double(), ds.double(), 2, 8, c)
    assert _rel(got[0], own[0]) < TOL_EXACT
    if g is not None:
        assert _rel(got[2], own[2]) < TOL_EXACT
    return errs


@pytest.mark.parametrize("c,n,gating,dtype,warps,stages", [
    (64, 2, True, torch.bfloat16, 4, 4),    # two chunks, one CTA each
    (96, 1, False, torch.bfloat16, 4, 3),   # a partial second CTA (rows 64..95), no gates
    (128, 1, True, torch.float16, 8, 4),    # two warpgroups per CTA, fp16 inputs
], ids=["c64-n2", "c96-partial", "c128-wg2-fp16"])
def test_update_state_bwd_wgmma_on_cpu(c, n, gating, dtype, warps, stages):
    from vidrial.kernels.power_retention.update_state_bwd import FAMILY as UB, UpdateStateBwdKey

    key = UpdateStateBwdKey(head_dim=64, deg=2, d_tile=8, dtype="bfloat16" if dtype == torch.bfloat16 else "float16")
    cfg = UB.Config(impl="wgmma", warps=warps, tile_f=64, stages=stages)
    UB.check(key, cfg, "sm_90")
    b, h = 1, 1
    K, V, g, dS, ds = _us_problem(b, h, c, n, gating, dtype, seed=c + n)
    t, d = n * c, 64
    dK, dV = torch.full((b, t, h, d), NAN), torch.full((b, t, h, d), NAN)
    E = torch.full((b, t, h), NAN)
    rt = -(-c // cfg.rows)
    launch = bwd_host_emu.host_kernel(UB.render(key, cfg), UB.signature)
    launch(b * h * n * rt, UB.threads_per_block(cfg), UB.dynamic_smem_bytes(key, cfg),
           (K, V, g, dS.bfloat16().contiguous(), ds, block_table(d, 2, 8, "cpu"), dK, dV, E, t, n, c, h, rt))
    errs = _us_check((dK, dV, E if gating else None), K, V, g, dS, ds, c)
    print(f"\nus_bwd wgmma {cfg.label()} c={c}: rel err vs float64 (dK, dV[, E]) = "
          + ", ".join(f"{e:.2e}" for e in errs))


def test_update_state_bwd_wgmma_launcher_on_cpu():
    """update_state_bwd with the wgmma config through the launcher (its grid from config.rows = 64 per
    warpgroup, the bf16 copy of dS), routed to the host."""
    from vidrial.kernels.power_retention.update_state_bwd import FAMILY as UB, update_state_bwd

    b, h, c, n = 1, 2, 64, 1
    K, V, g, dS, ds = _us_problem(b, h, c, n, True, torch.bfloat16, seed=9)
    undo = bwd_host_emu.install()
    try:
        got = update_state_bwd(K, V, g, dS, ds, deg=2, d_tile=8, chunk_size=c,
                               config=UB.Config(impl="wgmma", warps=4, tile_f=64, stages=4))
    finally:
        undo()
    _us_check(got, K, V, g, dS, ds, c)


# ---- query_state_bwd's rows pass impl='wgmma' on the CPU --------------------------------------------
QS_TOL = 2e-5  # bf16 operands are exact in the tensor cores (products exact, fp32 sums): fp32-accurate


def _qs_problem(c, n, gqa, gating, seed):
    d, deg, d_tile = 64, 2, 8
    b, h = 1, 1
    hq, t = h * gqa, n * c
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(b, t, hq, d, generator=gen).bfloat16()
    K = torch.randn(b, t, h, d, generator=gen).bfloat16()
    V = torch.randn(b, t, h, d, generator=gen).bfloat16()
    lg = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=F64) + 1.0) if gating else None
    scale = 1.0 / math.sqrt(d)
    f = em.forward_pieces(Q, K, V, lg, deg, scale, c, d_tile)
    dY = torch.randn(b, t, hq, d, generator=gen).bfloat16()
    return dict(Q=Q, g=f["g"], Sb16=f["Sbar"][:, :n].float().bfloat16().contiguous(), sb=f["sbar"].float().contiguous(),
                O=f["O"].float().contiguous(), l=f["l"].float().contiguous(), m=f["m"].float().contiguous(),
                Y=f["Y"].bfloat16().contiguous(), dY=dY, scale=scale, c=c, n=n, gqa=gqa)


@pytest.mark.parametrize("c,n,gqa,gating,warps,stages", [
    (64, 2, 1, True, 4, 4),    # two chunks (the second one's state nonzero)
    (96, 1, 2, True, 4, 3),    # a partial second CTA, GQA
    (128, 2, 1, False, 8, 4),  # two warpgroups per CTA, no gates
], ids=["c64-n2", "c96-gqa2", "c128-wg2"])
def test_query_state_bwd_wgmma_rows_on_cpu(c, n, gqa, gating, warps, stages):
    from vidrial.kernels.power_retention.query_state_bwd import (
        FAMILY as QB, ROW_OUTPUTS, QueryStateBwdKey, rows_reference_outputs)

    key = QueryStateBwdKey(head_dim=64, deg=2, d_tile=8)
    cfg = QB.Config(impl="wgmma", warps=warps, tile_f=64, stages=stages)
    QB.check(key, cfg, "sm_90")
    p = _qs_problem(c, n, gqa, gating, seed=11)
    Q = p["Q"]
    b, t, hq, d = Q.shape
    outs = {k: torch.full((b, t, hq, d), NAN) for k in ("dQ", "dAh")}
    outs.update({k: torch.full((b, t, hq), NAN) for k in ("alpha", "dl", "dBh", "qscale", "dg", "dgs")})
    g = p["g"].float() if p["g"] is not None else None
    rt = -(-c // cfg.rows)
    launch = bwd_host_emu.host_kernel(QB.render(key, cfg), QB.signature)
    launch(b * hq * n * rt, QB.threads_per_block(cfg), QB.dynamic_smem_bytes(key, cfg),
           (Q, g, p["Sb16"], p["sb"], p["O"], p["l"], p["m"], p["Y"], p["dY"], block_table(d, 2, 8, "cpu"),
            outs["dQ"], outs["alpha"], outs["dl"], outs["dAh"], outs["dBh"], outs["qscale"], outs["dg"], outs["dgs"],
            t, n, c, hq, gqa, n, p["sb"].shape[1], rt, p["scale"] ** 2))
    gz = p["g"].float().double() if gating else torch.zeros(b, t, 1, dtype=F64)
    want = rows_reference_outputs(em.qs_bwd_rows(Q.double(), gz, p["Sb16"].double(), p["sb"][:, :n].double(),
                                                 p["O"].double(), p["l"].double(), p["m"].double(), p["Y"].double(),
                                                 p["dY"].double(), 2, 8, p["scale"], c),
                                  p["dY"].double(), p["O"].double(), p["l"].double())
    terms = (want[2].abs() * p["l"].double()).max().item()
    for name, w in zip(ROW_OUTPUTS, want):
        got = outs[name]
        assert torch.isfinite(got).all(), f"{name}: NaN (unwritten) or inf"
        scale = terms if name == "dg" else max(w.abs().max().item(), 1e-20)  # dg: cancelling terms
        err = (got.double() - w).abs().max().item() / scale
        assert err < QS_TOL, f"{name}: {err:.3e}"


@pytest.mark.parametrize("old,new,nan_in", [
    # the step's wait leaves GEMM 2 of kb-1 pending: the stage it reads is refilled (cp.async) before its wait
    # performs it, and the first block's chain reads GEMM 1's accumulators before any wait
    ("wgmma_wait<0>();  // GEMM 1 of kb", "wgmma_wait<1>();  // GEMM 1 of kb", ("dK", "dV")),
    # no wait before the epilogue reads dv
    ("  wgmma_wait<0>();\n  fence_operands(dv);", "  fence_operands(dv);", ("dV",)),
], ids=["step-wait-1", "no-final-wait"])
def test_emulation_catches_a_missing_wgmma_wait(old, new, nan_in):
    """update_state_bwd's wgmma kernel with a wait weakened or removed (mutated source): NaN outputs."""
    from vidrial.kernels.power_retention.update_state_bwd import FAMILY as UB, UpdateStateBwdKey

    key = UpdateStateBwdKey(head_dim=64, deg=2, d_tile=8)
    cfg = UB.Config(impl="wgmma", warps=4, tile_f=64, stages=4)
    r = UB.render(key, cfg)
    assert r.source.count(old) == 1
    launch = bwd_host_emu.host_kernel(RenderedKernel(entry=r.entry, source=r.source.replace(old, new),
                                                     template=r.template), UB.signature)
    c, t, d = 64, 64, 64
    K, V, g, dS, ds = _us_problem(1, 1, c, 1, True, torch.bfloat16, seed=3)
    out = dict(dK=torch.full((1, t, 1, d), NAN), dV=torch.full((1, t, 1, d), NAN), E=torch.full((1, t, 1), NAN))
    launch(1, 128, UB.dynamic_smem_bytes(key, cfg),
           (K, V, g, dS.bfloat16().contiguous(), ds, block_table(d, 2, 8, "cpu"), *out.values(), t, 1, c, 1, 1))
    for name in ("dK", "dV"):
        assert out[name].isnan().any() == (name in nan_in), name


# ---- the forward kernels impl='wgmma' on the CPU ----------------------------------------------------
@pytest.mark.parametrize("d,gating,dtype,cfg", [
    (64, True, torch.bfloat16, dict(tile_m=128, tile_k=32, warps=4, stages=4)),  # N = 72: s in a 9th group (LBO)
    (128, False, torch.float16, dict(tile_m=128, tile_k=32, warps=8, stages=4)),  # N = 128 (LBO), s: N = 8, no swizzle
], ids=["d64-bf16", "d128-fp16"])
def test_update_state_wgmma_on_cpu(d, gating, dtype, cfg):
    """The forward update_state impl='wgmma' (launcher routed to the host) against float64 and against the
    mma_sync kernel on the same inputs: both form the same bf16/fp16 phi(k~), so their fp32 sums agree to
    fp32 rounding (measured: bitwise equal)."""
    from vidrial.kernels.power_retention.update_state import UpdateStateConfig, update_state
    from vidrial.reference.forward import update_state_reference

    c = 64
    gen = torch.Generator().manual_seed(d)
    K = (torch.randn(1, c, 1, d, generator=gen) / d**0.25).to(dtype)
    V = torch.randn(1, c, 1, d, generator=gen).to(dtype)
    G = torch.nn.functional.logsigmoid(torch.randn(1, c, 1, generator=gen) + 3.0) if gating else None
    undo = bwd_host_emu.install()
    try:
        S, s = update_state(K, V, G, deg=2, d_tile=8, chunk_size=c, config=UpdateStateConfig(impl="wgmma", **cfg))
        S2, s2 = update_state(K, V, G, deg=2, d_tile=8, chunk_size=c, config=UpdateStateConfig(tile_k=32, warps=4))
    finally:
        undo()
    Sr, sr = update_state_reference(K, V, G, 2, 8, c)
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3  # the family's tolerance (phi's 16-bit rounding)
    assert _rel(S, Sr) < tol and _rel(s, sr) < tol
    assert _rel(S, S2) < 1e-6 and _rel(s, s2) < 1e-6


@pytest.mark.parametrize("d,dtype,o_dtype,cfg", [
    (64, "bfloat16", "float32", dict(tile_m=64, warps=4, stages=3)),     # N = 72: zq in a 9th group (LBO)
    (128, "float16", "float16", dict(tile_m=128, warps=8, stages=4)),    # N = 136: 3 groups
], ids=["d64-bf16", "d128-fp16"])
def test_query_state_wgmma_on_cpu(d, dtype, o_dtype, cfg):
    """The forward query_state impl='wgmma' (launcher routed to the host; its prmt / ld.shared / __shfl_sync
    are emulated too) against float64 (Y is 16-bit: ~2e-3)."""
    from vidrial.kernels.power_retention.query_state import (
        QueryStateConfig, QueryStateKey, make_test_inputs, query_state)
    from vidrial.reference.forward import query_state_reference

    key = QueryStateKey(head_dim=d, deg=2, d_tile=8, dtype=dtype, o_dtype=o_dtype)
    c = 64
    x = make_test_inputs(key, b=1, t=2 * c - 8, hq=2, h=1, chunk_size=c, gating=True, device="cpu", seed=1)
    x["Sbar"] = x["Sbar"].bfloat16()
    args = (x["Q"], x["Sbar"], x["sbar"], x["O"], x["l"], x["m"], x["log_G"])
    kw = dict(deg=2, d_tile=8, scale=x["scale"], chunk_size=c)
    undo = bwd_host_emu.install()
    try:
        Y = query_state(*args, config=QueryStateConfig(impl="wgmma", tile_k=64, **cfg), **kw)
    finally:
        undo()
    assert _rel(Y, query_state_reference(*args, **kw)) < 1e-2
