"""Reliability of the tuner's machinery on CPU (project issue 17): pathological constraint
expressions fail fast; a live study is never deleted; several processes keep the trial budget
exactly; per-GPU children die with their parent; trials left RUNNING by a killed process are
failed on resume; a torn journal tail and the journal lock of a killed process do not block
the next run. Kills happen in subprocesses that the tests start."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tuning_doubles as T
from vidrial.tuning.study import trial_attrs
from vidrial.tuning.tuner import tune

FAKE = "tuning_doubles:FakeBackend"
COMPILER = "tuning_doubles:no_spill_compile"
KEY128 = {"head_dim": 128}


def _python(code: str, timeout: float, env: dict[str, str] | None = None,
            limit_memory: int | None = None) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (optionally with an address-space limit in bytes)."""
    def limits() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=limits if limit_memory else None)


# ---- item 10: the constraint interpreter bounds its work ---------------------------------------------------------
@pytest.mark.parametrize("expr", [
    "(((9**64)**64)**64)**64 > 0",  # took 86 s
    "'ab' * 10 ** 10 == ''",  # a 20 GB string
    "(1, 2) * 10 ** 10 == ()",
    "(((7 << 64) << 64) * (7 << 64)) ** 64 > 0",
])
def test_pathological_constraints_fail_fast_naming_the_expression(expr):
    code = f"""
        import json, time
        from vidrial.tuning.search_space import Constraint, SearchSpaceError
        c = Constraint.parse({expr!r})
        t0 = time.perf_counter()
        try:
            c.evaluate({{"tile_m": 64}})
            out = "evaluated"
        except SearchSpaceError as exc:
            out = str(exc)
        print(json.dumps({{"seconds": time.perf_counter() - t0, "message": out}}))
        """
    try:
        done = _python(code, timeout=15, limit_memory=4 << 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"evaluating {expr!r} ran past 15 s")
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["seconds"] < 1.0, got
    assert expr in got["message"] and "at most" in got["message"], got


def test_ordinary_large_constraint_values_still_evaluate():
    from vidrial.tuning.search_space import Constraint

    assert Constraint.parse("2 ** 64 > tile_m * 2 ** 40 and d_tile ** deg == 4096").evaluate(
        {"tile_m": 1 << 20, "d_tile": 64, "deg": 2})
    assert Constraint.parse("(1 << 64) * (1 << 64) == 2 ** 64 * 2 ** 64").evaluate({})


