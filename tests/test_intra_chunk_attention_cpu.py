"""Intra-chunk attention family on the CPU: config/key validation, deterministic rendering, and
NVRTC compiles (sm_80, sm_90) of the default and corner configs of every standard key."""
import pytest

from vidrial.core.compile import CompiledKernel, compile_many
from vidrial.core.errors import CompileError, ConfigError, InputError
from vidrial.kernels import families, get_family
from vidrial.kernels.power_retention.intra_chunk_attention import (
    IntraChunkAttentionConfig as Config,
    IntraChunkAttentionKey as Key,
    family,
    intra_chunk_attention,
)


def test_registered():
    assert families()["intra_chunk_attention"] is family
    assert get_family("intra_chunk_attention") is family


@pytest.mark.parametrize("fields, bad", [
    (dict(tile_m=48), "tile_m"),
    (dict(tile_n=24), "tile_n"),
    (dict(warps=3), "warps"),
    (dict(stages=1), "stages"),
    (dict(stages=5), "stages"),
    (dict(tile_m=64, warps=8), "tile_m"),  # 64 is not a multiple of 16 * 8
    (dict(tile_m=256, warps=1, tile_n=16), "tile_m"),  # 16 fragments per warp
    (dict(tile_m=32, tile_n=64, warps=1), "tile_n"),  # tile_n must divide tile_m
    (dict(tile_m=128, tile_n=128, warps=2), "tile_n"),  # one thread per key
    (dict(rescale_log2=13), "rescale_log2"),
    (dict(min_ctas=0), "min_ctas"),
])
def test_config_validation(fields, bad):
    # pydantic wraps the ConfigError raised by a validator in a ValidationError (a ValueError)
    with pytest.raises(ValueError) as exc:
        Config(**fields)
    assert f"{bad}=" in str(exc.value)


@pytest.mark.parametrize("fields, bad", [
    (dict(head_dim=96), "head_dim"),
    (dict(head_dim=64, deg=3), "deg"),
    (dict(head_dim=64, chunk_size=100), "chunk_size"),
    (dict(head_dim=64, bh_bucket=3), "bucket"),
])
def test_key_validation(fields, bad):
    with pytest.raises(ValueError) as exc:
        Key(**fields)
    assert f"{bad}=" in str(exc.value)


def test_check_rules():
    key = Key(head_dim=64, chunk_size=64)
    with pytest.raises(ConfigError, match="chunk_size=64"):
        family.check(key, Config(tile_m=128, tile_n=64, warps=4), "sm_90")
    big = Key(head_dim=128, chunk_size=1024)
    with pytest.raises(ConfigError, match="registers"):
        family.check(big, Config(tile_m=256, tile_n=128, warps=4), "sm_90")
    # shared memory: 128 x 128 Q + 4 stages x 2 x 128 x 128 (K, V), bf16: 288 KiB
    with pytest.raises(ConfigError, match="shared memory"):
        family.check(Key(head_dim=128, chunk_size=0), Config(tile_m=128, tile_n=128, warps=8, stages=4), "sm_90")


def test_defaults_valid_for_standard_keys():
    keys = family.standard_keys()
    assert len(keys) == len(set(keys))
    for key in keys:
        for arch in ("sm_80", "sm_90"):
            family.check(key, family.default_config(key), arch)
            for cfg in family.corner_configs(key):
                family.check(key, cfg, "sm_80")
    # small chunks shrink the default tile
    assert family.default_config(Key(head_dim=64, chunk_size=64)).tile_m == 64
    assert family.default_config(Key(head_dim=64, chunk_size=48)).tile_m == 16


def test_rendering_is_deterministic_and_keyed():
    key = Key(head_dim=64, chunk_size=1024)
    cfg = family.default_config(key)
    a, b = family.render(key, cfg), family.render(key, cfg)
    assert a.source == b.source and a.entry == b.entry
    assert "mma.sync.aligned.m16n8k16" in a.source and "ldmatrix" in a.source
    other = family.render(key.model_copy(update={"normalize": True}), cfg)
    assert other.entry != a.entry and other.source != a.source
    fp16 = family.render(key.model_copy(update={"dtype": "float16"}), cfg)
    assert "mma_16816_f16(c, a, b0, b1)" in fp16.source
    assert "mma_16816_bf16(c, a, b0, b1)" in a.source


