"""Inference on the CPU: decode_step config/key validation, deterministic rendering, NVRTC compiles
of default + corner configs (sm_80, sm_90), the kernel's algorithm emulated in float64 against the
reference (split-D state partials, cache tiles with their own max shift, stabilised merge), the
token-by-token decode loop with compression against the training forward, and the input errors of
vidrial.power_retention_inference (layout mismatch included) on CPU tensors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from vidrial.core.compile import CompiledKernel, compile_many
from vidrial.core.errors import ConfigError, InputError
from vidrial.kernels import get_family
from vidrial.kernels.power_retention.decode import DecodeConfig, DecodeKey, family
from vidrial.reference.decode import emulate_decode_step
from vidrial.reference.forward import (
    power_retention_inference_reference,
    power_retention_reference,
    update_state_reference,
)
from vidrial.kernels.power_retention.sympow import feature_dim

KEY = DecodeKey(head_dim=64, deg=2, d_tile=8, dtype="bfloat16", state_dtype="float32", gating=True)


def test_registered():
    assert get_family("decode_step") is family


@pytest.mark.parametrize("fields,field", [
    (dict(tile_f=96), "tile_f"), (dict(warps=1), "warps"), (dict(cache_tile=48), "cache_tile"),
    (dict(unroll=3), "unroll"), (dict(load_bytes=4), "load_bytes"),
])
def test_config_validation(fields, field):
    with pytest.raises((ConfigError, ValidationError), match=rf"{field}={fields[field]}"):
        DecodeConfig(**fields)


@pytest.mark.parametrize("fields,field", [
    (dict(head_dim=48), "head_dim"), (dict(head_dim=64, deg=3), "deg"), (dict(head_dim=64, d_tile=5), "d_tile"),
    (dict(head_dim=64, group=8, q_len=3), "group"), (dict(head_dim=64, bh_bucket=3), "bh_bucket"),
    (dict(head_dim=64, state_dtype="fp16"), "state_dtype"),
])
def test_key_validation(fields, field):
    with pytest.raises((ConfigError, ValidationError), match=field):
        DecodeKey(**fields)


def test_check_rules():
    # d=32 bf16 state, 16-byte loads: 4 loads per row, 256 threads -> 64 rows per pass
    k32 = DecodeKey(head_dim=32, deg=2, d_tile=8, state_dtype="bfloat16")
    with pytest.raises(ConfigError, match="tile_f=32"):
        family.check(k32, DecodeConfig(tile_f=32, warps=8), "sm_90")
    big = DecodeKey(head_dim=128, deg=2, d_tile=8, state_dtype="bfloat16", group=16)
    with pytest.raises(ConfigError, match="registers"):
        family.check(big, DecodeConfig(tile_f=1024, warps=8, unroll=16, load_bytes=16), "sm_90")


def test_key_split_json_and_defaults():
    assert set(KEY.runtime_part()) == {"bh_bucket"}
    assert DecodeKey.model_validate_json(KEY.model_dump_json()) == KEY
    for key in family.standard_keys():
        for cfg in family.corner_configs(key):
            family.check(key, cfg, "sm_80")
            assert DecodeConfig.model_validate_json(cfg.model_dump_json()) == cfg
    # more heads -> larger state tiles (fewer, longer CTAs); few heads -> split D finer
    small = family.default_config(KEY.model_copy(update={"bh_bucket": 8}))
    large = family.default_config(KEY.model_copy(update={"bh_bucket": 512}))
    assert small.tile_f < large.tile_f


def test_render_is_deterministic():
    cfg = family.default_config(KEY)
    a, b = family.render(KEY, cfg), family.render(KEY, cfg)
    assert a.source == b.source and a.entry == b.entry
    assert family.render(KEY.model_copy(update={"gating": False}), cfg).source_hash != a.source_hash
    assert family.render(KEY.model_copy(update={"state_dtype": "bfloat16"}), cfg).source_hash != a.source_hash
    # the runtime bucket never changes the source (no recompile for a new batch size)
    assert family.render(KEY.model_copy(update={"bh_bucket": 512}), cfg).source == a.source


_COMPILE_KEYS = [
    KEY,
    DecodeKey(head_dim=64, deg=2, d_tile=8, state_dtype="bfloat16", gating=False),
    DecodeKey(head_dim=128, deg=2, d_tile=8, dtype="float16", state_dtype="bfloat16", group=4, q_len=2),
    DecodeKey(head_dim=32, deg=4, d_tile=4, state_dtype="float32", group=2),
]


@pytest.mark.slow
def test_nvrtc_compiles_default_and_corner_configs():
    jobs, labels = [], []
    for key in _COMPILE_KEYS:
        for i, cfg in enumerate(family.corner_configs(key)):
            for arch in (("sm_80", "sm_90") if i == 0 else ("sm_90",)):
                jobs.append((family.render(key, cfg), arch, (), f"{key.label()} | {cfg.label()}"))
                labels.append((key, cfg, arch, i == 0))
    results = compile_many(jobs)
    for (key, cfg, arch, is_default), res in zip(labels, results):
        assert isinstance(res, CompiledKernel), f"{key.label()} | {cfg.label()} {arch}: {res}"
        if is_default:
            assert not res.facts.spills, f"default config spills: {key.label()} {arch} {res.facts}"
            assert family.infeasible_reason(key, cfg, res) is None


# ---- the kernel's algorithm, emulated in float64, against the reference -------------------------
def _state(b, h, d, deg, d_tile, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    K0, V0 = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, h, d, generator=g)
    S, s = update_state_reference(K0, V0, None, deg, d_tile, t)
    return S[:, 0], s[:, 0]


@pytest.mark.parametrize("b,tq,h,r,d,deg,d_tile,L,gating,with_state,tile_f,ct", [
    (2, 1, 2, 1, 32, 2, 8, 100, True, True, 64, 32),
    (1, 2, 2, 2, 32, 2, 4, 70, True, True, 64, 32),
    (2, 1, 2, 2, 64, 2, 8, 0, False, True, 256, 64),
    (1, 3, 1, 1, 32, 4, 4, 40, True, True, 1024, 32),
    (2, 1, 2, 1, 32, 2, 8, 33, False, False, 64, 32),
    (1, 1, 2, 4, 64, 2, 16, 200, True, True, 128, 64),
    (1, 4, 1, 4, 32, 2, 1, 5, True, True, 32, 32),
])
def test_emulation_matches_reference(b, tq, h, r, d, deg, d_tile, L, gating, with_state, tile_f, ct):
    g = torch.Generator().manual_seed(1)
    Q = torch.randn(b, tq, h * r, d, generator=g)
    K = torch.randn(b, L, h, d, generator=g) if L else None
    V = torch.randn(b, L, h, d, generator=g) if L else None
    G = torch.nn.functional.logsigmoid(3 + torch.randn(b, L, h, generator=g)) if gating and L else None
    S, z = _state(b, h, d, deg, d_tile) if with_state else (None, None)
    Ye = emulate_decode_step(Q, K, V, G, S, z, deg=deg, d_tile=d_tile, tile_f=tile_f, cache_tile=ct)
    Yr, _, _ = power_retention_inference_reference(Q, K, V, G, S, z, deg=deg, switch_over_seq_len=None, d_tile=d_tile)
    err = ((Ye - Yr).abs().max() / Yr.abs().max()).item()
    assert err < 1e-10, err


def test_emulation_is_stable_without_gating_at_long_history():
    """An ungated state of a long history (large A, B) next to a short cache: the shared stabiliser
    keeps everything finite and exact."""
    b, h, d, deg, dt = 1, 1, 32, 2, 8
    S, z = _state(b, h, d, deg, dt, t=64)
    S, z = S * 1e3, z * 1e3  # as if 64k tokens
    g = torch.Generator().manual_seed(2)
    Q = torch.randn(b, 1, h, d, generator=g) * 4
    K, V = torch.randn(b, 10, h, d, generator=g) * 4, torch.randn(b, 10, h, d, generator=g)
    Ye = emulate_decode_step(Q, K, V, None, S, z, deg=deg, d_tile=dt, tile_f=64, cache_tile=32)
    Yr, _, _ = power_retention_inference_reference(Q, K, V, None, S, z, deg=deg, switch_over_seq_len=None, d_tile=dt)
    assert torch.isfinite(Ye).all()
    assert ((Ye - Yr).abs().max() / Yr.abs().max()).item() < 1e-10


@pytest.mark.parametrize("gating,r,deg,d,d_tile", [(True, 1, 2, 32, 8), (False, 2, 2, 32, 4), (True, 2, 4, 16, 4)])
def test_token_by_token_loop_equals_training_forward(gating, r, deg, d, d_tile):
    """The inference loop (vidrial.pipeline.decoding.step with the kernel's emulation and the float64
    update): cache grows to switch_over, is absorbed, dropped, ...; every Y equals the training
    forward over the whole sequence."""
    from vidrial.pipeline.decoding import step as _step, update_reference as _update_reference

    b, t, h, switch = 1, 45, 2, 16
    g = torch.Generator().manual_seed(3)
    Q = torch.randn(b, t, h * r, d, generator=g, dtype=torch.float64)
    K = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    V = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    G = torch.nn.functional.logsigmoid(2 + torch.randn(b, t, h, generator=g, dtype=torch.float64)) if gating else None
    Y_ref = power_retention_reference(Q, K, V, G, deg=deg, chunk_size=16, d_tile=d_tile)

    def decode(Qs, Ks, Vs, Gs, S, z):
        return emulate_decode_step(Qs, Ks, Vs, Gs, S, z, deg=deg, d_tile=d_tile, tile_f=64, cache_tile=32)

    S = z = None
    start = 0
    absorbed = 0
    for i in range(t):
        sl = slice(start, i + 1)
        Y, S2, z2 = _step(Q[:, i:i + 1], K[:, sl], V[:, sl], G[:, sl] if gating else None, S, z, deg=deg, scale=None,
                          switch_over_seq_len=switch, d_tile=d_tile, new_dtype=torch.float64, decode=decode,
                          update=_update_reference)
        err = ((Y[:, 0] - Y_ref[:, i]).abs().max() / Y_ref[:, i].abs().max()).item()
        assert err < 1e-9, (i, err)
        if S2 is not S:
            absorbed += 1
            start = i + 1
            S, z = S2, z2
    assert absorbed == t // switch
    # the final state equals the training forward's final state at the last absorption
    _, S_ref, s_ref = power_retention_reference(Q[:, :start], K[:, :start], V[:, :start],
                                                G[:, :start] if gating else None, return_final_state=True,
                                                deg=deg, chunk_size=16, d_tile=d_tile)
    assert ((S - S_ref).abs().max() / S_ref.abs().max()).item() < 1e-10
    assert ((z - s_ref).abs().max() / s_ref.abs().max()).item() < 1e-10


# ---- input errors on CPU tensors (checked before anything touches a GPU) --------------------------
def _inputs(b=2, tq=1, L=5, h=2, r=1, d=64, deg=2, d_tile=8, state=True, dtype=torch.bfloat16):
    D = feature_dim(d, deg, d_tile)
    out = dict(Q=torch.randn(b, tq, h * r, d).to(dtype), K=torch.randn(b, L, h, d).to(dtype),
               V=torch.randn(b, L, h, d).to(dtype), log_G=torch.zeros(b, L, h))
    if state:
        out.update(initial_state=torch.zeros(b, h, D, d), sum_of_keys=torch.zeros(b, h, D))
    return out


def test_layout_mismatch_is_a_clear_error():
    from vidrial import power_retention_inference

    x = _inputs(d_tile=16)  # a state in the d_tile=16 layout (D=2560), called with the default d_tile=8
    with pytest.raises(InputError, match=r"initial_state.*D=2560.*d_tile=8\) = 2304.*pass d_tile=16"):
        power_retention_inference(**x)
    with pytest.raises(InputError, match=r"D=2304.*pass d_tile=8"):
        power_retention_inference(**_inputs(d_tile=8), d_tile=16)
    x = _inputs()
    x["initial_state"] = x["initial_state"][:, :, :2000]
    with pytest.raises(InputError, match=r"D=2000 is no layout"):
        power_retention_inference(**x)


def test_state_layout_record():
    from vidrial.inference import StateLayout

    S = torch.zeros(1, 1, feature_dim(64, 2, 16), 64, dtype=torch.bfloat16)
    lay = StateLayout.of(S, 64, 2)
    assert (lay.d_tile, lay.feature_dim, lay.dtype) == (16, 2560, "bfloat16")
    with pytest.raises(InputError, match="d_tile=8"):
        StateLayout.of(S, 64, 2, d_tile=8)


@pytest.mark.parametrize("change,argument", [
    (dict(Q=torch.randn(2, 1, 2, 64)), "Q"),  # float32 Q
    (dict(Q=torch.randn(2, 1, 2, 48).bfloat16()), "Q"),  # head dim
    (dict(K=None), "K"),  # V without K
    (dict(V=torch.randn(2, 5, 2, 64).half()), "V"),  # dtype mismatch
    (dict(log_G=torch.zeros(2, 5, 2, dtype=torch.float64)), "log_G"),
    (dict(log_G=torch.zeros(2, 4, 2)), "log_G"),
    (dict(sum_of_keys=None), "sum_of_keys"),
    (dict(initial_state=torch.zeros(2, 2, 2304, 64, dtype=torch.float16)), "initial_state"),
    (dict(sum_of_keys=torch.zeros(2, 2, 2304, dtype=torch.bfloat16)), "sum_of_keys"),
    (dict(initial_state=torch.zeros(2, 3, 2304, 64)), "initial_state"),
    (dict(Q=torch.randn(2, 6, 2, 64).bfloat16()), "Q"),  # more queries than the cache
    (dict(Q=torch.randn(2, 1, 3, 64).bfloat16()), "Q"),  # GQA ratio
    (dict(deg=3), "deg"), (dict(scale=float("nan")), "scale"), (dict(switch_over_seq_len=0), "switch_over_seq_len"),
    (dict(d_tile=5), "d_tile"), (dict(state_dtype=torch.float16), "state_dtype"),
    (dict(K=None, V=None), "log_G"),  # gates without a cache
    (dict(initial_state=torch.zeros(2, 2, 64, 2304).transpose(2, 3)), "initial_state"),  # strides
    (dict(), "Q"),  # everything fine but on the CPU: the device error comes last
])
def test_input_errors_name_the_argument(change, argument):
    from vidrial import power_retention_inference

    x = _inputs()
    x.update(change)
    with pytest.raises(InputError, match=rf"^{argument}"):
        power_retention_inference(**x)


def test_positive_log_G_is_an_input_error():
    from vidrial import power_retention_inference

    x = _inputs()
    x["log_G"] = -torch.rand(2, 5, 2)
    x["log_G"][1, 3, 0] = 0.25
    with pytest.raises(InputError, match=r"^log_G: got max value 0.25; expected values <= 0"):
        power_retention_inference(**x)


def test_log_G_values_are_checked_on_every_call_not_memoised(monkeypatch):
    """checks.checked_inference remembers the structural checks per shape; the gate values change from step to step."""
    from vidrial.pipeline import checks

    monkeypatch.setattr(checks, "_CHECKED", {})
    monkeypatch.setattr(checks, "check_inference", lambda *a: ("checked",))  # structure ok (CPU tensors)
    x = _inputs()
    args = [x["Q"], x["K"], x["V"], x["log_G"], x["initial_state"], x["sum_of_keys"], 2, None, 512, None, None]
    assert checks.checked_inference(*args) == ("checked",)
    args[3] = torch.full_like(x["log_G"], 0.5)  # same shape: a memo hit
    with pytest.raises(InputError, match=r"^log_G: got max value 0.5"):
        checks.checked_inference(*args)


def test_no_cache_and_no_state_is_an_error():
    from vidrial import power_retention_inference

    with pytest.raises(InputError, match="initial_state"):
        power_retention_inference(torch.randn(1, 1, 2, 64).bfloat16(), None, None)


def test_import_vidrial_stays_light():
    code = ("import sys, vidrial; assert 'torch' not in sys.modules; f = vidrial.power_retention_inference; "
            "assert callable(f); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_search_space_and_tuner_protocol_on_cpu():
    from vidrial.tuning.search_space import load_search_space

    space = load_search_space(family)
    configs = space.valid_configs(KEY, "sm_90")
    assert family.default_config(KEY) in configs and len(configs) > 50
    key = KEY.model_copy(update={"head_dim": 32, "bh_bucket": 16, "group": 2})
    inputs = family.make_inputs(key, torch.device("cpu"), seed=0)
    expected = family.reference(key, inputs)
    assert expected.shape == inputs["Q"].shape and torch.isfinite(expected.float()).all()
    Ye = emulate_decode_step(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], inputs["state"],
                             inputs["sum_of_keys"], deg=key.deg, d_tile=key.d_tile)
    assert family.check_outputs(key, inputs, Ye.to(inputs["Q"].dtype), expected) < family.tolerance(key)


@pytest.mark.parametrize("gating", [True, False])
def test_absorb_of_a_long_cache_combines_chunks(monkeypatch, gating):
    """Caches longer than one update_state chunk are absorbed chunk by chunk and combined with the
    gate from each chunk's end (update_state replaced by its float64 reference on the CPU)."""
    import vidrial.pipeline.decoding as inf
    import vidrial.kernels.power_retention.update_state as us

    def fake_update_state(K, V, G, *, deg, d_tile, chunk_size):
        S, s = update_state_reference(K, V, G, deg, d_tile, chunk_size)
        return S.float(), s.float()

    monkeypatch.setattr(us, "update_state", fake_update_state)
    monkeypatch.setattr(inf, "ABSORB_CHUNK", 32)
    g = torch.Generator().manual_seed(4)
    b, L, h, d = 1, 100, 2, 32
    K, V = torch.randn(b, L, h, d, generator=g), torch.randn(b, L, h, d, generator=g)
    G = torch.nn.functional.logsigmoid(2 + torch.randn(b, L, h, generator=g)) if gating else None
    S1, s1 = inf.update_gpu(K, V, G, 2, 8)
    S2, s2 = inf.update_reference(K, V, G, 2, 8)
    assert ((S1.double() - S2).abs().max() / S2.abs().max()).item() < 1e-5
    assert ((s1.double() - s2).abs().max() / s2.abs().max()).item() < 1e-5


