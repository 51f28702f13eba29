"""Tuned-config store and dispatcher (CPU): schema, lookup order, nearest choice, stale and
corrupt files, user override, concurrent writers, `vidrial show --json`."""
from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import ClassVar

import pytest

from vidrial import dispatch
from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily
from vidrial.dispatch import store
from vidrial.dispatch.store import (
    SCHEMA_VERSION,
    GpuIdentity,
    Toolchain,
    TunedConfigWarning,
    TunedEntry,
    TunedFile,
    load_file,
    record,
)

REPO = Path(__file__).resolve().parent.parent


class NoopConfig(KernelConfig):
    block: int = 128
    unroll: int = 1


class NoopKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "scale")
    dtype: str = "float32"
    scale: int = 1
    n: int = 1024  # runtime bucket
    batch: int = 1  # runtime bucket


class NoopFamily(KernelFamily):
    """A trivial family over templates/testing/noop.cu.j2; `check` rejects block > n."""

    name = "test_noop"
    template = "testing/noop.cu.j2"
    Config = NoopConfig
    Key = NoopKey
    signature = ("ptr", "ptr", "i64")

    def default_config(self, key):
        return NoopConfig()

    def render_context(self, key, config):
        return {"scale": float(key.scale)}

    def threads_per_block(self, config):
        return config.block

    def dynamic_smem_bytes(self, key, config):
        return 0

    def check(self, key, config, arch):
        super().check(key, config, arch)
        if config.block > key.n:
            raise ConfigError("block", config.block, f"at most n={key.n}")

    def standard_keys(self):
        return [NoopKey(n=n) for n in (256, 1024, 4096)] + [NoopKey(dtype="bfloat16", n=1024)]


FAM = NoopFamily()
GPU = GpuIdentity(name="NVIDIA H200", arch="sm_90", sm_count=132)


