"""query_state_bwd's rows pass (the tensor-core kernel, templates/query_state_bwd.cu.j2) on the CPU:
its config rules, and the kernel itself executed through tests/bwd_host_emu.py (mma.sync m16n8k16
bf16, ldmatrix and cp.async emulated) against the float64 rows pass of reference.backward, with
poisoned outputs. Its NVRTC compilation (sm_80 / sm_90, no spills)
is part of test_backward_kernels_cpu.py's corner configs."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from pydantic import ValidationError

from vidrial.core.errors import ConfigError
from vidrial.reference import backward as em
from vidrial.kernels.power_retention.sympow import block_table
from vidrial.kernels.power_retention.query_state_bwd import (
    FAMILY as QB,
    QueryStateBwdConfig,
    ROW_OUTPUTS,
    QueryStateBwdKey,
    mma16_config,
    rows_reference_outputs,
)

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402

F64 = torch.float64
OUTS = ROW_OUTPUTS  # dQ, alpha, dl, dAh, dBh, qscale, dg, dgs
# bf16 inputs are exact in the bf16 mma (products exact, fp32 sums): the kernel is fp32-accurate (~2e-7)
TOL = 2e-5


@pytest.mark.parametrize("fields,field", [
    (dict(warps=1), "warps"), (dict(tile_f=32), "tile_f"), (dict(stages=5), "stages"),
])
def test_mma16_field_rules(fields, field):
    value = list(fields.values())[0]
    with pytest.raises((ConfigError, ValidationError), match=rf"{field}={value}"):
        QueryStateBwdConfig(**fields)
    # model_copy skips the validators: check() applies the same rules
    cfg = QueryStateBwdConfig().model_copy(update=fields)
    with pytest.raises(ConfigError, match=rf"{field}={value}"):
        QB.check(QueryStateBwdKey(), cfg, "sm_90")


def test_mma16_key_rules_and_geometry():
    cfg = QueryStateBwdConfig(warps=2)
    assert cfg.rows == 64
    with pytest.raises(ConfigError, match="head_dim a multiple of 32 up to 128"):
        QB.check(QueryStateBwdKey(head_dim=256, d_tile=16), cfg, "sm_90")
    with pytest.raises(ConfigError, match="d_tile a power of two"):
        QB.check(QueryStateBwdKey(head_dim=96, d_tile=3), cfg, "sm_90")
    with pytest.raises(ConfigError, match="shared memory"):  # 8 warps at d=64: 204 KB > sm_80's 163 KB
        QB.check(QueryStateBwdKey(head_dim=64), QueryStateBwdConfig(warps=8), "sm_80")
    for key in QB.standard_keys():
        QB.check(key, mma16_config(key), "sm_80")
        assert mma16_config(key) in QB.corner_configs(key)
        assert QB.default_config(key) == mma16_config(key)


# ---- the kernel executed on the CPU ---------------------------------------------------------------
needs_emu = pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")


def _run(key, cfg, args):
    rt = args[-2]
    b, t, hq = args[0].shape[:3]
    n = args[19]  # after the 10 inputs, the 8 outputs and t
    launch = bwd_host_emu.host_kernel(QB.render(key, cfg), QB.signature)
    launch(b * hq * n * rt, QB.threads_per_block(cfg), QB.dynamic_smem_bytes(key, cfg), args)


def _problem(d, deg, d_tile, c, gqa, gating, seed, n=2):
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
                O=f["O"].float(), l=f["l"].float(), m=f["m"].float(), Y=f["Y"].bfloat16(), dY=dY, scale=scale, c=c,
                n=n, gqa=gqa)


def _kernel_outputs(key, cfg, p):
    """Runs the rows pass with outputs filled with NaN first (unwritten values show up)."""
    Q = p["Q"]
    b, t, hq, d = Q.shape
    outs = {k: torch.full((b, t, hq, d), math.nan) for k in ("dQ", "dAh")}
    outs.update({k: torch.full((b, t, hq), math.nan) for k in ("alpha", "dl", "dBh", "qscale", "dg", "dgs")})
    g = p["g"].float() if p["g"] is not None else None
    rt = -(-p["c"] // cfg.rows)
    _run(key, cfg, (Q, g, p["Sb16"], p["sb"], p["O"], p["l"], p["m"], p["Y"], p["dY"],
                    block_table(d, key.deg, key.d_tile, "cpu"), outs["dQ"], outs["alpha"], outs["dl"], outs["dAh"],
                    outs["dBh"], outs["qscale"], outs["dg"], outs["dgs"], t, p["n"], p["c"], hq, p["gqa"], p["n"],
                    p["sb"].shape[1], rt, p["scale"] ** key.deg))
    return outs


def _close(name, got, want, terms, tol):
    assert torch.isfinite(got).all(), f"{name}: NaN (unwritten) or inf"
    got, want = got.to(F64), want.to(F64)
    # dg = phi.dphi + dO.O + dl l cancels (the exact sum is -dl 1e-6): measure it against its terms
    scale = terms if name == "dg" else max(want.abs().max().item(), 1e-20)
    err = (got - want).abs().max().item() / scale
    assert err < tol, f"{name}: {err:.3e}"


@needs_emu
@pytest.mark.parametrize("d,deg,d_tile,c,n,gqa,gating,cfg", [
    (32, 2, 8, 48, 2, 2, True, QueryStateBwdConfig(warps=2)),          # one partial tile, GQA
    (64, 2, 8, 96, 2, 1, False, QueryStateBwdConfig(warps=2)),         # second tile partial
    (32, 2, 16, 64, 2, 1, True, QueryStateBwdConfig(warps=2, tile_f=128, stages=3)),  # high digit
    (32, 2, 1, 32, 2, 2, True, QueryStateBwdConfig(warps=2)),          # T=1: scalar chunks, D tail
    (32, 4, 4, 32, 1, 1, True, QueryStateBwdConfig(warps=2, tile_f=128)),  # p=4: D=84480, one CTA
])
def test_mma16_rows_pass_on_cpu(d, deg, d_tile, c, n, gqa, gating, cfg):
    key = QueryStateBwdKey(head_dim=d, deg=deg, d_tile=d_tile)
    p = _problem(d, deg, d_tile, c, gqa, gating, seed=11, n=n)
    got = _kernel_outputs(key, cfg, p)
    # float64 row pass on the kernel's own inputs (bf16 Q, Y, dY, Sbar; fp32 sbar, O, l, m, g)
    gz = p["g"].float().double() if gating else torch.zeros(p["Q"].shape[0], p["Q"].shape[1], 1, dtype=F64)
    want = rows_reference_outputs(em.qs_bwd_rows(p["Q"].double(), gz, p["Sb16"].double(),
                                                 p["sb"][:, :p["n"]].double(), p["O"].double(), p["l"].double(),
                                                 p["m"].double(), p["Y"].double(), p["dY"].double(), deg, d_tile,
                                                 p["scale"], c), p["dY"].double(), p["O"].double(), p["l"].double())
    terms = (want[2].abs() * p["l"].double()).max().item()
    for name, w in zip(OUTS, want):
        _close(name, got[name], w, terms, TOL)


@needs_emu
def test_launcher_on_cpu():
    """query_state_bwd (grid from config.rows = 32 * warps, then the state pass on its outputs) against
    the float64 rows pass; the state pass gets the rows pass's outputs (qs_bwd_state_update, on the
    stand-in for update_state); state=False runs the rows pass alone."""
    from vidrial.kernels.power_retention import qs_bwd_state_update as mod
    from vidrial.kernels.power_retention.query_state_bwd import query_state_bwd

    d, deg, d_tile, c = 32, 2, 8, 96
    p = _problem(d, deg, d_tile, c, 2, True, seed=5, n=1)
    args = (p["Q"], p["g"].float(), p["Sb16"], p["sb"], p["O"], p["l"], p["m"], p["Y"], p["dY"])
    kw = dict(deg=deg, d_tile=d_tile, scale=p["scale"], chunk_size=c)
    undo = bwd_host_emu.install()
    undo_us = bwd_host_emu.install_update_state()
    try:
        got = query_state_bwd(*args, config=QueryStateBwdConfig(warps=2), **kw)
        rows = query_state_bwd(*args, config=QueryStateBwdConfig(warps=2), state=False, **kw)
        dS, ds = mod.state_pass_update_state(p["Q"], got["qscale"], got["dAh"], got["dBh"], 1, deg=deg,
                                             d_tile=d_tile, scale=p["scale"], chunk_size=c)
    finally:
        undo_us()
        undo()
    assert "dSbar" not in rows and all(torch.equal(rows[k], got[k]) for k in OUTS)  # state=False: rows pass only
    assert torch.equal(got["dSbar"], dS) and torch.equal(got["dsbar"], ds)
    want = rows_reference_outputs(em.qs_bwd_rows(p["Q"].double(), p["g"].float().double(), p["Sb16"].double(),
                                                 p["sb"][:, :p["n"]].double(), p["O"].double(), p["l"].double(),
                                                 p["m"].double(), p["Y"].double(), p["dY"].double(), deg, d_tile,
                                                 p["scale"], c), p["dY"].double(), p["O"].double(), p["l"].double())
    terms = (want[2].abs() * p["l"].double()).max().item()
    for name, w in zip(OUTS, want):
        _close(name, got[name], w, terms, TOL)
