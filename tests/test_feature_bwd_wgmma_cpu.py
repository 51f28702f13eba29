"""The Hopper implementations (impl='wgmma') of update_state_bwd and of query_state_bwd's rows pass on the
CPU: the rules that tie them to Hopper and to their layout (each error names the field), their shared
memory, their sm_90a PTX (wgmma, no mma.sync: no silent fallback to HMMA) and the per-arch defaults.
Their numbers are checked on the GPU (tests/gpu/test_backward_gpu.py::test_update_state_bwd_wgmma_kernel,
::test_query_state_bwd_wgmma_rows)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from vidrial.core.compile import CompiledKernel, compile_many, ptx_of
from vidrial.core.errors import ConfigError
from vidrial.kernels.power_retention import query_state_bwd as qsb
from vidrial.kernels.power_retention import update_state_bwd as usb

FAMILIES = {"update_state_bwd": (usb.FAMILY, usb.UpdateStateBwdKey(head_dim=64, deg=2, d_tile=8), 4 + 2 * 8),
            # one GEMM per block: before the loop, then two steps of the loop unrolled by two
            "query_state_bwd": (qsb.FAMILY, qsb.QueryStateBwdKey(head_dim=64, deg=2, d_tile=8), 4 + 2 * 4)}
# update_state_bwd: GEMM 1 before the loop, then two steps (GEMM 1 and GEMM 2 each) of the loop unrolled by two
NAMES = sorted(FAMILIES)


def _wg(fam, **kw):
    return fam.Config(**{**dict(impl="wgmma", warps=4, stages=4), **kw})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fields,pattern", [
    (dict(warps=2), r"warps=2: 4 or 8 with impl='wgmma'"),
    (dict(tile_f=128), r"tile_f=128: 64 with impl='wgmma'"),
    (dict(stages=2), r"stages=2: one of \(3, 4, 5, 6\) with impl='wgmma'"),
])
def test_config_rules_name_the_field(name, fields, pattern):
    fam = FAMILIES[name][0]
    with pytest.raises((ConfigError, ValidationError), match=pattern):
        _wg(fam, **fields)


@pytest.mark.parametrize("name", NAMES)
def test_check_ties_wgmma_to_hopper_and_its_layout(name):
    fam, key, _ = FAMILIES[name]
    wg = _wg(fam)
    with pytest.raises(ConfigError, match=r"impl='wgmma': needs a Hopper GPU.*impl='mma_sync' on sm_80"):
        fam.check(key, wg, "sm_80")
    for other in (dict(d_tile=16), dict(head_dim=128), dict(head_dim=32, deg=4, d_tile=4)):
        with pytest.raises(ConfigError, match=r"impl='wgmma': takes deg=2, d_tile=8, head_dim=64"):
            fam.check(key.model_copy(update=other), wg, "sm_90")
    fam.check(key, wg, "sm_90")
    assert fam.target_arch(wg, "sm_90") == "sm_90a" and wg.rows == 64 and _wg(fam, warps=8).rows == 128
    assert fam.Config(warps=4).rows == 128  # mma_sync: 32 rows per warp


@pytest.mark.parametrize("name", NAMES)
def test_shared_memory_matches_the_template(name):
    fam, key, _ = FAMILIES[name]
    for cfg in (_wg(fam), _wg(fam, warps=8, stages=6), _wg(fam, stages=3)):
        assert f"SMEM_BYTES == {fam.dynamic_smem_bytes(key, cfg)}" in fam.render(key, cfg).source


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ptx_issues_wgmma_not_mma_sync(name, dtype):
    fam, key, count = FAMILIES[name]
    ptx = ptx_of(fam.render(key.model_copy(update={"dtype": dtype}), _wg(fam)), "sm_90a")
    assert ptx.count("wgmma.mma_async") == count
    assert "m64n64k16" in ptx and "mma.sync" not in ptx and "fence.proxy.async" in ptx


def test_compiles_for_sm90a_without_spills():
    jobs = []
    for name in NAMES:
        fam, key, _ = FAMILIES[name]
        for dt, cfg in (("bfloat16", _wg(fam)), ("float16", _wg(fam, warps=8, stages=6))):
            jobs.append((fam.render(key.model_copy(update={"dtype": dt}), cfg), "sm_90a", (), f"{name} {dt} {cfg.label()}"))
    for (_, _, _, label), res in zip(jobs, compile_many(jobs)):
        assert isinstance(res, CompiledKernel), str(res)[:2000]
        assert not res.facts.spills and res.arch == "sm_90a", (label, res.facts)


@pytest.mark.parametrize("name", NAMES)
def test_default_on_hopper_is_wgmma_where_it_applies(name):
    fam, key, _ = FAMILIES[name]
    assert fam.default_config_for(key, "sm_90") == fam.wgmma_config(key)
    for arch in ("sm_80", None):
        assert fam.default_config_for(key, arch) == fam.default_config(key)
    for k in fam.standard_keys():
        cfg = fam.default_config_for(k, "sm_90")
        fam.check(k, cfg, "sm_90")
        assert (cfg.impl == "wgmma") == (k.head_dim == 64 and k.deg == 2 and k.d_tile == 8)


@pytest.mark.parametrize("name", NAMES)
def test_corners_hold_both_implementations_where_wgmma_applies(name):
    fam, key, _ = FAMILIES[name]
    impls = [c.impl for c in fam.corner_configs(key)]
    assert "mma_sync" in impls and impls.count("wgmma") == 2
    assert "wgmma" not in [c.impl for c in fam.corner_configs(key.model_copy(update={"head_dim": 128}))]