def _record(key, config, directory, time_ms=1.0, **kw):
    return record(FAM, key, config, gpu=GPU, time_ms=time_ms, default_time_ms=kw.pop("default_time_ms", 2.0),
                  trials=kw.pop("trials", 10), directory=directory, **kw)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Empty shipped and user tuned dirs, a fresh dispatcher, no debug file writes."""
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    monkeypatch.setattr(store, "shipped_tuned_dir", lambda: shipped)
    monkeypatch.setenv("VIDRIAL_TUNED_DIR", str(user))
    monkeypatch.delenv("VIDRIAL_DEBUG_DISPATCH", raising=False)
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.reload()
    yield shipped, user
    dispatch.reload()


def _tuned_warnings(caught):
    return [w for w in caught if issubclass(w.category, TunedConfigWarning)]


# ---- schema --------------------------------------------------------------------------------

def test_gpu_slug_and_schema_round_trip(tmp_path):
    assert GPU.slug == "nvidia-h200"
    assert GpuIdentity(name="NVIDIA GeForce RTX 4090", arch="sm_89", sm_count=128).slug == "nvidia-geforce-rtx-4090"
    path = _record(NoopKey(n=512), NoopConfig(block=64, unroll=2), tmp_path, time_ms=0.5, default_time_ms=0.8)
    assert path == tmp_path / "nvidia-h200" / "test_noop.json"
    tuned = load_file(path)
    assert tuned is not None and tuned.schema_version == SCHEMA_VERSION == 1
    assert tuned.family == "test_noop" and tuned.gpu == "nvidia-h200"
    entry = tuned.entries[NoopKey(n=512).key_string()]
    assert NoopKey.model_validate(entry.key) == NoopKey(n=512)
    assert NoopConfig.model_validate(entry.config) == NoopConfig(block=64, unroll=2)
    assert entry.template_hash == FAM.template_hash and entry.gpu == GPU
    assert entry.time_ms == 0.5 and entry.default_time_ms == 0.8 and entry.trials == 10
    assert entry.tuned_at.endswith("Z") and "T" in entry.tuned_at
    assert isinstance(entry.toolchain, Toolchain) and entry.toolchain.torch
    # the JSON is exactly what the models write and read back
    again = TunedFile.model_validate_json(path.read_text())
    assert again == tuned
    assert TunedFile.model_validate_json(again.model_dump_json()) == again
    assert TunedEntry.model_validate(entry.model_dump(mode="json")) == entry


def test_record_keeps_faster_entry_unless_template_changed(tmp_path):
    key = NoopKey(n=512)
    path = _record(key, NoopConfig(block=64), tmp_path, time_ms=1.0)
    _record(key, NoopConfig(block=32), tmp_path, time_ms=2.0)  # slower: ignored
    assert load_file(path).entries[key.key_string()].config == {"block": 64, "unroll": 1}
    _record(key, NoopConfig(block=256), tmp_path, time_ms=0.5)  # faster: replaces
    assert load_file(path).entries[key.key_string()].config == {"block": 256, "unroll": 1}
    # an entry for an old template is replaced even by a slower one
    data = json.loads(path.read_text())
    data["entries"][key.key_string()]["template_hash"] = "0" * 16
    path.write_text(json.dumps(data))
    _record(key, NoopConfig(block=32), tmp_path, time_ms=9.0)
    entry = load_file(path).entries[key.key_string()]
    assert entry.config == {"block": 32, "unroll": 1} and entry.template_hash == FAM.template_hash


def test_merge_ships_a_run_replacing_its_keys_and_keeping_the_rest(tmp_path):
    """`vidrial ship` (store.merge): the run's entry replaces the shipped one for the same key even when
    the shipped time is faster (the run is the newer measurement); other shipped keys stay."""
    from vidrial.cli import main

    run, shipped = tmp_path / "run", tmp_path / "shipped"
    kept, retuned, new = NoopKey(n=256), NoopKey(n=512), NoopKey(n=1024)
    _record(kept, NoopConfig(block=64), shipped, time_ms=1.0)
    _record(retuned, NoopConfig(block=64), shipped, time_ms=0.1)
    _record(retuned, NoopConfig(block=128), run, time_ms=0.9)
    _record(new, NoopConfig(block=32), run, time_ms=0.5)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["ship", str(run), "--into", str(shipped)]) == 0
    assert "1 entries added, 1 replaced" in out.getvalue()
    entries = load_file(shipped / "nvidia-h200" / "test_noop.json").entries
    assert entries[kept.key_string()].config == {"block": 64, "unroll": 1}
    assert entries[retuned.key_string()].config == {"block": 128, "unroll": 1}
    assert entries[retuned.key_string()].time_ms == 0.9
    assert entries[new.key_string()].config == {"block": 32, "unroll": 1}
    assert list(entries) == sorted(entries)
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["ship", str(tmp_path / "nothing")]) == 2  # a person's mistake: one line, exit code 2
    assert err.getvalue().startswith("vidrial ship: source: got")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    for n in (64, 128, 256):
        _record(NoopKey(n=n), NoopConfig(block=32), tmp_path)
    names = sorted(p.name for p in (tmp_path / "nvidia-h200").iterdir())
    assert names == ["test_noop.json", "test_noop.json.lock"] or names == ["test_noop.json"]
    assert len(load_file(tmp_path / "nvidia-h200" / "test_noop.json").entries) == 3


def _writer(directory: str, worker: int, count: int) -> None:
    for i in range(count):
        record(FAM, NoopKey(n=1024, batch=worker * 1000 + i), NoopConfig(block=32 * (1 + i % 4)), gpu=GPU,
               time_ms=0.1 + i, default_time_ms=None, trials=i, directory=Path(directory))


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    path = tmp_path / "nvidia-h200" / "test_noop.json"
    data = json.loads(path.read_text())  # valid JSON
    tuned = TunedFile.model_validate(data)
    expected = {NoopKey(n=1024, batch=w * 1000 + i).key_string() for w in range(4) for i in range(25)}
    assert set(tuned.entries) == expected and len(expected) == 100
    assert not list(path.parent.glob("*.tmp"))


# ---- dispatch ------------------------------------------------------------------------------

def test_lookup_order_exact_nearest_default(dirs):
    _, user = dirs
    _record(NoopKey(n=1024), NoopConfig(block=256), user)
    _record(NoopKey(n=8192), NoopConfig(block=512), user)
    dispatch.reload()
    # exact
    assert dispatch.select_config(FAM, NoopKey(n=1024), GPU) == NoopConfig(block=256)
    last = dispatch.last_dispatch()
    assert last.source == "exact" and last.family == "test_noop" and last.key == NoopKey(n=1024)
    assert last.path == user / "nvidia-h200" / "test_noop.json" and last.gpu == "nvidia-h200"
    # nearest: 2048 is 1 doubling from 1024 and 2 from 8192
    assert dispatch.select_config(FAM, NoopKey(n=2048), GPU) == NoopConfig(block=256)
    assert dispatch.last_dispatch().source == "nearest"
    assert dispatch.last_dispatch().tuned_key == NoopKey(n=1024)
    # other compile part (dtype): nothing compatible -> default
    assert dispatch.select_config(FAM, NoopKey(dtype="bfloat16", n=1024), GPU) == NoopConfig()
    assert dispatch.last_dispatch().source == "default" and dispatch.last_dispatch().path is None
    # memoised: the same answer again, and last_dispatch follows every call
    assert dispatch.select_config(FAM, NoopKey(n=1024), GPU) == NoopConfig(block=256)
    assert dispatch.last_dispatch().source == "exact"


def test_nearest_choice(dirs):
    _, user = dirs
    tuned = {(1024, 1): 64, (4096, 1): 128, (1024, 16): 256, (65536, 64): 512}
    for (n, batch), block in tuned.items():
        _record(NoopKey(n=n, batch=batch), NoopConfig(block=block), user)
    dispatch.reload()

    def pick(n, batch):
        cfg = dispatch.select_config(FAM, NoopKey(n=n, batch=batch), GPU)
        return cfg.block, dispatch.last_dispatch().source

    assert pick(2048, 2) == (64, "nearest")  # d(1024,1)=1+1=2, d(4096,1)=1+1=2 -> tie -> smaller key string
    assert dispatch.distance(NoopKey(n=2048, batch=2), NoopKey(n=1024, batch=1)) == pytest.approx(2.0)
    assert pick(4096, 2) == (128, "nearest")  # d=1 vs (1024,1): 3
    assert pick(1024, 8) == (256, "nearest")  # d=1 vs (1024,1): 3
    assert pick(32768, 64) == (512, "nearest")
    assert pick(1024, 16) == (256, "exact")
    # nothing that passes family.check (block <= n) -> default
    assert pick(16, 1) == (128, "default")


def test_nearest_must_pass_check(dirs):
    _, user = dirs
    _record(NoopKey(n=512), NoopConfig(block=512), user)
    _record(NoopKey(n=4096), NoopConfig(block=128), user)
    dispatch.reload()
    # n=300: nearest is n=512 (block 512 > 300, rejected by check), so the next one wins
    assert dispatch.select_config(FAM, NoopKey(n=300), GPU).block == 128
    assert dispatch.last_dispatch().source == "nearest"
    assert dispatch.last_dispatch().tuned_key == NoopKey(n=4096)
    assert dispatch.select_config(FAM, NoopKey(n=600), GPU).block == 512
    # an exact entry that fails check is not used either
    _record(NoopKey(n=100), NoopConfig(block=512), user)
    dispatch.reload()
    assert dispatch.select_config(FAM, NoopKey(n=100), GPU) == NoopConfig()
    assert dispatch.last_dispatch().source == "default"


def test_ties_are_deterministic(dirs):
    _, user = dirs
    # written in two orders: the tie (n=512 vs n=2048 around 1024) resolves the same way
    _record(NoopKey(n=2048), NoopConfig(block=32), user)
    _record(NoopKey(n=512), NoopConfig(block=64), user)
    dispatch.reload()
    first = dispatch.select_config(FAM, NoopKey(n=1024), GPU)
    expected = min([NoopKey(n=512), NoopKey(n=2048)], key=lambda k: k.key_string())
    assert dispatch.last_dispatch().tuned_key == expected
    dispatch.reload()
    assert dispatch.select_config(FAM, NoopKey(n=1024), GPU) == first


def test_compile_part_mismatch_never_matches(dirs):
    _, user = dirs
    _record(NoopKey(dtype="float32", scale=2, n=1024), NoopConfig(block=512), user)
    dispatch.reload()
    for key in (NoopKey(dtype="float32", scale=1, n=1024), NoopKey(dtype="float16", scale=2, n=1024),
                NoopKey(dtype="bfloat16", scale=3, n=1024)):
        assert dispatch.select_config(FAM, key, GPU) == NoopConfig()
        assert dispatch.last_dispatch().source == "default"
    assert dispatch.select_config(FAM, NoopKey(dtype="float32", scale=2, n=4096), GPU).block == 512


def test_user_dir_overrides_shipped(dirs):
    shipped, user = dirs
    _record(NoopKey(n=1024), NoopConfig(block=64), shipped)
    _record(NoopKey(n=4096), NoopConfig(block=128), shipped)
    dispatch.reload()
    assert dispatch.select_config(FAM, NoopKey(n=1024), GPU).block == 64
    assert dispatch.last_dispatch().path == shipped / "nvidia-h200" / "test_noop.json"
    # the user's entry for the same key wins, even when slower; shipped keys stay visible
    _record(NoopKey(n=1024), NoopConfig(block=256), user, time_ms=50.0)
    assert dispatch.select_config(FAM, NoopKey(n=1024), GPU).block == 64  # index is per process...
    dispatch.reload()  # ...until reload()
    assert dispatch.select_config(FAM, NoopKey(n=1024), GPU).block == 256
    assert dispatch.last_dispatch().path == user / "nvidia-h200" / "test_noop.json"
    assert dispatch.select_config(FAM, NoopKey(n=4096), GPU).block == 128
    assert dispatch.last_dispatch().source == "exact"


def test_record_defaults_to_user_dir(dirs):
    _, user = dirs
    path = record(FAM, NoopKey(n=64), NoopConfig(block=32), gpu=GPU, time_ms=1.0, default_time_ms=None, trials=1)
    assert path == user / "nvidia-h200" / "test_noop.json" and path.is_file()


def test_other_gpu_is_separate(dirs):
    _, user = dirs
    _record(NoopKey(n=1024), NoopConfig(block=64), user)
    dispatch.reload()
    other = GpuIdentity(name="NVIDIA A100-SXM4-80GB", arch="sm_80", sm_count=108)
    assert dispatch.select_config(FAM, NoopKey(n=1024), other) == NoopConfig()
    assert dispatch.last_dispatch().source == "default"


def test_stale_template_hash_ignored_with_one_warning(dirs):
    _, user = dirs
    path = _record(NoopKey(n=1024), NoopConfig(block=64), user)
    for n in (2048, 4096):
        _record(NoopKey(n=n), NoopConfig(block=128), user)
    data = json.loads(path.read_text())
    for ks in (NoopKey(n=1024).key_string(), NoopKey(n=2048).key_string()):
        data["entries"][ks]["template_hash"] = "deadbeefdeadbeef"
    path.write_text(json.dumps(data))
    dispatch.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.select_config(FAM, NoopKey(n=1024), GPU).block == 128  # nearest fresh one (4096)
        assert dispatch.last_dispatch().source == "nearest"
        assert dispatch.select_config(FAM, NoopKey(n=2048), GPU).block == 128
        assert dispatch.select_config(FAM, NoopKey(n=4096), GPU).block == 128
        assert dispatch.last_dispatch().source == "exact"
    found = _tuned_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    assert str(path) in str(found[0].message) and "template" in str(found[0].message)


def test_stale_schema_version_ignored_with_one_warning(dirs):
    _, user = dirs
    path = _record(NoopKey(n=1024), NoopConfig(block=64), user)
    data = json.loads(path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    dispatch.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (1024, 2048, 1024):
            assert dispatch.select_config(FAM, NoopKey(n=n), GPU) == NoopConfig()
            assert dispatch.last_dispatch().source == "default"
    found = _tuned_warnings(caught)
    assert len(found) == 1 and "schema version" in str(found[0].message)
    # a future schema whose entries do not even parse is stale too, not corrupt
    path.write_text(json.dumps({"schema_version": 99, "family": "test_noop", "gpu": "nvidia-h200",
                                "entries": {"x": {"totally": "different"}}}))
    dispatch.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.select_config(FAM, NoopKey(n=1024), GPU) == NoopConfig()
    found = _tuned_warnings(caught)
    assert len(found) == 1 and "schema version 99" in str(found[0].message)


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"schema_version": 1, "family": "test_noop"}',
                                     ""])
def test_corrupt_file_skipped_with_warning(dirs, content):
    shipped, user = dirs
    _record(NoopKey(n=1024), NoopConfig(block=64), shipped)
    bad = user / "nvidia-h200" / "test_noop.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    dispatch.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the shipped file still works; the corrupt user file is skipped
        assert dispatch.select_config(FAM, NoopKey(n=1024), GPU).block == 64
        assert dispatch.select_config(FAM, NoopKey(n=2048), GPU).block == 64
        assert dispatch.select_config(FAM, NoopKey(dtype="x", n=1024), GPU) == NoopConfig()
    found = _tuned_warnings(caught)
    assert len(found) == 1 and str(bad) in str(found[0].message)
    # load_file alone: None plus one warning, never an exception
    with pytest.warns(TunedConfigWarning):
        assert load_file(bad) is None


def test_record_over_corrupt_file_moves_it_aside(tmp_path):
    path = tmp_path / "nvidia-h200" / "test_noop.json"
    path.parent.mkdir(parents=True)
    path.write_text("{garbage")
    with pytest.warns(TunedConfigWarning):
        _record(NoopKey(n=64), NoopConfig(block=32), tmp_path)
    assert len(load_file(path).entries) == 1
    assert len(list(path.parent.glob("test_noop.json.bad-*"))) == 1


def test_last_dispatch_and_reload(dirs):
    assert dispatch.last_dispatch() is None
    dispatch.select_config(FAM, NoopKey(n=1024), GPU)
    d = dispatch.last_dispatch()
    assert d.source == "default" and d.as_dict()["config"] == {"block": 128, "unroll": 1}
    json.dumps(d.as_dict())
    dispatch.reload()
    assert dispatch.last_dispatch() is None


def test_debug_env_writes_last_dispatch_file(dirs, monkeypatch):
    monkeypatch.setenv("VIDRIAL_DEBUG_DISPATCH", "1")
    dispatch.reload()
    dispatch.select_config(FAM, NoopKey(n=1024), GPU)
    data = json.loads(dispatch.last_dispatch_file().read_text())
    assert data["family"] == "test_noop" and data["source"] == "default"


def test_no_gpu_and_no_identity_is_a_clear_error(dirs):
    import torch

    from vidrial.core.errors import InputError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError, match="gpu"):
        dispatch.select_config(FAM, NoopKey(n=1024))


def test_record_accepts_dicts_and_a_toolchain(tmp_path):
    tc = Toolchain(vidrial="0.1.0", nvrtc="13.0", cupy="13.6.0", torch="2.9.0", driver="13.0")
    path = record(FAM, {"n": 64}, {"block": 32}, gpu=GPU, time_ms=1.0, default_time_ms=None, trials=1,
                  directory=tmp_path, toolchain=tc)
    entry = load_file(path).entries[NoopKey(n=64).key_string()]
    assert entry.toolchain == tc and entry.default_time_ms is None and entry.config == {"block": 32, "unroll": 1}


def test_wrong_key_type_is_a_clear_error(dirs):
    from vidrial.core.errors import InputError

    with pytest.raises(InputError, match="NoopKey"):
        dispatch.select_config(FAM, {"n": 1024}, GPU)


# ---- vidrial show ----------------------------------------------------------------------------

def _show(argv, monkeypatch):
    from vidrial import cli, kernels

    monkeypatch.setitem(kernels._FAMILIES, FAM.name, FAM)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["show", *argv]) == 0
    return out.getvalue()


def test_show_json(dirs, monkeypatch):
    shipped, user = dirs
    _record(NoopKey(n=1024), NoopConfig(block=256), user, time_ms=1.0, default_time_ms=3.0)
    path = _record(NoopKey(n=4096), NoopConfig(block=64), shipped)
    data = json.loads(path.read_text())
    data["entries"][NoopKey(n=4096).key_string()]["template_hash"] = "0" * 16
    path.write_text(json.dumps(data))
    data = json.loads(_show(["--gpu", "NVIDIA H200", "--json"], monkeypatch))
    assert [g["gpu"] for g in data["gpus"]] == ["nvidia-h200"]
    fam = next(f for f in data["gpus"][0]["families"] if f["family"] == "test_noop")
    assert [e["key"] for e in fam["entries"]] == [NoopKey(n=1024).key_string()]
    assert fam["entries"][0]["speedup"] == pytest.approx(3.0)
    cov = fam["coverage"]
    assert cov["standard"] == 4 and cov["exact"] == 1 and cov["nearest"] == 2 and cov["default"] == 1
    assert [s["key"] for s in fam["stale"]] == [NoopKey(n=4096).key_string()]
    # with no GPU and no --gpu: every GPU found on disk
    data = json.loads(_show(["--json"], monkeypatch))
    assert "nvidia-h200" in [g["gpu"] for g in data["gpus"]]
    # text form mentions the same things
    text = _show(["--gpu", "nvidia-h200"], monkeypatch)
    assert "test_noop" in text and "stale" in text and "1 exact, 2 nearest, 1 default" in text


def test_show_last(dirs, monkeypatch):
    assert "none recorded" in _show(["--last"], monkeypatch)
    dispatch.select_config(FAM, NoopKey(n=1024), GPU)
    data = json.loads(_show(["--last", "--json"], monkeypatch))
    assert data["last"]["family"] == "test_noop" and data["last"]["source"] == "default"


# ---- benchmark (speed is reported, not asserted) ------------------------------------------------

def test_bench_dispatch_runs(dirs):
    spec = importlib.util.spec_from_file_location("bench_dispatch", REPO / "benchmarks" / "bench_dispatch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(entries=50, number=200, repeat=3)
    assert result["median_us"] > 0 and set(result["sources"]) <= {"exact", "nearest", "default"}
    print(f"select_config warm overhead: {result['median_us']:.2f} us")


def test_dispatch_does_not_import_the_tuner():
    """Kernels call vidrial.dispatch.select_config: the store and dispatcher must not load vidrial.tuning."""
    import subprocess
    import sys

    code = "import sys, vidrial.dispatch; print(','.join(m for m in sys.modules if m.startswith('vidrial.tuning')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == ""
