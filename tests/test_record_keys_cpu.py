"""Issue 18, CPU: recording the keys a model run dispatches (`vidrial.tuning.record`), on meta tensors and
on the CPU host emulation; `vidrial tune --keys FILE` tuning exactly them (fake backend); a GPU without
tuned entries borrowing the nearest same-arch GPU's (warned once, marked in last_dispatch and show)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import tuning_doubles as T
import vidrial
from vidrial import dispatch
from vidrial.core.errors import InputError
from vidrial.dispatch import UntunedGpuWarning, store
from vidrial.dispatch.store import GpuIdentity
from vidrial.kernels.power_retention.sympow import layout
from vidrial.tuning import record

from test_store_dispatch import FAM, GPU, NoopConfig, NoopKey, _record

REPO = Path(__file__).resolve().parent.parent
FORWARD = ("update_state", "discumsum", "intra_chunk_attention", "query_state")
BACKWARD = ("query_state_bwd", "discumsum_bwd", "update_state_bwd", "intra_chunk_attention_bwd")


def _meta_step(b=1, t=256, hq=4, h=2, d=32, chunk=64):
    """One training step of vidrial.power_retention (autograd op) on meta tensors."""
    kw = dict(device="meta", requires_grad=True)
    Q = torch.randn(b, t, hq, d, dtype=torch.bfloat16, **kw)
    K = torch.randn(b, t, h, d, dtype=torch.bfloat16, **kw)
    V = torch.randn(b, t, h, d, dtype=torch.bfloat16, **kw)
    lg = torch.randn(b, t, h, **kw)
    Y = vidrial.power_retention(Q, K, V, lg, deg=2, chunk_size=chunk)
    Y.float().sum().backward()
    assert Q.grad.shape == Q.shape and lg.grad.shape == lg.shape
    return Y


def _by_family(data):
    return {name: {json.dumps(k, sort_keys=True) for k in keys} for name, keys in data.items()}


# ---- recording ----------------------------------------------------------------------------------
def test_record_a_training_step_on_meta_tensors(tmp_path):
    path = tmp_path / "keys.json"
    with record(path) as rec:
        _meta_step()
    data = json.loads(path.read_text())
    assert data == rec.as_json()
    assert set(data) == set(FORWARD + BACKWARD)
    D = layout(32, 2, 8).feature_dim
    # the buckets the launchers compute for b=1, t=256, hq=4, h=2, chunk 64 (4 chunks)
    [intra] = data["intra_chunk_attention"]
    assert (intra["bh_bucket"], intra["t_bucket"], intra["chunk_size"], intra["normalize"]) == (4, 256, 64, False)
    [disc] = data["discumsum"]
    assert (disc["feature_dim"], disc["batch_heads"], disc["chunks"]) == (D, 2, 4)
    assert {(k["chunk_size"], k["gating"]) for k in data["update_state"]} == {(64, True), (128, False)}
    assert [k["tokens"] for k in data["query_state"]] == [256]
    assert {k["stage"] for k in data["intra_chunk_attention_bwd"]} == {"dkv", "dq"}  # two passes, one key each
    assert all(k["tokens"] == 1024 for k in data["intra_chunk_attention_bwd"] + data["query_state_bwd"])
    assert [k["tokens"] for k in data["update_state_bwd"]] == [512]
    # every recorded key validates as its family's Key, and nothing is left behind but the file
    from vidrial.dispatch.record import load_keys
    from vidrial.kernels import families

    loaded = load_keys(path, families())
    assert {n: len(v) for n, v in loaded.items()} == {n: len(v) for n, v in data.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


def test_recording_merges_deduplicates_and_skips_explicit_configs(tmp_path):
    path = tmp_path / "keys.json"
    with record(path):
        _meta_step(t=256)
        _meta_step(t=256)  # the same keys again
    first = _by_family(json.loads(path.read_text()))
    with record(path):
        _meta_step(t=512)
    merged = _by_family(json.loads(path.read_text()))
    assert all(first[n] <= merged[n] for n in first)
    assert any(len(merged[n]) > len(first[n]) for n in first)
    # an explicit config is not dispatched, so not recorded
    from vidrial.kernels.power_retention.discumsum import FAMILY as DISC

    x = dict(S=torch.empty(1, 4, 2, 640, 32, device="meta"), s=torch.empty(1, 4, 2, 640, device="meta"))
    with record(None) as rec:
        DISC.plan(DISC.default_config(DISC.problem_key(DISC.prepare(dict(x)))), **x)
        assert rec.as_json() == {}
        DISC.plan(**x)
    assert list(rec.as_json()) == ["discumsum"]


def test_meta_tensors_are_refused_outside_a_recording_and_nesting_sees_everything(tmp_path):
    with pytest.raises(InputError, match="device meta; expected a CUDA tensor"):
        _meta_step()
    with record(None) as outer:
        with record(None) as inner:
            _meta_step()
        _meta_step(t=512)
    assert _by_family(inner.as_json())["query_state"] < _by_family(outer.as_json())["query_state"]
    assert not dispatch.record.recording()


def test_record_refuses_a_file_that_is_not_a_keys_file_before_running(tmp_path):
    bad = tmp_path / "keys.json"
    bad.write_text("[1, 2]")
    ran = []
    with pytest.raises(InputError, match=r"path: got keys file .*keys.json: a JSON list"):
        with record(bad):
            ran.append(1)
    assert not ran and bad.read_text() == "[1, 2]"


def test_record_writes_what_ran_when_the_block_raises(tmp_path):
    path = tmp_path / "keys.json"
    with pytest.raises(RuntimeError):
        with record(path):
            _meta_step()
            raise RuntimeError("out of memory, say")
    assert set(json.loads(path.read_text())) == set(FORWARD + BACKWARD)


def test_record_is_importable_without_the_tuner():
    code = ("import sys, vidrial.tuning; vidrial.tuning.record; from vidrial.tuning import record; "
            "print(','.join(m for m in sys.modules if m.startswith(('optuna', 'vidrial.tuning.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == ""


import bwd_host_emu  # noqa: E402


@pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")
def test_record_the_backward_op_executed_on_the_cpu():
    """The backward op with its kernels executed by the host emulation (tests/bwd_host_emu.py) records the
    same backward keys as the meta run of the same shapes: recording does not depend on the device."""
    from test_backward_kernels_cpu import _backward_op_errors

    with record(None) as cpu:
        errs = _backward_op_errors(True, False, 1, 32)  # b=1, t=96, h=hq=1, d=32, chunk 32
    assert max(errs.values()) < 2e-2
    with record(None) as meta:
        _meta_step(b=1, t=96, hq=1, h=1, d=32, chunk=32)
    cpu_keys, meta_keys = _by_family(cpu.as_json()), _by_family(meta.as_json())
    assert set(BACKWARD) <= set(cpu_keys)
    for name in BACKWARD:
        assert cpu_keys[name] == meta_keys[name], name


# ---- vidrial tune --keys --------------------------------------------------------------------------
FAKE = "tuning_doubles:FakeBackend"


def _tune_argv(tmp_path, keys_file, *extra):
    return ["tune", "--keys", str(keys_file), "--trials", "3", "--out", str(tmp_path / "out"), "--tuned-dir",
            str(tmp_path / "tuned"), "--backend", FAKE, "--compiler", "tuning_doubles:no_spill_compile",
            "--no-progress", *extra]


def test_cli_tunes_exactly_the_keys_of_the_file(tmp_path, capsys):
    from vidrial.cli import main

    keys = [{"head_dim": 128}, {"head_dim": 64}]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"_synthetic": keys}))
    assert main(_tune_argv(tmp_path, path, "--kernel", T.synthetic.REF)) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("_synthetic ")]
    assert len(lines) == 2 and '{"head_dim": 128' in lines[0] and '{"head_dim": 64' in lines[1]
    tuned = json.loads((tmp_path / "tuned" / "fake-gpu" / "_synthetic.json").read_text())
    assert sorted(e["key"]["head_dim"] for e in tuned["entries"].values()) == [64, 128]


@pytest.mark.parametrize("content,needles", [
    ({"no_such_family": [{}]}, ["--keys", "keys.json", "family 'no_such_family'", "update_state"]),
    ({"_synthetic": [{"head_dim": 128, "nope": 1}]}, ["--keys", "_synthetic key #0", "nope", "SynthKey"]),
    ({"_synthetic": {"head_dim": 128}}, ["--keys", "maps to", "a list of key objects"]),
    ("{not json", ["--keys", "not valid JSON"]),
])
def test_cli_keys_file_errors_name_the_file_and_the_problem(tmp_path, capsys, content, needles):
    from vidrial.cli import main

    path = tmp_path / "keys.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(_tune_argv(tmp_path, path, "--kernel", T.synthetic.REF)) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


def test_cli_keys_file_needs_the_named_kernel_and_one_key_source(tmp_path, capsys):
    from vidrial.cli import main

    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"discumsum": [{"head_dim": 64, "feature_dim": 2304}]}))
    assert main(_tune_argv(tmp_path, path, "--kernel", T.synthetic.REF)) == 2
    assert "_synthetic" in capsys.readouterr().err
    assert main(_tune_argv(tmp_path, path, "--key", '{"head_dim": 64}')) == 2
    assert "--key and --keys" in capsys.readouterr().err


def test_recorded_keys_are_exactly_the_tuners_keys(tmp_path, monkeypatch):
    """A meta recording of a training step, then tune(keys_file=...): one study per recorded key, in order."""
    from types import SimpleNamespace

    from vidrial.tuning import tuner

    path = tmp_path / "keys.json"
    with record(path) as rec:
        _meta_step()
    asked = []

    def fake_tune_key(family, key, settings, **kw):
        asked.append((family.name, key.model_dump(mode="json")))
        return SimpleNamespace(gpu=GPU.model_dump(),
                               arch="sm_90", report_dir=None)

    monkeypatch.setattr(tuner, "tune_key", fake_tune_key)
    results = tuner.tune("all", keys_file=path, out=tmp_path / "out", progress=False, report=False)
    assert len(results) == len(asked)
    assert asked == [(name, k) for name, keys in rec.as_json().items() for k in keys]


# ---- a GPU without tuned entries -------------------------------------------------------------------
H100 = GpuIdentity(name="NVIDIA H100 80GB HBM3", arch="sm_90", sm_count=132)
A100 = GpuIdentity(name="NVIDIA A100-SXM4-80GB", arch="sm_80", sm_count=108)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    monkeypatch.setattr(store, "shipped_tuned_dir", lambda: shipped)
    monkeypatch.setenv("VIDRIAL_TUNED_DIR", str(user))
    monkeypatch.delenv("VIDRIAL_DEBUG_DISPATCH", raising=False)
    dispatch.reload()
    yield shipped, user
    dispatch.reload()


def _untuned(caught):
    return [w for w in caught if issubclass(w.category, UntunedGpuWarning)]


def test_untuned_gpu_uses_the_same_arch_gpus_entries_and_warns_once(dirs):
    shipped, _ = dirs
    _record(NoopKey(n=1024), NoopConfig(block=256), shipped)
    dispatch.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.select_config(FAM, NoopKey(n=1024), H100) == NoopConfig(block=256)
        last = dispatch.last_dispatch()
        assert dispatch.select_config(FAM, NoopKey(n=2048), H100) == NoopConfig(block=256)
        nearest = dispatch.last_dispatch()
        dispatch.select_config(FAM, NoopKey(dtype="bfloat16"), H100)
        default = dispatch.last_dispatch()
    assert (last.source, last.borrowed_from, last.gpu) == ("exact", "nvidia-h200", "nvidia-h100-80gb-hbm3")
    assert last.label == "exact (nvidia-h200, same arch)"
    assert last.as_dict()["borrowed_from"] == "nvidia-h200"
    assert (nearest.source, nearest.borrowed_from) == ("nearest", "nvidia-h200")
    assert (default.source, default.borrowed_from) == ("default", None)
    [w] = _untuned(caught)
    text = str(w.message)
    assert "NVIDIA H100 80GB HBM3" in text and "nvidia-h200 (same arch sm_90)" in text
    assert "vidrial tune --kernel all --preset shapes" in text and "vidrial tune --keys keys.json" in text
    # the H200 itself is unaffected
    assert dispatch.select_config(FAM, NoopKey(n=1024), GPU) == NoopConfig(block=256)
    assert dispatch.last_dispatch().borrowed_from is None


def test_another_arch_never_borrows(dirs):
    shipped, _ = dirs
    _record(NoopKey(n=1024), NoopConfig(block=256), shipped)
    dispatch.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.select_config(FAM, NoopKey(n=1024), A100) == NoopConfig()
    assert dispatch.last_dispatch().source == "default" and dispatch.last_dispatch().borrowed_from is None
    [w] = _untuned(caught)
    assert "no GPU of arch sm_80 is tuned" in str(w.message) and "--preset shapes" in str(w.message)


def test_nearest_same_arch_gpu_by_sm_count_and_own_file_wins(dirs):
    shipped, user = dirs
    h800 = GpuIdentity(name="NVIDIA H800 PCIe", arch="sm_90", sm_count=114)
    _record(NoopKey(n=1024), NoopConfig(block=256), shipped)  # H200, 132 SMs
    store.record(FAM, NoopKey(n=1024), NoopConfig(block=64), gpu=h800, time_ms=1.0, default_time_ms=2.0, trials=3,
                 directory=user)
    h100_pcie = GpuIdentity(name="NVIDIA H100 PCIe", arch="sm_90", sm_count=114)
    dispatch.reload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dispatch.nearest_same_arch(FAM, h100_pcie) == "nvidia-h800-pcie"
        assert dispatch.nearest_same_arch(FAM, H100) == "nvidia-h200"
        assert dispatch.select_config(FAM, NoopKey(n=1024), h100_pcie) == NoopConfig(block=64)
        # once the H100 has a file of its own (even without this key), it is used and nothing is borrowed
        store.record(FAM, NoopKey(n=8192), NoopConfig(block=512), gpu=H100, time_ms=1.0, default_time_ms=2.0,
                     trials=3, directory=user)
        dispatch.reload()
        assert dispatch.select_config(FAM, NoopKey(n=1024), H100) == NoopConfig(block=512)
        assert dispatch.last_dispatch().source == "nearest" and dispatch.last_dispatch().borrowed_from is None


def test_show_marks_borrowed_entries(dirs, monkeypatch):
    from vidrial import cli, kernels
    from vidrial.commands import show

    shipped, _ = dirs
    _record(NoopKey(n=1024), NoopConfig(block=256), shipped)
    monkeypatch.setitem(kernels._FAMILIES, FAM.name, FAM)
    monkeypatch.setattr(show, "_present_gpu", lambda: H100)

    def run(*argv):
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli.main(["show", *argv]) == 0
        return out.getvalue()

    data = json.loads(run("--json"))
    [g] = data["gpus"]
    fam = next(f for f in g["families"] if f["family"] == FAM.name)
    assert g["gpu"] == H100.slug and fam["borrowed_from"] == "nvidia-h200" and fam["entries"] == []
    labels = {k["key"]: k["label"] for k in fam["coverage"]["keys"]}
    assert labels[NoopKey(n=1024).key_string()] == "exact (nvidia-h200, same arch)"
    assert labels[NoopKey(n=256).key_string()] == "nearest (nvidia-h200, same arch)"
    text = run()
    assert "uses the entries of nvidia-h200 (same arch)" in text and "nearest (nvidia-h200, same arch)" in text
