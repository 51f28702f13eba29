"""update_state on the CPU: config/key validation, deterministic rendering, NVRTC compilation of
every standard key (default + corner configs, sm_80 and sm_90, no spills in defaults) and the
launcher's input checks (which run before anything touches a GPU)."""
from __future__ import annotations

import time

import pytest
import torch
from pydantic import ValidationError

from vidrial.core.compile import CompiledKernel, compile_many
from vidrial.core.errors import ConfigError, InputError
from vidrial.kernels import get_family
from vidrial.kernels.power_retention.sympow import block_table_values, layout
from vidrial.kernels.power_retention.update_state import (
    UpdateStateConfig,
    UpdateStateKey,
    family,
    update_state,
)

KEY = UpdateStateKey(head_dim=64, deg=2, d_tile=8, dtype="bfloat16", chunk_size=1024, gating=True)


def test_registered():
    assert get_family("update_state") is family


@pytest.mark.parametrize("fields,field,rule", [
    (dict(tile_m=24), "tile_m", "multiple of 16"),
    (dict(tile_m=2048), "tile_m", "between 16 and 1024"),
    (dict(tile_k=48), "tile_k", "one of"),
    (dict(warps=3), "warps", "one of"),
    (dict(stages=1), "stages", "between 2 and 6"),
    (dict(min_ctas=0), "min_ctas", "between 1 and 4"),
    (dict(tile_m=32, warps=4), "tile_m", "16 \\* warps = 64"),
])
def test_config_validation_names_field_value_rule(fields, field, rule):
    with pytest.raises((ConfigError, ValidationError), match=rf"{field}={fields[field]}.*{rule}"):
        UpdateStateConfig(**fields)


@pytest.mark.parametrize("fields,field", [
    (dict(head_dim=48), "head_dim"), (dict(head_dim=64, deg=3), "deg"), (dict(head_dim=64, d_tile=5), "d_tile"),
    (dict(head_dim=64, chunk_size=40), "chunk_size"), (dict(head_dim=64, bh_chunks_bucket=3), "bh_chunks_bucket"),
    (dict(head_dim=64, dtype="fp32"), "dtype"),
])
def test_key_validation(fields, field):
    with pytest.raises((ConfigError, ValidationError), match=field):
        UpdateStateKey(**fields)


def test_check_rules():
    with pytest.raises(ConfigError, match=r"tile_k=128: must divide chunk_size=64"):
        family.check(KEY.model_copy(update={"chunk_size": 64}), UpdateStateConfig(tile_k=128), "sm_90")
    with pytest.raises(ConfigError, match=r"tile_m=512.*registers"):
        family.check(KEY, UpdateStateConfig(tile_m=512, warps=4), "sm_90")
    big = UpdateStateConfig(tile_m=128, tile_k=128, warps=4, stages=6)
    k128 = KEY.model_copy(update={"head_dim": 128})
    with pytest.raises(ConfigError, match=r"shared memory"):
        family.check(k128, big, "sm_80")


def test_key_split_and_json_roundtrip():
    assert set(KEY.compile_part()) == {"head_dim", "deg", "d_tile", "dtype", "chunk_size", "gating"}
    assert set(KEY.runtime_part()) == {"bh_chunks_bucket"}
    assert UpdateStateKey.model_validate_json(KEY.model_dump_json()) == KEY
    cfg = family.default_config(KEY)
    assert UpdateStateConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_render_is_deterministic():
    cfg = family.default_config(KEY)
    a, b = family.render(KEY, cfg), family.render(KEY, cfg)
    assert a.source == b.source and a.entry == b.entry
    other = family.render(KEY.model_copy(update={"gating": False}), cfg)
    assert other.source_hash != a.source_hash and other.entry != a.entry
    # the runtime bucket never changes what is compiled (no recompile for a new batch size)
    bucket = family.render(KEY.model_copy(update={"bh_chunks_bucket": 4096}), cfg)
    assert bucket.source == a.source and bucket.entry == a.entry
    assert "{{ " not in a.source and "{% " not in a.source  # no unrendered Jinja