# ---- helpers: studies in this process and in subprocesses -------------------------------------------------------
def _opts(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    opts = dict(trials=10, out=str(tmp_path / "out"), backend=FAKE, compiler=COMPILER,
                tuned_dir=str(tmp_path / "tuned"), progress=False, retime_rounds=1)
    opts.update(kw)
    return opts


def _tune(tmp_path: Path, **kw: Any):
    (result,) = tune(T.synthetic, [KEY128], **_opts(tmp_path, **kw))
    return result


def _tune_code(tmp_path: Path, **kw: Any) -> str:
    """Python code that runs the same study as _tune in a fresh process."""
    return f"""
        import tuning_doubles as T
        from vidrial.tuning.tuner import tune
        (r,) = tune(T.synthetic, [{KEY128!r}], **{_opts(tmp_path, **kw)!r})
        print("TRIALS", r.trials, "WINNER", r.winner is not None, flush=True)
        """


def _spawn(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float = 60.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited (code {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _journal(tmp_path: Path) -> Path:
    return tmp_path / "out" / "journal.log"


def _measured_ok(tmp_path: Path) -> int:
    path = _journal(tmp_path)
    return path.read_text().count('"status":"ok"') if path.exists() else 0


def _study(tmp_path: Path):
    import optuna

    from vidrial.tuning.study import make_storage, study_name

    name = study_name(T.synthetic, "fake-gpu", T.SynthKey(**KEY128))
    return optuna.load_study(study_name=name, storage=make_storage(None, tmp_path / "out"))


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ps := _ppid_and_state(int(entry))) is not None:
            children.setdefault(ps[0], []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _running(pid: int) -> bool:
    ps = _ppid_and_state(pid)
    return ps is not None and ps[1] != "Z"  # a zombie has exited


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---- item 4: a live study is never deleted ----------------------------------------------------------------------
def test_a_fresh_run_refuses_to_delete_a_study_that_a_live_process_works(tmp_path, capsys):
    from vidrial.cli import main

    other = _spawn(_tune_code(tmp_path, trials=10), VIDRIAL_FAKE_DELAY_S="0.1")
    try:
        _wait_for("the other process measured a config", lambda: _measured_ok(tmp_path) >= 1, proc=other)
        argv = ["tune", "--kernel", T.synthetic.REF, "--key", json.dumps(KEY128), "--trials", "4", "--out",
                str(tmp_path / "out"), "--tuned-dir", str(tmp_path / "tuned"), "--backend", FAKE, "--compiler",
                COMPILER, "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--resume" in err and "live" in err and str(_journal(tmp_path)) in err, err
        out, err = other.communicate(timeout=60)
    finally:
        other.kill()
    assert other.returncode == 0, err[-3000:]
    assert "TRIALS 10 WINNER True" in out
    # a study whose process has ended may start over
    assert main([*argv[:6], "3", *argv[7:]]) == 0
    assert "3 trials" in capsys.readouterr().out


# ---- item 5: exact budgets, children that die with the parent, stale trials, torn journals, stale locks ----------
def test_several_processes_keep_the_trial_budget_exactly(tmp_path, monkeypatch):
    from vidrial.tuning.records import UNCOUNTED

    monkeypatch.setenv("VIDRIAL_FAKE_DELAY_S", "0.05")
    monkeypatch.setenv("VIDRIAL_FAKE_RENDEZVOUS", str(tmp_path / "device1-measured"))
    result = _tune(tmp_path, trials=12, gpus=(0, 1), compile_ahead=4)
    trials = _study(tmp_path).trials
    counted = [t for t in trials if t.state.is_finished() and trial_attrs(t).get("status") not in (None, *UNCOUNTED)]
    assert {trial_attrs(t).get("device") for t in counted} == {"0", "1"}
    assert result.trials == len(counted) == 12
    assert all(t.state.is_finished() for t in trials)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the descendants in /proc (Linux)")
def test_per_gpu_children_die_with_a_killed_parent(tmp_path):
    rendezvous = tmp_path / "device1-measured"
    parent = _spawn(_tune_code(tmp_path, trials=400, gpus=(0, 1)), VIDRIAL_FAKE_DELAY_S="0.05",
                    VIDRIAL_FAKE_RENDEZVOUS=str(rendezvous))
    family: set[int] = set()
    try:
        _wait_for("the child process measured a config", rendezvous.exists, proc=parent)
        family = _descendants(parent.pid)
        assert family  # the per-GPU child, the measurement workers, ...
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_running(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(p for p in family if _running(p))
        assert not left, f"still running 10 s after the parent was killed: {left}"
    finally:
        parent.kill()
        _kill({p for p in family if _running(p)})
    # the study goes on from what they finished
    before = {t.number for t in _study(tmp_path).trials if trial_attrs(t).get("status") == "ok"}
    result = _tune(tmp_path, trials=len(before) + 2, resume=True)
    after = _study(tmp_path).trials
    assert before <= {t.number for t in after if trial_attrs(t).get("status") == "ok"}
    assert all(t.state.is_finished() for t in after)
    assert result.trials == len(before) + 2


def test_trials_left_running_by_a_killed_run_are_failed_on_resume(tmp_path, capsys):
    killed = _python(_tune_code(tmp_path, trials=20, isolate=False, compile_ahead=4), timeout=60,
                     env={**os.environ, "VIDRIAL_FAKE_KILL_AT": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    trials = _study(tmp_path).trials
    stale = {t.number for t in trials if not t.state.is_finished()}
    ok = {t.number for t in trials if trial_attrs(t).get("status") == "ok"}
    assert stale and len(ok) == 4
    result = _tune(tmp_path, trials=10, resume=True)
    after = {t.number: t for t in _study(tmp_path).trials}
    assert all(t.state.is_finished() for t in after.values())
    assert "left RUNNING" in capsys.readouterr().err
    for n in stale:
        a = trial_attrs(after[n])
        assert after[n].state.name == "FAIL" and a["status"] == "interrupted" and "died" in a["reason"], a
    assert ok <= {n for n, t in after.items() if trial_attrs(t).get("status") == "ok"}
    assert result.trials == 10


TORN = b'{"op_code":8,"worker_id":"w-1","trial_id":3,"user_attr":{"vidrial"'  # a write cut short by a kill


@pytest.mark.parametrize("appended", [0, 1, 2])  # lines an older version appended after the tear
def test_a_torn_journal_line_is_skipped_with_a_backup(tmp_path, capsys, appended):
    first = _tune(tmp_path, trials=6, isolate=False)
    journal = _journal(tmp_path)
    original = journal.read_bytes()
    study_id = _study(tmp_path)._study_id
    after = b"".join(  # the first is glued to the fragment: a line that is not JSON
        json.dumps({"op_code": 2, "worker_id": "w-2", "study_id": study_id, "user_attr": {f"probe{i}": i}},
                   separators=(",", ":")).encode() + b"\n" for i in range(appended))
    journal.write_bytes(original + TORN + after)
    result = _tune(tmp_path, trials=9, resume=True, isolate=False)
    err = capsys.readouterr().err
    assert str(journal) in err and "torn" in err, err
    backups = list(journal.parent.glob(journal.name + ".*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == original + TORN + after
    assert result.trials == 9 and first.trials == 6
    study = _study(tmp_path)
    assert sum(trial_attrs(t).get("status") == "ok" for t in study.trials) >= 6
    assert {k: v for k, v in study.user_attrs.items() if k.startswith("probe")} == {
        f"probe{i}": i for i in range(appended)}  # the operations written after the fragment are kept


@pytest.mark.parametrize("left_by", ["a process killed while it held the lock", "an older version (symlink lock)"])
def test_a_stale_journal_lock_does_not_stall_the_next_run(tmp_path, left_by):
    out = tmp_path / "out"
    if left_by.startswith("a process"):
        killed = _python(f"""
            import os, signal
            from pathlib import Path
            from vidrial.tuning.study import make_storage
            storage = make_storage(None, Path({str(out)!r}))
            storage._backend._lock.acquire()  # as in the middle of an append
            os.kill(os.getpid(), signal.SIGKILL)
            """, timeout=60)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    else:
        out.mkdir()
        (out / "journal.log").write_bytes(b"")
        os.symlink(out / "journal.log", out / "journal.log.lock")
    code = f"""
        import time
        import optuna
        from pathlib import Path
        from vidrial.tuning.study import make_storage
        t0 = time.perf_counter()
        optuna.create_study(study_name="after-the-kill", storage=make_storage(None, Path({str(out)!r})))
        print("SECONDS", time.perf_counter() - t0)
        """
    try:
        done = _python(code, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("writing to the journal stalled past 15 s on the stale lock")
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("SECONDS")[1]) < 5
