"""update_state_bwd (templates/update_state_bwd.cu.j2: dphi = dS v + ds and
dV = phi(k)^T dS on bf16 tensor cores, the chain rule on the CUDA cores) on the CPU: its config rules,
and the kernel itself executed through tests/bwd_host_emu.py (mma.sync m16n8k16 bf16, ldmatrix(.trans)
and cp.async emulated) against the float64 emulation (bwd_emulation.update_state_bwd), with poisoned
outputs. Its NVRTC compilation (sm_80 / sm_90, no spills) is part of test_backward_kernels_cpu.py's
corner configs.

Accuracy (measured here, `python3 -m pytest -s -k us_bwd_mma16_cpu`): against float64 with the fp32 dS
the launcher is given, the bf16 copy of dS and bf16 phi(k) leave relative errors (2-norm) of ~1e-3 on
dK, dV and E; against float64 on the bf16-rounded dS, dK and E are fp32-accurate (~1e-6) and dV carries
phi's bf16 rounding only."""
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
from vidrial.kernels.power_retention.sympow import layout
from vidrial.kernels.power_retention.update_state_bwd import (
    FAMILY as UB,
    UpdateStateBwdConfig,
    UpdateStateBwdKey,
    mma16_config,
)

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402

F64 = torch.float64
TOL = 1e-2      # the project's bf16 tolerance, vs float64 with the fp32 dS
TOL_EXACT = 1e-4  # dK and E vs float64 on the kernel's own (bf16) dS: fp32 sums of exact products


@pytest.mark.parametrize("fields,field", [
    (dict(warps=1), "warps"), (dict(tile_f=32), "tile_f"), (dict(stages=5), "stages"),
])
def test_us_bwd_mma16_field_rules(fields, field):
    value = list(fields.values())[0]
    with pytest.raises((ConfigError, ValidationError), match=rf"{field}={value}"):
        UpdateStateBwdConfig(**fields)
    cfg = UpdateStateBwdConfig().model_copy(update=fields)  # skips the validators
    with pytest.raises(ConfigError, match=rf"{field}={value}"):
        UB.check(UpdateStateBwdKey(), cfg, "sm_90")


def test_us_bwd_mma16_key_rules_and_defaults():
    cfg = UpdateStateBwdConfig(warps=2)
    assert cfg.rows == 64
    with pytest.raises(ConfigError, match="head_dim a multiple of 32 up to 128"):
        UB.check(UpdateStateBwdKey(head_dim=256, d_tile=16), cfg, "sm_90")
    with pytest.raises(ConfigError, match="multiple of 16 features"):
        UB.check(UpdateStateBwdKey(head_dim=32, deg=2, d_tile=2), cfg, "sm_90")  # chunks of 4
    with pytest.raises(ConfigError, match="shared memory"):  # 8 warps at d=64: ~196 KB > sm_80's 163 KB
        UB.check(UpdateStateBwdKey(head_dim=64), UpdateStateBwdConfig(warps=8), "sm_80")
    for key in UB.standard_keys():
        UB.check(key, mma16_config(key), "sm_80")
        assert mma16_config(key) in UB.corner_configs(key)
        assert UB.default_config(key) == mma16_config(key)


# ---- the kernel executed on the CPU ---------------------------------------------------------------
needs_emu = pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")


def _problem(b, h, d, deg, d_tile, c, n, gating, seed):
    t = n * c
    D = layout(d, deg, d_tile).feature_dim
    gen = torch.Generator().manual_seed(seed)
    K = (torch.randn(b, t, h, d, generator=gen) * 0.7).bfloat16()
    V = torch.randn(b, t, h, d, generator=gen).bfloat16()
    dS = torch.randn(b, n, h, D, d, generator=gen) * 0.1
    ds = torch.randn(b, n, h, D, generator=gen) * 0.1
    g = None
    if gating:  # a level that changes along the sequence: chunk gates differ from chunk to chunk
        base = torch.linspace(-2.0, 0.5, t, dtype=F64)[None, :, None]
        lg = torch.nn.functional.logsigmoid(base + torch.randn(b, t, h, generator=gen, dtype=F64))
        g = lg.reshape(b, n, c, h).cumsum(2).reshape(b, t, h).float()
    return K, V, g, dS, ds