def test_block_table_matches_sympow_order():
    for d, p, t in [(64, 2, 8), (64, 2, 1), (32, 4, 4), (128, 2, 128)]:
        lay = layout(d, p, t)
        vals = block_table_values(d, p, t)
        assert len(vals) == lay.n_blocks
        idx, _ = lay.feature_indices()
        bs = lay.block_size
        # decode like sympow.cuh does and compare with feature_indices() for a sample of features
        for f in list(range(0, lay.feature_dim, max(1, lay.feature_dim // 97))) + [lay.feature_dim - 1]:
            packed, e = vals[f // bs], f % bs
            got = [0] * p
            for j in range(p - 1, -1, -1):
                got[j] = ((packed >> (8 * j)) & 0xFF) * t + e % t
                e //= t
            assert got == idx[f].tolist(), (d, p, t, f)


def _compile_jobs(keys, with_corners: bool):
    """Each key's default on sm_80 and sm_90 (mma_sync), plus the corners: mma_sync ones on both archs,
    wgmma ones (built for sm_90a) for the shape keys only (CI time)."""
    jobs, labels = [], []
    shape_keys = set(family.shape_keys())
    for key in keys:
        for arch in ("sm_80", "sm_90"):
            configs = [(family.default_config_for(key, arch), True)]
            if with_corners:
                configs += [(c, False) for c in family.corner_configs(key)
                            if c.impl == "mma_sync" or (arch == "sm_90" and key in shape_keys)]
            for cfg, is_default in configs:
                family.check(key, cfg, arch)
                target = family.target_arch(cfg, arch)
                jobs.append((family.render(key, cfg), target, (), f"{key.label()} | {cfg.label()}"))
                labels.append((key, cfg, target, is_default))
    return jobs, labels


@pytest.mark.slow
def test_standard_keys_compile_sm80_sm90():
    keys = family.standard_keys()
    assert 10 <= len(keys) <= 40
    assert len(set(keys)) == len(keys)
    jobs, labels = _compile_jobs(keys, with_corners=True)
    started = time.perf_counter()
    results = compile_many(jobs)
    wall = time.perf_counter() - started
    failures = [str(r)[:2000] for r in results if not isinstance(r, CompiledKernel)]
    assert not failures, failures[0]
    spilling = [(k.label(), c.label(), a, r.facts) for (k, c, a, d), r in zip(labels, results) if d and r.facts.spills]
    assert not spilling, spilling
    for (key, cfg, arch, is_default), r in zip(labels, results):
        if is_default:
            assert family.infeasible_reason(key, cfg, r) is None, (key.label(), cfg.label(), arch, r.facts)
    print(f"\ncompiled {len(jobs)} update_state kernels in {wall:.1f} s")


def test_corner_configs_are_extreme_and_valid():
    for key in family.standard_keys():
        corners = family.corner_configs(key)
        mma = [c for c in corners if c.impl == "mma_sync"]
        wgmma = [c for c in corners if c.impl == "wgmma"]
        assert mma[0].tile_m == 16 and mma[0].warps == 1
        assert len(mma) == 2 and mma[1].tile_m >= family.default_config(key).tile_m
        for cfg in mma:
            family.check(key, cfg, "sm_80")
        if key.head_dim in (64, 128):
            assert len(wgmma) == 2 and wgmma[0].tile_m == 64 and wgmma[1].tile_m >= 128, key.label()
        else:
            assert not wgmma
        for cfg in wgmma:
            family.check(key, cfg, "sm_90a")


# ---- the Hopper implementation: chosen per arch, built for sm_90a, wgmma in its PTX ---------------
def test_default_implementation_and_targets():
    """mma_sync stays the default everywhere (measured faster on the H200, see default_config_for's note);
    a wgmma config compiles for sm_90a."""
    for d in (32, 64, 128):
        key = KEY.model_copy(update={"head_dim": d, "d_tile": 8 if d > 32 else 4})
        for arch in ("sm_80", "sm_90", None):
            assert family.default_config_for(key, arch) == family.default_config(key)
    wg = family.wgmma_config(KEY)
    assert wg.impl == "wgmma" and family.target_arch(wg, "sm_90") == "sm_90a"
    assert family.target_arch(family.default_config(KEY), "sm_90") == "sm_90"
    for key in family.standard_keys() + [KEY.model_copy(update={"head_dim": 128, "d_tile": 16, "chunk_size": 128})]:
        if key.head_dim in (64, 128):
            family.check(key, family.wgmma_config(key), "sm_90")  # fits (shared memory, registers)


def test_wgmma_rules_name_the_field():
    wg = UpdateStateConfig(impl="wgmma", tile_m=128, warps=4)
    with pytest.raises(ConfigError, match=r"impl='wgmma': needs a Hopper GPU.*impl='mma_sync' on sm_80"):
        family.check(KEY, wg, "sm_80")
    with pytest.raises(ConfigError, match=r"impl='wgmma': takes head_dim in \(64, 128\), not head_dim=32"):
        family.check(KEY.model_copy(update={"head_dim": 32, "d_tile": 4}), wg, "sm_90")
    with pytest.raises((ConfigError, ValidationError), match=r"warps=2.*multiple of 4.*wgmma"):
        UpdateStateConfig(impl="wgmma", tile_m=128, warps=2)
    with pytest.raises(ValidationError, match="impl"):
        UpdateStateConfig(impl="hgmma")


@pytest.mark.parametrize("d,d_tile,dtype,gating", [(64, 8, "bfloat16", True), (128, 8, "float16", False),
                                                   (64, 1, "bfloat16", True)])
def test_wgmma_ptx_issues_wgmma_not_mma_sync(d, d_tile, dtype, gating):
    """No silent fallback to HMMA: the sm_90a PTX carries wgmma.mma_async (S and the s column per step)
    and no mma.sync; the mma_sync implementation's PTX the reverse."""
    from vidrial.core.compile import ptx_of

    key = UpdateStateKey(head_dim=d, d_tile=d_tile, dtype=dtype, chunk_size=1024, gating=gating)
    cfg = family.wgmma_config(key)
    ptx = ptx_of(family.render(key, cfg), "sm_90a")
    mt, nstep = cfg.tile_m // (cfg.warps // 4) // 64, (2 if cfg.tile_k >= 32 else 1)
    per_step = mt * (1 if d == 64 else 2)  # d = 64: s rides in the V wgmma (N = 72); d = 128: its own m64n8
    assert ptx.count("wgmma.mma_async") == per_step * nstep * (cfg.tile_k // (16 * nstep))
    shapes = ["m64n72k16"] if d == 64 else ["m64n128k16", "m64n8k16"]
    assert all(sh in ptx for sh in shapes) and "mma.sync" not in ptx
    assert "fence.proxy.async" in ptx and "wgmma.wait_group" in ptx
    ptx80 = ptx_of(family.render(key, family.default_config(key)), "sm_80")
    assert "mma.sync" in ptx80 and "wgmma" not in ptx80


def test_tuned_entries_keep_their_implementations_hash():
    """A tuned mma_sync entry is stale only when update_state.cu.j2 changes, a wgmma one only when
    update_state_wgmma.cu.j2 does; the studies' name covers both."""
    from vidrial.core.render import template_hash

    mma, wg = family.default_config(KEY), family.wgmma_config(KEY)
    assert family.template_hash_for(mma) == template_hash("update_state.cu.j2")
    assert family.template_hash_for(wg) == template_hash("update_state_wgmma.cu.j2")
    assert family.template_hash not in (family.template_hash_for(mma), family.template_hash_for(wg))


# ---- input checks (CPU tensors: checks run before the device check and the launch) -------------
def _kv(b=1, t=128, h=2, d=64, dtype=torch.bfloat16):
    return torch.randn(b, t, h, d).to(dtype), torch.randn(b, t, h, d).to(dtype)


@pytest.mark.parametrize("mutate,argument,pattern", [
    (lambda K, V, G: (K.float(), V, G), "K", "bfloat16 or torch.float16"),
    (lambda K, V, G: (K, V.half(), G), "V", "dtype of K"),
    (lambda K, V, G: (K[0], V[0], G), "K", "4 dims"),
    (lambda K, V, G: (K[..., :48], V[..., :48], G), "K", "head_dim in"),
    (lambda K, V, G: (K, V[:, :64], G), "V", "shape of K"),
    (lambda K, V, G: (K.transpose(2, 3).contiguous().transpose(2, 3), V, G), "K", "contiguous last dim"),
    (lambda K, V, G: (K, V, G.double()), "log_G", "float32"),
    (lambda K, V, G: (K, V, G[:, :64]), "log_G", "shape"),
    (lambda K, V, G: (K[:, :120], V[:, :120], None), "K", "multiple of chunk_size"),
])
def test_input_checks_name_argument(mutate, argument, pattern):
    K, V = _kv()
    G = torch.nn.functional.logsigmoid(torch.randn(1, 128, 2))
    K, V, G = mutate(K, V, G)
    with pytest.raises(InputError, match=rf"^{argument}: got .*{pattern}"):
        update_state(K, V, G, chunk_size=64)


def test_input_checks_strides_and_options():
    K, V = _kv()
    with pytest.raises(InputError, match=r"^deg: got 3"):
        update_state(K, V, deg=3, chunk_size=64)
    with pytest.raises(InputError, match=r"^d_tile: got 5"):
        update_state(K, V, d_tile=5, chunk_size=64)
    with pytest.raises(InputError, match=r"^chunk_size: got 40"):
        update_state(K, V, chunk_size=40)
    # time stride not a multiple of 8 elements: a view with an odd stride
    base = torch.randn(1, 128, 2, 68).to(torch.bfloat16)
    with pytest.raises(InputError, match=r"^K: got strides.*multiples of 8"):
        update_state(base[..., :64], base[..., :64], chunk_size=64)
    # a well-formed strided view passes every check and only fails on the device
    wide = torch.randn(1, 128, 2, 128).to(torch.bfloat16)
    with pytest.raises(InputError, match=r"^K: got device cpu.*CUDA"):
        update_state(wide[..., :64], wide[..., 64:], chunk_size=64)
    with pytest.raises(InputError, match=r"^K: got device cpu"):
        update_state(K, V, chunk_size=64)


def test_select_config_goes_through_the_dispatcher(monkeypatch):
    from vidrial import dispatch

    seen = {}

    def fake_select(fam, key, gpu=None):
        seen.update(fam=fam, key=key, gpu=gpu)
        return UpdateStateConfig(tile_m=64)

    monkeypatch.setattr(dispatch, "current_gpu", lambda device_index=None: f"gpu{device_index}")
    monkeypatch.setattr(dispatch, "select_config", fake_select)
    assert family.config_for(KEY, torch.device("cuda", 3)) == UpdateStateConfig(tile_m=64)
    assert seen == dict(fam=family, key=KEY, gpu="gpu3")


def test_record_keeps_the_faster_implementation(tmp_path):
    """Entries of the two implementations carry different template hashes; neither is stale because of
    the other: record keeps the faster, and an entry whose own template changed is replaced."""
    from vidrial.dispatch.store import GpuIdentity, load_file, record

    gpu = GpuIdentity(name="NVIDIA H200", arch="sm_90", sm_count=132)
    wg, mma = family.wgmma_config(KEY), family.default_config(KEY)

    def winner():
        (entry,) = load_file(tmp_path / gpu.slug / "update_state.json").entries.values()
        return UpdateStateConfig.model_validate(entry.config), entry

    record(family, KEY, wg, gpu=gpu, time_ms=0.50, default_time_ms=None, trials=3, directory=tmp_path)
    record(family, KEY, mma, gpu=gpu, time_ms=0.60, default_time_ms=None, trials=3, directory=tmp_path)
    config, entry = winner()
    assert config == wg and entry.template_hash == family.template_hash_for(wg)
    record(family, KEY, mma, gpu=gpu, time_ms=0.40, default_time_ms=None, trials=3, directory=tmp_path)
    config, entry = winner()
    assert config == mma and entry.template_hash == family.template_hash_for(mma)
    # an entry whose own template changed since is stale: a slower fresh one replaces it
    path = tmp_path / gpu.slug / "update_state.json"
    path.write_text(path.read_text().replace(entry.template_hash, "0" * 16))
    record(family, KEY, wg, gpu=gpu, time_ms=0.90, default_time_ms=None, trials=3, directory=tmp_path)
    assert winner()[0] == wg
