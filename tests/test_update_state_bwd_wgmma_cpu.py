"""update_state_bwd's Hopper implementation (impl='wgmma') on the CPU: the rules that tie it to Hopper and
to its layout (each error names the field), its shared memory, its sm_90a PTX (wgmma, no mma.sync: no
silent fallback to HMMA) and the per-arch default. Its numbers are checked on the GPU
(tests/gpu/test_backward_gpu.py::test_update_state_bwd_wgmma_kernel)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from vidrial.core.compile import CompiledKernel, compile_many, ptx_of
from vidrial.core.errors import ConfigError
from vidrial.kernels.power_retention.update_state_bwd import FAMILY, UpdateStateBwdConfig, UpdateStateBwdKey

KEY = UpdateStateBwdKey(head_dim=64, deg=2, d_tile=8)
WG = UpdateStateBwdConfig(impl="wgmma", warps=4, stages=4)


@pytest.mark.parametrize("fields,pattern", [
    (dict(warps=2), r"warps=2: 4 or 8 with impl='wgmma'"),
    (dict(tile_f=128), r"tile_f=128: 64 with impl='wgmma'"),
    (dict(stages=2), r"stages=2: one of \(3, 4, 5, 6\) with impl='wgmma'"),
])
def test_config_rules_name_the_field(fields, pattern):
    with pytest.raises((ConfigError, ValidationError), match=pattern):
        UpdateStateBwdConfig(**{**WG.model_dump(), **fields})


def test_check_ties_wgmma_to_hopper_and_its_layout():
    with pytest.raises(ConfigError, match=r"impl='wgmma': needs a Hopper GPU.*impl='mma_sync' on sm_80"):
        FAMILY.check(KEY, WG, "sm_80")
    for other in (dict(d_tile=16), dict(head_dim=128), dict(head_dim=32, deg=4, d_tile=4)):
        with pytest.raises(ConfigError, match=r"impl='wgmma': takes deg=2, d_tile=8, head_dim=64"):
            FAMILY.check(KEY.model_copy(update=other), WG, "sm_90")
    FAMILY.check(KEY, WG, "sm_90")
    assert FAMILY.target_arch(WG, "sm_90") == "sm_90a" and WG.rows == 64
    assert UpdateStateBwdConfig(impl="wgmma", warps=8, stages=4).rows == 128 and UpdateStateBwdConfig(warps=4).rows == 128


def test_shared_memory_matches_the_template():
    for cfg in (WG, WG.model_copy(update={"warps": 8, "stages": 6}), WG.model_copy(update={"stages": 3})):
        src = FAMILY.render(KEY, cfg).source
        assert f"SMEM_BYTES == {FAMILY.dynamic_smem_bytes(KEY, cfg)}" in src


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ptx_issues_wgmma_not_mma_sync(dtype):
    ptx = ptx_of(FAMILY.render(KEY.model_copy(update={"dtype": dtype}), WG), "sm_90a")
    # GEMM 1 before the loop, then two steps (GEMM 1 and GEMM 2 each) of the loop unrolled by two
    assert ptx.count("wgmma.mma_async") == 4 + 2 * 8
    assert "m64n64k16" in ptx and "mma.sync" not in ptx and "fence.proxy.async" in ptx


def test_compiles_for_sm90a_without_spills():
    jobs = [(FAMILY.render(KEY.model_copy(update={"dtype": dt}), cfg), "sm_90a", (), f"{dt} {cfg.label()}")
            for dt, cfg in (("bfloat16", WG), ("float16", WG.model_copy(update={"warps": 8, "stages": 6})))]
    for res in compile_many(jobs):
        assert isinstance(res, CompiledKernel), str(res)[:2000]
        assert not res.facts.spills and res.arch == "sm_90a", res.facts


def test_default_on_hopper_is_wgmma_where_it_applies():
    assert FAMILY.default_config_for(KEY, "sm_90") == FAMILY.wgmma_config(KEY)
    for arch in ("sm_80", None):
        assert FAMILY.default_config_for(KEY, arch) == FAMILY.default_config(KEY)
    for key in FAMILY.standard_keys():
        cfg = FAMILY.default_config_for(key, "sm_90")
        FAMILY.check(key, cfg, "sm_90")
        assert (cfg.impl == "wgmma") == (key.head_dim == 64 and key.deg == 2 and key.d_tile == 8)