def _kernel(key, cfg, K, V, g, dS, ds, c):
    """The mma16 kernel with NaN-filled outputs (unwritten values show up); dS as the launcher passes it."""
    b, t, h, d = K.shape
    n = t // c
    dK, dV = torch.full((b, t, h, d), math.nan), torch.full((b, t, h, d), math.nan)
    E = torch.full((b, t, h), math.nan)
    rt = -(-c // cfg.rows)
    launch = bwd_host_emu.host_kernel(UB.render(key, cfg), UB.signature)
    launch(b * h * n * rt, UB.threads_per_block(cfg), UB.dynamic_smem_bytes(key, cfg),
           (K, V, g, dS.bfloat16().contiguous(), ds, block_table(d, key.deg, key.d_tile, "cpu"), dK, dV, E, t, n, c,
            h, rt))
    return dK, dV, (E if g is not None else None)


def _rel(got, want):
    assert torch.isfinite(got).all(), "NaN (unwritten) or inf"
    got, want = got.to(F64), want.to(F64)
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


@needs_emu
@pytest.mark.parametrize("b,h,d,deg,d_tile,c,n,gating,cfg", [
    (2, 2, 32, 2, 8, 48, 2, False, UpdateStateBwdConfig(warps=2)),  # one partial row tile, b, h > 1
    (1, 1, 32, 2, 8, 96, 2, True, UpdateStateBwdConfig(warps=2, tile_f=128, stages=3)),  # 2nd partial
    (1, 2, 64, 2, 8, 64, 3, True, UpdateStateBwdConfig(warps=2)),  # shape A's layout, 3 chunks
    (1, 1, 32, 2, 16, 32, 2, True, UpdateStateBwdConfig(warps=2)),  # T=16: a high digit per chunk
    (1, 1, 32, 4, 4, 32, 1, True, UpdateStateBwdConfig(warps=2, tile_f=128)),  # p=4: D=84480
    (1, 1, 128, 2, 8, 32, 1, True, UpdateStateBwdConfig(warps=2)),  # V's fragments from shared memory
], ids=["b2h2-c48", "c96-tile128", "d64-n3", "T16", "p4", "d128"])
def test_us_bwd_mma16_kernel_on_cpu(b, h, d, deg, d_tile, c, n, gating, cfg):
    key = UpdateStateBwdKey(head_dim=d, deg=deg, d_tile=d_tile)
    UB.check(key, cfg, "sm_90")
    K, V, g, dS, ds = _problem(b, h, d, deg, d_tile, c, n, gating, seed=d + c)
    got = _kernel(key, cfg, K, V, g, dS, ds, c)
    g64 = None if g is None else g.double()
    want = em.update_state_bwd(K.double(), V.double(), g64, dS.double(), ds.double(), deg, d_tile, c)
    errs = [_rel(x, w) for x, w in zip(got, want) if x is not None]
    print(f"\nus_bwd mma16 {key.label()} {cfg.label()}: rel err vs float64 (dK, dV[, E]) = "
          + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < TOL, errs
    # dK and E on the kernel's own bf16 dS: fp32-accurate (no rounding but the fp32 sums)
    own = em.update_state_bwd(K.double(), V.double(), g64, dS.bfloat16().double(), ds.double(), deg, d_tile, c)
    assert _rel(got[0], own[0]) < TOL_EXACT
    if gating:
        assert _rel(got[2], own[2]) < TOL_EXACT


@needs_emu
def test_us_bwd_mma16_launcher_on_cpu():
    """update_state_bwd with config=None runs the default config (grid from config.rows = 32 * warps,
    the bf16 copy of dS) and agrees with float64; the tuner protocol's run() passes its check with two
    configs."""
    from vidrial.kernels.power_retention import update_state_bwd as usb

    b, h, d, deg, d_tile, c, n = 2, 2, 32, 2, 8, 64, 2
    K, V, g, dS, ds = _problem(b, h, d, deg, d_tile, c, n, True, seed=3)
    kw = dict(deg=deg, d_tile=d_tile, chunk_size=c)
    undo = bwd_host_emu.install()
    try:
        got = usb.update_state_bwd(K, V, g, dS, ds, **kw)  # CPU tensors: the default config
        key = UpdateStateBwdKey(head_dim=d, deg=deg, d_tile=d_tile, tokens=256)
        inputs = UB.make_inputs(key, "cpu", 0)
        expected = UB.reference(key, inputs)
        for cfg in (mma16_config(key), UpdateStateBwdConfig(warps=2, tile_f=128, stages=3)):
            assert UB.check_outputs(key, inputs, UB.run(key, cfg, inputs), expected) < UB.tolerance(key)
    finally:
        undo()
    want = em.update_state_bwd(K.double(), V.double(), g.double(), dS.double(), ds.double(), deg, d_tile, c)
    for x, w in zip(got, want):
        assert _rel(x, w) < TOL
