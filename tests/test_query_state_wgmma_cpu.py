"""query_state's Hopper implementation (impl='wgmma') on the CPU: the rules that tie it to Hopper and
to the layouts it takes (each error names the field), its shared memory, and its sm_90a PTX (wgmma,
no mma.sync: no silent fallback to HMMA). Its numbers are checked on the GPU
(tests/gpu/test_forward_gpu.py::test_query_state_wgmma_matches_reference)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from vidrial.core.compile import CompiledKernel, compile_many, ptx_of
from vidrial.core.errors import ConfigError
from vidrial.kernels.power_retention.query_state import FAMILY, QueryStateConfig, QueryStateKey

KEY = QueryStateKey(head_dim=64, deg=2, d_tile=8)
WG = QueryStateConfig(impl="wgmma", tile_m=128, tile_k=64, warps=4, stages=4)


@pytest.mark.parametrize("fields,pattern", [
    (dict(warps=2, tile_m=128), r"warps=2: a multiple of 4 with impl='wgmma'"),
    (dict(tile_k=32), r"tile_k=32: 64 with impl='wgmma'"),
    (dict(stages=2), r"stages=2: at least 3 with impl='wgmma'"),
])
def test_config_rules_name_the_field(fields, pattern):
    with pytest.raises((ConfigError, ValidationError), match=pattern):
        QueryStateConfig(**{**WG.model_dump(), **fields})


def test_check_ties_wgmma_to_hopper_and_its_layouts():
    with pytest.raises(ConfigError, match=r"impl='wgmma': needs a Hopper GPU.*impl='mma_sync' on sm_80"):
        FAMILY.check(KEY, WG, "sm_80")
    for other in (dict(d_tile=16), dict(head_dim=32), dict(deg=4, head_dim=32, d_tile=4)):
        with pytest.raises(ConfigError, match=r"impl='wgmma': takes deg=2, d_tile=8, head_dim in \(64, 128\)"):
            FAMILY.check(KEY.model_copy(update=other), WG, "sm_90")
    with pytest.raises(ConfigError, match=r"tile_m=256: 144 fp32 accumulators"):
        FAMILY.check(KEY, WG.model_copy(update={"tile_m": 256}), "sm_90")
    FAMILY.check(KEY, WG, "sm_90")
    FAMILY.check(KEY.model_copy(update={"head_dim": 128}), WG.model_copy(update={"warps": 8}), "sm_90a")
    assert FAMILY.target_arch(WG, "sm_90") == "sm_90a" and FAMILY.target_arch(QueryStateConfig(), "sm_90") == "sm_90"


def test_shared_memory_matches_the_template():
    """The template asserts its layout against the host's number: every config of the sweep renders."""
    for d, cfg in ((64, WG), (64, WG.model_copy(update={"stages": 6})), (128, WG.model_copy(update={"warps": 8}))):
        src = FAMILY.render(KEY.model_copy(update={"head_dim": d}), cfg).source
        assert f"SMEM_BYTES == {FAMILY.dynamic_smem_bytes(KEY.model_copy(update={'head_dim': d}), cfg)}" in src


@pytest.mark.parametrize("d,dtype,o_dtype,warps", [(64, "bfloat16", "float32", 4), (128, "float16", "float16", 8)])
def test_ptx_issues_wgmma_not_mma_sync(d, dtype, o_dtype, warps):
    key = QueryStateKey(head_dim=d, deg=2, d_tile=8, dtype=dtype, o_dtype=o_dtype)
    cfg = WG.model_copy(update={"warps": warps})
    ptx = ptx_of(FAMILY.render(key, cfg), "sm_90a")
    mt = cfg.tile_m // (cfg.warps // 4) // 64
    assert ptx.count("wgmma.mma_async") == 4 * mt  # one per k-step of a block per m64 tile (loop rolled)
    assert f"m64n{d + 8}k16" in ptx and "mma.sync" not in ptx and "fence.proxy.async" in ptx


def test_compiles_for_sm90a_without_spills():
    jobs = [(FAMILY.render(KEY.model_copy(update={"head_dim": d}), cfg), "sm_90a", (), f"d={d} {cfg.label()}")
            for d, cfg in ((64, WG), (64, WG.model_copy(update={"tile_m": 256, "warps": 8})),
                           (128, WG.model_copy(update={"warps": 8})))]
    for res in compile_many(jobs):
        assert isinstance(res, CompiledKernel), str(res)[:2000]
        assert not res.facts.spills and res.arch == "sm_90a", res.facts


def test_default_on_hopper_is_wgmma_where_it_applies():
    assert FAMILY.default_config_for(KEY, "sm_90").impl == "wgmma"
    assert FAMILY.default_config_for(KEY.model_copy(update={"head_dim": 128}), "sm_90a").warps == 8
    for arch in ("sm_80", None):
        assert FAMILY.default_config_for(KEY, arch) == FAMILY.default_config(KEY)
    for other in (dict(d_tile=16), dict(head_dim=32), dict(deg=4, head_dim=32, d_tile=4)):
        key = KEY.model_copy(update=other)
        assert FAMILY.default_config_for(key, "sm_90") == FAMILY.default_config(key)
    for key in FAMILY.standard_keys():
        FAMILY.check(key, FAMILY.default_config_for(key, "sm_90"), "sm_90")