def test_config_json_roundtrip():
    cfg = Config(tile_m=64, tile_n=32, warps=2, stages=3, rescale_log2=4, min_ctas=2)
    assert Config.model_validate_json(cfg.model_dump_json()) == cfg
    key = Key(head_dim=32, deg=4, chunk_size=0, normalize=True, gating=False)
    assert Key.model_validate_json(key.model_dump_json()) == key
    assert key.compile_part() == dict(head_dim=32, deg=4, dtype="bfloat16", chunk_size=0, gating=False, normalize=True)


def test_launcher_input_errors():
    import torch

    q = torch.zeros(1, 16, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(InputError) as exc:
        intra_chunk_attention(q.float(), q, q, deg=2, chunk_size=64)
    assert exc.value.argument == "Q"
    with pytest.raises(InputError) as exc:
        intra_chunk_attention(q[..., :48].contiguous(), q, q, deg=2, chunk_size=64)
    assert exc.value.argument == "Q"
    with pytest.raises(InputError) as exc:  # CPU tensors
        intra_chunk_attention(q, q, q, deg=2, chunk_size=64)
    assert exc.value.argument == "Q"


def _all_jobs():
    jobs = []
    for key in family.standard_keys():
        default = family.default_config(key)
        configs = [default] + [c for c in family.corner_configs(key) if c != default]
        for cfg in dict.fromkeys(configs):
            for arch in ("sm_80", "sm_90"):
                jobs.append((family.render(key, cfg), arch, (), f"{key.label()} | {cfg.label()}", cfg == default))
    return jobs


@pytest.mark.slow
def test_compile_standard_keys_default_and_corners():
    """Every default and corner config compiles; the defaults also fit the register file without
    spilling (a corner may spill a little: the tuner drops it from its compiled facts)."""
    jobs = _all_jobs()
    # distinct configs of a key can render the same source (22 of the 110 jobs): each (source, arch) is compiled
    # once and its result checked for every config that renders it
    unique = {}
    for j in jobs:
        unique.setdefault((j[0].source, j[0].entry, j[1]), j[:4])
    compiled = dict(zip(unique, compile_many(list(unique.values()))))
    results = [compiled[(j[0].source, j[0].entry, j[1])] for j in jobs]
    errors = [r for r in results if isinstance(r, CompileError)]
    assert not errors, str(errors[0])[:4000]
    for (kernel, arch, _, label, is_default), res in zip(jobs, results):
        assert isinstance(res, CompiledKernel)
        assert res.cubin, label
        if is_default:
            assert not res.facts.spills, f"{arch} {label}: {res.facts}"


def test_search_space_contains_defaults():
    from vidrial.tuning.search_space import load_search_space

    space = load_search_space(family)
    for key in family.standard_keys():
        valid = space.valid_configs(key, "sm_90")
        assert valid, key.label()
        assert family.default_config(key) in valid, key.label()


@pytest.mark.parametrize("normalize, chunk", [(False, 64), (True, 0), (True, 64)])
def test_tuner_protocol_inputs_and_reference(normalize, chunk):
    key = Key(head_dim=32, chunk_size=chunk, normalize=normalize, t_bucket=128)
    inputs = family.make_inputs(key, "cpu", seed=1)
    # the key's own sizes: b*hq = bh_bucket = 8 query heads on 4 KV heads, t = t_bucket - 3
    assert inputs["Q"].shape == (1, 125, 8, 32) and inputs["log_G"].shape == (1, 125, 4)
    ref = family.reference(key, inputs)  # float64 on the first KV head's 2 query heads
    if normalize:
        assert ref.shape == (1, 125, 2, 32)
    else:
        O, l, m = ref
        assert O.shape == (1, 125, 2, 32) and l.shape == m.shape == (1, 125, 2)
        assert (l >= 1).all()
