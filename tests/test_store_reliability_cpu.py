"""Tuned-config store reliability (CPU): unreadable folders, bad entries, check fall-through,
file modes and mislabelled files (issue 17). The family, keys and fixtures come from
test_store_dispatch.py."""
from __future__ import annotations

import io
import json
import math
import os
import stat
import warnings
from contextlib import redirect_stderr
from pathlib import Path
from types import SimpleNamespace

import pytest
# a module import: its tests are not re-collected; `dirs` is its fixture
from test_store_dispatch import FAM, GPU, NoopConfig, NoopKey, _record, _show, _tuned_warnings, dirs  # noqa: F401

from vidrial import dispatch
from vidrial.cli import main
from vidrial.core.errors import InputError
from vidrial.dispatch import store
from vidrial.dispatch.store import TunedConfigWarning, TunedFile, load_file

SLUG = GPU.slug


def _caught(fn):
    """(fn(), the TunedConfigWarnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, _tuned_warnings(caught)


# ---- 1. an unreadable folder or file never fails a call --------------------------------------------

def _shipped_and_user(shipped: Path, user: Path) -> Path:
    """Shipped: n=1024 -> block 64; user: n=1024 -> block 256. Returns the user file."""
    _record(NoopKey(n=1024), NoopConfig(block=64), shipped)
    return _record(NoopKey(n=1024), NoopConfig(block=256), user)


FOLDER_DENIED = ("is_file", "stat", "open")  # a chmod 000 folder: nothing under it can be stat'ed or opened


def _deny(monkeypatch: pytest.MonkeyPatch, under: Path, methods: tuple[str, ...] = FOLDER_DENIED) -> None:
    """Path.<method> raises PermissionError for paths under `under` (chmod does not stop root)."""
    for method in methods:
        original = getattr(Path, method)

        def denied(self, *args, _original=original, **kwargs):
            if Path(self).is_relative_to(under):
                raise PermissionError(13, "Permission denied", str(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Path, method, denied)


def _assert_shipped_used_with_one_warning(user_file: Path, shipped: Path) -> None:
    def calls():
        for _ in range(2):
            assert dispatch.select_config(FAM, NoopKey(n=1024), GPU) == NoopConfig(block=64)
            assert dispatch.last_dispatch().path == shipped / SLUG / "test_noop.json"
            assert dispatch.select_config(FAM, NoopKey(n=2048), GPU) == NoopConfig(block=64)

    _, found = _caught(calls)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert str(user_file) in message and "Permission denied" in message


def test_chmod_000_user_folder_warns_and_uses_the_shipped_file(dirs):
    shipped, user = dirs
    user_file = _shipped_and_user(shipped, user)
    folder = user_file.parent
    folder.chmod(0)
    try:
        if os.access(folder, os.R_OK | os.X_OK):
            pytest.skip("chmod 000 does not deny access here (running as root); see the monkeypatched test")
        dispatch.reload()
        _assert_shipped_used_with_one_warning(user_file, shipped)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("methods", [FOLDER_DENIED, ("open",)], ids=["folder", "file"])
def test_permission_error_is_a_warning_not_a_failure(dirs, monkeypatch, methods):
    shipped, user = dirs
    user_file = _shipped_and_user(shipped, user)
    _deny(monkeypatch, user / SLUG, methods)
    dispatch.reload()
    _assert_shipped_used_with_one_warning(user_file, shipped)


def test_show_reports_an_unreadable_folder(dirs, monkeypatch):
    shipped, user = dirs
    user_file = _shipped_and_user(shipped, user)
    _deny(monkeypatch, user / SLUG)
    for argv in (["--gpu", SLUG, "--json"], ["--json"]):
        data = json.loads(_show(argv, monkeypatch))
        assert [g["gpu"] for g in data["gpus"]] == [SLUG]
        fam = next(f for f in data["gpus"][0]["families"] if f["family"] == "test_noop")
        assert [e["config"]["block"] for e in fam["entries"]] == [64]
        bad = [f for f in fam["files"] if f["path"] == str(user_file)]
        assert len(bad) == 1 and "Permission denied" in " ".join(bad[0]["problems"])


# ---- 2. one bad entry costs that entry only; record() rejects non-finite times ------------------

def _file_with_bad_entries(directory: Path) -> Path:
    """n=1024 -> 256 and n=4096 -> 64 valid; n=2048 (time_ms null, what record(inf) used to write) and
    n=8192 (time_ms NaN, which json reads) invalid."""
    path = _record(NoopKey(n=1024), NoopConfig(block=256), directory)
    _record(NoopKey(n=4096), NoopConfig(block=64), directory)
    data = json.loads(path.read_text())
    good = data["entries"][NoopKey(n=1024).key_string()]
    for n, time_ms in ((2048, None), (8192, math.nan)):
        data["entries"][NoopKey(n=n).key_string()] = {**good, "key": NoopKey(n=n).model_dump(mode="json"),
                                                      "time_ms": time_ms}
    path.write_text(json.dumps(data, indent=2))
    return path


def test_dispatch_keeps_the_valid_entries_of_a_file_with_bad_ones(dirs):
    _, user = dirs
    path = _file_with_bad_entries(user)
    dispatch.reload()

    def calls():
        assert dispatch.select_config(FAM, NoopKey(n=1024), GPU).block == 256
        assert dispatch.last_dispatch().source == "exact"
        assert dispatch.select_config(FAM, NoopKey(n=4096), GPU).block == 64
        assert dispatch.last_dispatch().source == "exact"
        for n in (2048, 8192):
            dispatch.select_config(FAM, NoopKey(n=n), GPU)
            assert dispatch.last_dispatch().source == "nearest"

    _, found = _caught(calls)
    assert len(found) == 1, [str(w.message) for w in found]
    assert str(path) in str(found[0].message) and "time_ms" in str(found[0].message)
    index = dispatch.build_index(FAM, SLUG, warn=False)
    assert {s.key for s in index.stale} == {NoopKey(n=2048).key_string(), NoopKey(n=8192).key_string()}
    assert index.files[0].entries == 4 and index.files[0].used == 2
    # load_file alone: the valid entries plus one warning
    with pytest.warns(TunedConfigWarning):
        assert set(load_file(path).entries) == {NoopKey(n=1024).key_string(), NoopKey(n=4096).key_string()}


@pytest.mark.parametrize("argument,value", [("time_ms", math.inf), ("time_ms", math.nan), ("time_ms", -math.inf),
                                            ("default_time_ms", math.inf), ("default_time_ms", math.nan)])
def test_record_rejects_non_finite_times(tmp_path, argument, value):
    path = _record(NoopKey(n=64), NoopConfig(block=32), tmp_path)
    before = path.read_bytes()
    with pytest.raises(InputError, match=rf"^{argument}: got {value}; expected a finite"):
        _record(NoopKey(n=128), NoopConfig(block=32), tmp_path, **{argument: value})
    assert path.read_bytes() == before


def test_record_keeps_the_valid_entries_of_a_file_with_bad_ones(tmp_path):
    path = _file_with_bad_entries(tmp_path)
    original = path.read_text()
    with pytest.warns(TunedConfigWarning) as caught:
        _record(NoopKey(n=512), NoopConfig(block=32), tmp_path)
    tuned = TunedFile.model_validate_json(path.read_text())  # the whole file is valid again
    assert set(tuned.entries) == {NoopKey(n=n).key_string() for n in (512, 1024, 4096)}
    backups = list(path.parent.glob("test_noop.json.bad-*"))
    assert len(backups) == 1 and backups[0].read_text() == original  # the bad entries are kept aside
    assert len(_tuned_warnings(caught)) == 1 and backups[0].name in str(_tuned_warnings(caught)[0].message)


def test_files_moved_aside_in_the_same_second_keep_distinct_names(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "time", SimpleNamespace(time=lambda: 1_700_000_000.0), raising=False)
    path = tmp_path / SLUG / "test_noop.json"
    path.parent.mkdir(parents=True)
    for i in range(3):
        path.write_text(f"{{garbage {i}")
        with pytest.warns(TunedConfigWarning):
            _record(NoopKey(n=64), NoopConfig(block=32), tmp_path)
    backups = sorted(p.read_text() for p in path.parent.glob("test_noop.json.bad-*"))
    assert backups == ["{garbage 0", "{garbage 1", "{garbage 2"]


# ---- 3. a user entry that fails family.check falls through to the shipped one --------------------

def test_user_entry_failing_check_falls_through_to_shipped(dirs, monkeypatch):
    shipped, user = dirs
    _record(NoopKey(n=256), NoopConfig(block=128), shipped)  # passes check (128 <= 256)
    user_file = _record(NoopKey(n=256), NoopConfig(block=512), user)  # validates, fails check (512 > 256)
    _record(NoopKey(n=100), NoopConfig(block=512), user)  # fails check, nothing shipped: nearest
    dispatch.reload()

    def calls():
        for _ in range(2):
            assert dispatch.select_config(FAM, NoopKey(n=256), GPU) == NoopConfig(block=128)
            d = dispatch.last_dispatch()
            assert d.source == "exact" and d.path == shipped / SLUG / "test_noop.json"
        dispatch.select_config(FAM, NoopKey(n=100), GPU)
        assert dispatch.last_dispatch().source in ("nearest", "default")

    _, found = _caught(calls)
    messages = [str(w.message) for w in found]
    assert len(messages) == 2, messages
    first = next(m for m in messages if NoopKey(n=256).key_string() in m)
    assert str(user_file) in first and "at most n=256" in first and str(shipped / SLUG / "test_noop.json") in first
    assert any(NoopKey(n=100).key_string() in m and "at most n=100" in m for m in messages)
    # `vidrial show` resolves the same way
    data = json.loads(_show(["--gpu", SLUG, "--json"], monkeypatch))
    fam = next(f for f in data["gpus"][0]["families"] if f["family"] == "test_noop")
    row = next(k for k in fam["coverage"]["keys"] if k["key"] == NoopKey(n=256).key_string())
    assert row["source"] == "exact" and row["config"]["block"] == 128 and "at most n=256" in row["note"]


# ---- 7. file modes; files whose content contradicts their path ---------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_store_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = _record(NoopKey(n=64), NoopConfig(block=32), tmp_path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        _record(NoopKey(n=128), NoopConfig(block=32), tmp_path)  # a rewrite too
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(old)


def _relabel_family(path: Path) -> None:
    data = json.loads(path.read_text())
    data["family"] = "other_family"
    path.write_text(json.dumps(data))


def _move_to_h100(path: Path, relabel: bool) -> Path:
    """The H200 file moved under nvidia-h100/ (its `gpu` field relabelled too when `relabel`)."""
    target = path.parent.rename(path.parent.parent / "nvidia-h100") / path.name
    if relabel:
        data = json.loads(target.read_text())
        data["gpu"] = "nvidia-h100"
        target.write_text(json.dumps(data))
    return target


@pytest.mark.parametrize("case", ["family", "gpu folder", "entry gpu", "destination"])
def test_ship_refuses_a_file_whose_content_contradicts_its_path(tmp_path, case):
    run, shipped = tmp_path / "run", tmp_path / "shipped"
    src = _record(NoopKey(n=512), NoopConfig(block=64), run)
    if case == "family":
        _relabel_family(src)
        said, path_says = "other_family", "test_noop"
    elif case == "gpu folder":
        src = _move_to_h100(src, relabel=False)
        said, path_says = "nvidia-h200", "nvidia-h100"
    elif case == "entry gpu":
        src = _move_to_h100(src, relabel=True)
        said, path_says = "NVIDIA H200", "nvidia-h100"
    else:
        shipped_file = _record(NoopKey(n=1024), NoopConfig(block=32), shipped)
        _relabel_family(shipped_file)
        src, said, path_says = shipped_file, "other_family", "test_noop"
    before = {p: p.read_bytes() for p in shipped.rglob("*.json")}
    err = io.StringIO()
    with redirect_stderr(err):  # the CLI: one line naming the file, what it says and what its path says
        assert main(["ship", str(run), "--into", str(shipped)]) == 2
    message = err.getvalue()
    assert message.count("\n") == 1 and "Traceback" not in message, message
    assert str(src) in message and said in message and path_says in message, message
    with pytest.raises(InputError) as info:  # the API raises it
        store.merge(run, shipped)
    assert str(src) in str(info.value), info.value
    assert {p: p.read_bytes() for p in shipped.rglob("*.json")} == before  # nothing written