@pytest.mark.parametrize("L,with_state", [(30, True), (30, False), (0, True)])
def test_many_new_tokens_split_into_kernel_sized_groups(L, with_state):
    """tq * r > 16 rows (speculative / chunked decoding): groups of new tokens, each against the
    cache prefix that ends with its last token, equal the one-shot reference."""
    from vidrial.pipeline.decoding import split_queries as _split_queries

    b, tq, h, r, d, deg, dt = 1, 11, 2, 2, 32, 2, 8
    g = torch.Generator().manual_seed(8)
    Q = torch.randn(b, tq, h * r, d, generator=g)
    K = torch.randn(b, L, h, d, generator=g) if L else None
    V = torch.randn(b, L, h, d, generator=g) if L else None
    G = torch.nn.functional.logsigmoid(3 + torch.randn(b, L, h, generator=g)) if L else None
    S, z = _state(b, h, d, deg, dt) if with_state else (None, None)

    def decode(Qs, Ks, Vs, Gs, S_, z_):
        assert Qs.shape[1] * r <= 16
        return emulate_decode_step(Qs, Ks, Vs, Gs, S_, z_, deg=deg, d_tile=dt, tile_f=64, cache_tile=32)

    Y = _split_queries(decode, Q, K, V, G, S, z, 16 // r)
    Yr, _, _ = power_retention_inference_reference(Q, K, V, G, S, z, deg=deg, switch_over_seq_len=None, d_tile=dt)
    assert ((Y - Yr).abs().max() / Yr.abs().max()).item() < 1e-10


@pytest.mark.parametrize("r,tq,L,with_state,launches", [
    (32, 1, 30, True, [16, 16]), (33, 1, 0, True, [11, 11, 11]), (20, 3, 30, False, [10] * 6),
    (17, 1, 12, True, [9, 8])])
def test_wide_gqa_group_splits_into_kernel_sized_row_groups(r, tq, L, with_state, launches):
    """Issue 17 item 9b: a GQA group wider than 16 rows per KV head runs as launches of <= 16 rows (equal
    groups of query heads, then groups of new tokens), each equal to the one-shot float64 reference."""
    from vidrial.kernels.power_retention.decode import MAX_ROWS
    from vidrial.pipeline.decoding import decode_rows

    b, h, d, deg, dt = 2, 2, 32, 2, 8
    g = torch.Generator().manual_seed(r + tq)
    Q = torch.randn(b, tq, h * r, d, generator=g)
    K = torch.randn(b, L, h, d, generator=g) if L else None
    V = torch.randn(b, L, h, d, generator=g) if L else None
    G = torch.nn.functional.logsigmoid(3 + torch.randn(b, L, h, generator=g)) if L else None
    S, z = _state(b, h, d, deg, dt) if with_state else (None, None)
    rows = []

    def decode(Qs, Ks, Vs, Gs, S_, z_):
        rows.append(Qs.shape[2] // h * Qs.shape[1])
        assert rows[-1] <= MAX_ROWS and Qs.shape[2] % h == 0
        return emulate_decode_step(Qs, Ks, Vs, Gs, S_, z_, deg=deg, d_tile=dt, tile_f=64, cache_tile=32)

    Y = decode_rows(decode, Q, K, V, G, S, z, h, MAX_ROWS)
    Yr, _, _ = power_retention_inference_reference(Q, K, V, G, S, z, deg=deg, switch_over_seq_len=None, d_tile=dt)
    assert rows == launches
    assert Y.shape == Q.shape
    assert ((Y - Yr).abs().max() / Yr.abs().max()).item() < 1e-10


def test_public_inference_at_group_32_never_runs_the_reference(monkeypatch):
    """power_retention_inference (its routing, on CPU tensors: validation and the launcher replaced by the
    kernel's float64 emulation) at GQA group 32: every launch has <= 16 rows, no float64 reference."""
    import vidrial.kernels.power_retention.decode as dec
    import vidrial.reference.forward as ref
    from vidrial import power_retention_inference
    from vidrial.pipeline import checks

    b, h, r, d, deg, dt, L = 1, 2, 32, 32, 2, 8, 20
    g = torch.Generator().manual_seed(32)
    Q = torch.randn(b, 1, h * r, d, generator=g).bfloat16()
    K, V = torch.randn(b, L, h, d, generator=g).bfloat16(), torch.randn(b, L, h, d, generator=g).bfloat16()
    G = torch.nn.functional.logsigmoid(3 + torch.randn(b, L, h, generator=g))
    S, z = _state(b, h, d, deg, dt)
    S, z = S.float(), z.float()
    Yr, _, _ = ref.power_retention_inference_reference(Q, K, V, G, S, z, deg=deg, switch_over_seq_len=None, d_tile=dt)
    real_check = checks.check_inference
    monkeypatch.setattr(checks, "_CHECKED", {})

    def check_on_cpu(*args):
        try:
            return real_check(*args)
        except InputError as e:  # CPU tensors: everything but the device is fine
            assert str(e).startswith("Q: got device cpu"), e
        return b, 1, h * r, h, d, L, dt, feature_dim(d, deg, dt)

    rows = []

    def launch(Qs, Ks, Vs, Gs, S_, z_, *, deg, d_tile, scale):
        rows.append(Qs.shape[2] // h * Qs.shape[1])
        assert rows[-1] <= dec.MAX_ROWS
        return emulate_decode_step(Qs, Ks, Vs, Gs, S_, z_, deg=deg, d_tile=d_tile, scale=scale).to(Qs.dtype)

    def no_reference(*a, **k):
        raise AssertionError("the float64 reference ran inside power_retention_inference")

    monkeypatch.setattr(checks, "check_inference", check_on_cpu)
    monkeypatch.setattr(dec, "decode_step", launch)
    monkeypatch.setattr(ref, "power_retention_inference_reference", no_reference)
    Y, S2, z2 = power_retention_inference(Q, K, V, G, S, z, deg=deg, switch_over_seq_len=None, d_tile=dt)
    assert rows == [16, 16] and S2 is S and z2 is z
    assert Y.shape == Q.shape and Y.dtype == Q.dtype
    assert ((Y.double() - Yr).abs().max() / Yr.abs().max()).item() < 1e-2
