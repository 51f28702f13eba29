"""The autotuner on CPU: search spaces, constraint safety, rejection from compiled facts,
memoisation, resume, the search loop on a known objective, grid, worker isolation,
scale-out through shared storage, store writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import tuning_doubles as T
from vidrial.tuning.search_space import (
    Constraint,
    ConstraintSyntaxError,
    SearchSpaceError,
    load_search_space,
    parse_search_space,
)
from vidrial.tuning.finish import pick_winner
from vidrial.tuning.settings import TuneSettings
from vidrial.tuning.study import canonical, trial_attrs
from vidrial.tuning.tuner import tune
from vidrial.tuning.worker import MeasurementWorker

FAKE = "tuning_doubles:FakeBackend"
KEY128 = {"head_dim": 128}


def _space_file(tmp_path: Path, text: str, name: str = "space.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _tune(tmp_path, **kw):
    opts = dict(trials=20, out=tmp_path / "out", isolate=False, backend=FAKE, compiler=T.fake_compiler(),
                tuned_dir=tmp_path / "tuned", progress=False, retime_rounds=1)
    opts.update(kw)
    keys = opts.pop("keys", [KEY128])
    return tune(T.synthetic, keys, **opts)


def _journal_rows(result, tmp_path, storage=None):
    import optuna

    from vidrial.tuning.study import make_storage, trial_rows

    study = optuna.load_study(study_name=result.study_name, storage=make_storage(storage, tmp_path / "out"))
    return [r.as_dict() for r in trial_rows(study)]


# ---- search spaces ---------------------------------------------------------------------------------
def test_search_space_loads_and_enumerates_valid_configs():
    space = load_search_space(T.synthetic)
    assert list(space.fields) == ["tile_m", "tile_k", "warps", "stages"]
    assert space.size == 4 * 4 * 3 * 4
    key = T.SynthKey(head_dim=64)
    valid = space.valid_configs(key, "sm_90")
    expected = [v for v in space.iter_values()
                if v["tile_m"] % (16 * v["warps"]) == 0 and v["tile_k"] <= 64]
    assert [c.model_dump() for c in valid] == expected
    assert all(isinstance(c, T.SynthConfig) for c in valid)


def test_update_state_search_space_file_is_valid():
    from vidrial.kernels import families

    fams = families()
    if "update_state" not in fams:
        pytest.skip("update_state family not importable here")
    fam = fams["update_state"]
    space = load_search_space(fam)
    for key in fam.standard_keys():
        valid = space.valid_configs(key, "sm_90")
        assert valid, key
    assert set(space.fields) <= set(fam.Config.model_fields)


BASE = 'family = "_synthetic"\n'


@pytest.mark.parametrize("text, needles", [
    (BASE + "[fields]\ntile_q = [1, 2]\n", ["fields.tile_q", "not a field of SynthConfig", "tile_m, tile_k, warps, stages"]),
    (BASE + "[fields]\ntile_m = [64, 48]\n", ["fields.tile_m", "choice 48", "power of two"]),
    (BASE + "[fields]\ntile_m = 64\n", ["fields.tile_m", "non-empty list"]),
    (BASE + "[fields]\ntile_m = []\n", ["fields.tile_m", "non-empty list"]),
    (BASE + "[fields]\ntile_m = [64, 64]\n", ["listed twice"]),
    (BASE + "[fields]\ntile_m = [64]\nconstraints = ['tile_m > 1']\n", ["fields.constraints", "not a field", "before the [fields] table"]),
    ('family = "other"\n[fields]\ntile_m = [64]\n', ["'other'", "_synthetic"]),
    ("[fields]\ntile_m = [64]\n", ["missing `family"]),
    (BASE + "constraints = ['tile_m > zz']\n[fields]\ntile_m = [64]\n",
     ["constraints[0]", "unknown name(s) zz", "head_dim, chunk_size"]),
    (BASE + "constraints = ['tile_m >']\n[fields]\ntile_m = [64]\n", ["constraints[0]", "not a valid expression"]),
    (BASE + "extra = 1\n[fields]\ntile_m = [64]\n", ["unknown top-level", "'extra'"]),
    (BASE + "[fields\n", ["not valid TOML"]),
])
def test_search_space_errors_name_file_field_and_rule(tmp_path, text, needles):
    path = _space_file(tmp_path, text)
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(T.synthetic, path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_missing_search_space_file_names_family(tmp_path):
    with pytest.raises(SearchSpaceError, match="no search space for kernel family"):
        load_search_space(T.synthetic, tmp_path / "nope.toml")


def test_required_config_field_must_be_listed():
    from vidrial.core.config import KernelConfig

    class NeedsX(KernelConfig):
        x: int
        y: int = 1

    class Fam:
        name = "needs_x"
        Config = NeedsX
        Key = T.SynthKey

    with pytest.raises(SearchSpaceError, match="x have no default"):
        parse_search_space({"family": "needs_x", "fields": {"y": [1, 2]}}, Fam, "f.toml")
    with pytest.raises(SearchSpaceError, match="'z' is not a field of NeedsX; fields are: x, y"):
        parse_search_space({"family": "needs_x", "fields": {"z": [1]}}, Fam, "f.toml")


# ---- constraint expressions --------------------------------------------------------------------
@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')",
    "tile_m.bit_length() > 2",
    "open('x')",
    "tile_m[0] > 1",
    "(lambda: 1)()",
    "[x for x in (1, 2)]",
    "(y := 3) > 1",
    "tile_m if tile_m else __builtins__.x",
    "{1: 2}",
    "f'{tile_m}'",
])
def test_constraints_reject_calls_attributes_and_friends(expr):
    with pytest.raises(ConstraintSyntaxError):
        Constraint.parse(expr)


@pytest.mark.parametrize("expr, env, expected", [
    ("tile_m % (16 * warps) == 0", {"tile_m": 128, "warps": 4}, True),
    ("tile_m % (16 * warps) == 0", {"tile_m": 96, "warps": 4}, False),
    ("tile_k <= head_dim and not (warps > 4 or stages < 2)", {"tile_k": 32, "head_dim": 64, "warps": 4, "stages": 2}, True),
    ("dtype in ('bf16', 'fp16')", {"dtype": "fp16"}, True),
    ("dtype not in ['fp16']", {"dtype": "fp16"}, False),
    ("16 <= tile_m // warps <= 64", {"tile_m": 256, "warps": 2}, False),
    ("(tile_m * tile_k * 2 if gating else 0) < 1 << 16", {"tile_m": 128, "tile_k": 64, "gating": True}, True),
    ("tile_m / 0 > 1", {"tile_m": 1}, False),  # a division by zero rules the config out
    ("-tile_m < 0", {"tile_m": 1}, True),
])
def test_constraints_evaluate(expr, env, expected):
    assert Constraint.parse(expr).evaluate(env) is expected


def test_constraint_huge_power_is_refused():
    with pytest.raises(SearchSpaceError, match="exponent"):
        Constraint.parse("2 ** 10 ** 10 > tile_m").evaluate({"tile_m": 1})


def test_skip_tuned_keeps_the_recorded_entries_and_tunes_only_missing_keys(tmp_path):
    third = {**KEY128, "chunk_size": 8192}
    first, _ = _tune(tmp_path, trials=12, seed=0, keys=[KEY128, third])
    path = Path(first.store_path)
    before = json.loads(path.read_text())["entries"]
    other = {**KEY128, "chunk_size": 4096}
    # KEY128: skipped inside its study (GPU not yet known); third: skipped before any study (GPU known)
    skipped, tuned, skipped_fast = _tune(tmp_path, trials=6, seed=1, skip_tuned=True, keys=[KEY128, other, third],
                                         out=tmp_path / "out2")
    for s in (skipped, skipped_fast):
        assert s.stopped_because == "already tuned" and s.trials == 0 and s.store_path == str(path)
    assert skipped.winner == first.winner and skipped.time_ms == pytest.approx(first.time_ms)
    assert tuned.stopped_because != "already tuned" and tuned.trials == 6
    assert not (tmp_path / "out2" / "_synthetic" / "fake-gpu" / "head_dim=128_chunk_size=8192").exists()
    entries = json.loads(path.read_text())["entries"]
    assert before.items() <= entries.items()  # the recorded entries are untouched
    assert len(entries) == 3


# ---- the search loop on a known objective ------------------------------------------------------------
def test_tpe_finds_the_known_optimum_and_records_it(tmp_path):
    (result,) = _tune(tmp_path, trials=40, seed=0)
    assert result.winner == T.SYNTH_OPTIMUM
    assert result.time_ms == pytest.approx(1.0)
    assert result.default_time_ms == pytest.approx(T.synthetic_time(T.SynthKey(**KEY128), T.SynthConfig()))
    assert result.trials == 40
    # the store got the winner with the facts that make it trustworthy
    path = Path(result.store_path)
    assert path == tmp_path / "tuned" / "fake-gpu" / "_synthetic.json"
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    assert entry["config"] == T.SYNTH_OPTIMUM
    assert entry["time_ms"] == pytest.approx(1.0)
    assert entry["default_time_ms"] == pytest.approx(result.default_time_ms)
    assert entry["trials"] == 40 and entry["template_hash"] == T.synthetic.template_hash
    assert entry["gpu"] == {"name": "Fake GPU", "arch": "sm_90", "sm_count": 132}
    # report
    report = Path(result.report_dir)
    for name in ("leaderboard.md", "leaderboard.csv", "history.csv"):
        assert (report / name).is_file()
    md = (report / "leaderboard.md").read_text()
    assert "tile_m=128 tile_k=64 warps=4 stages=3" in md
    assert ("history.png" in md) == (report / "history.png").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:  # Optuna's own plots (optuna.visualization.matplotlib): the history and the parameter importances
        assert (report / "history.png").stat().st_size > 1000 and (report / "importance.png").stat().st_size > 1000
        assert "![parameter importance](importance.png)" in md
    assert (tmp_path / "out" / "report.md").is_file()


def test_default_config_is_the_first_trial(tmp_path):
    (result,) = _tune(tmp_path, trials=5)
    rows = _journal_rows(result, tmp_path)
    assert rows[0]["config"] == T.SynthConfig().model_dump()


def test_gp_and_random_samplers_run(tmp_path):
    for sampler in ("gp", "random"):
        (result,) = _tune(tmp_path / sampler, trials=6, sampler=sampler)
        assert result.trials == 6 and result.winner is not None


def test_grid_enumerates_exactly_the_valid_configs(tmp_path):
    (result,) = _tune(tmp_path, sampler="grid", trials=3)  # the budget does not cut the grid short
    rows = _journal_rows(result, tmp_path)
    space = load_search_space(T.synthetic)
    valid = {canonical(c) for c in space.valid_configs(T.SynthKey(**KEY128), "sm_90")}
    seen = [r["ck"] for r in rows]
    assert all(r["status"] == "ok" for r in rows)
    assert len(seen) == len(set(seen)) == len(valid) and set(seen) == valid
    assert result.winner == T.SYNTH_OPTIMUM
    assert result.stopped_because in ("trial budget reached", "every valid config evaluated", "grid exhausted")


def test_pick_winner_breaks_ties_deterministically():
    space = load_search_space(T.synthetic)
    a = T.SynthConfig(tile_m=128, tile_k=64, warps=4, stages=3)
    b = T.SynthConfig(tile_m=64, tile_k=64, warps=4, stages=3)  # earlier in search-space order
    c = T.SynthConfig(tile_m=64, tile_k=16, warps=2, stages=1)
    for timed in ([(a, 1.000), (b, 1.003), (c, 1.2)], [(c, 1.2), (b, 1.003), (a, 1.000)]):
        assert pick_winner(space, timed, 0.005) == b
    assert pick_winner(space, [(a, 1.0), (b, 1.01)], 0.005) == a


# ---- rejection from compiled facts ---------------------------------------------------------------------
class CountingBackend(T.FakeBackend):
    calls: list = []

    def run(self, job):
        CountingBackend.calls.append(canonical(T.SynthConfig(**job["config"])))
        return super().run(job)


def test_spilling_configs_are_rejected_before_timing(tmp_path):
    CountingBackend.calls = []
    spills = lambda c: c.tile_m == 128 and c.tile_k == 64  # noqa: E731 - the optimum's row spills
    (result,) = _tune(tmp_path, sampler="grid", backend=CountingBackend(), compiler=T.fake_compiler(spills))
    rows = _journal_rows(result, tmp_path)
    infeasible = [r for r in rows if r["status"] == "infeasible"]
    assert infeasible and all(T.SynthConfig(**r["config"]).tile_m == 128 and r["config"]["tile_k"] == 64
                              for r in infeasible)
    assert all("spills" in r["reason"] and r["facts"]["spill_store_bytes"] > 0 for r in infeasible)
    measured = set(CountingBackend.calls)
    assert not measured & {r["ck"] for r in infeasible}  # never timed
    # reported to Optuna as constraint violations
    import optuna

    from vidrial.tuning.study import make_storage

    study = optuna.load_study(study_name=result.study_name, storage=make_storage(None, tmp_path / "out"))
    for t in study.trials:
        violated = trial_attrs(t)["status"] != "ok"
        assert trial_attrs(t)["constraint"] == (1.0 if violated else 0.0)
        if hasattr(t, "constraints") and t.constraints:
            assert (max(t.constraints.values()) > 0) == violated
    assert result.winner["tile_m"] != 128 or result.winner["tile_k"] != 64


# ---- memoisation -----------------------------------------------------------------------------------------
def test_repeated_suggestions_are_memoised(tmp_path):
    import optuna

    from vidrial.tuning.loop import SearchLoop
    from vidrial.tuning.worker import InProcessMeasurer

    CountingBackend.calls = []
    space = load_search_space(T.synthetic)
    key = T.SynthKey(**KEY128)
    study = optuna.create_study(direction="minimize")
    same = {"tile_m": 128, "tile_k": 32, "warps": 4, "stages": 2}
    for params in (same, same, {"tile_m": 64, "tile_k": 32, "warps": 4, "stages": 2}, same):
        study.enqueue_trial(params)
    settings = TuneSettings(trials=4, progress=False, compile_ahead=2)
    from vidrial.tuning.compile_pool import FunctionCompiler

    loop = SearchLoop(T.synthetic, key, space, study, settings, InProcessMeasurer(CountingBackend()),
                      FunctionCompiler(T.fake_compiler()), "sm_90", budget=4, deadline=None)
    loop.run()
    assert len(CountingBackend.calls) == 2  # two distinct configs measured once each
    trials = study.trials
    assert [trial_attrs(t).get("memo_of") for t in trials] == [None, 0, None, 0]
    assert trials[1].value == trials[0].value == trials[3].value


# ---- resume ---------------------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


class InterruptingBackend(T.FakeBackend):
    measured = 0
    limit = 6

    def run(self, job):
        if InterruptingBackend.measured >= InterruptingBackend.limit:
            raise Interrupt
        InterruptingBackend.measured += 1
        return super().run(job)


def test_resume_after_interruption_continues_the_study(tmp_path):
    InterruptingBackend.measured, InterruptingBackend.limit = 0, 6
    with pytest.raises(Interrupt):
        _tune(tmp_path, trials=25, backend=InterruptingBackend())
    journal = tmp_path / "out" / "journal.log"
    assert journal.is_file()
    import optuna

    from vidrial.tuning.study import make_storage, study_name

    name = study_name(T.synthetic, "fake-gpu", T.SynthKey(**KEY128))
    interrupted = optuna.load_study(study_name=name, storage=make_storage(None, tmp_path / "out")).trials
    assert all(t.state.is_finished() for t in interrupted)  # nothing left RUNNING
    assert sum(trial_attrs(t).get("status") == "ok" for t in interrupted) >= 6
    InterruptingBackend.limit = 10**9
    first_run = InterruptingBackend.measured
    (result,) = _tune(tmp_path, trials=25, backend=InterruptingBackend(), resume=True)
    rows = _journal_rows(result, tmp_path)
    counted = [r for r in rows if r["finished"] and r["status"] not in ("invalid", "interrupted")]
    assert result.trials == len(counted) == 25  # the total, not 25 more
    assert sum(r["status"] == "interrupted" for r in rows) >= 1  # in-flight trials were failed, not lost
    # configs measured before the interruption were not measured again
    cks = [r["ck"] for r in rows if r["finished"] and r["memo_of"] is None and r["status"] == "ok"]
    assert len(cks) == len(set(cks))
    assert first_run == 6
    # without --resume the study starts over
    InterruptingBackend.measured = 0
    (fresh,) = _tune(tmp_path, trials=5, backend=InterruptingBackend())
    assert fresh.trials == 5 and len([r for r in _journal_rows(fresh, tmp_path) if r["status"] == "ok"]) <= 5


def test_time_budget_stops_the_study(tmp_path):
    (result,) = _tune(tmp_path, trials=10**6, timeout=0.5)
    assert result.stopped_because in ("time budget reached", "every valid config evaluated")
    assert result.winner is not None


# ---- worker isolation ---------------------------------------------------------------------------------------
@pytest.fixture
def misbehave(monkeypatch):
    def set_(spec: str):
        monkeypatch.setenv("VIDRIAL_FAKE_MISBEHAVE", spec)
    return set_


def test_worker_restarts_after_crash_and_hang(misbehave):
    misbehave("crash:tile_m=256;hang:tile_m=64")
    job = lambda m: {"family": T.synthetic.REF, "key": KEY128,  # noqa: E731
                     "config": T.SynthConfig(tile_m=m).model_dump(), "arch": "sm_90", "check": True}
    with MeasurementWorker(FAKE, job_timeout_s=3.0, startup_timeout_s=120) as w:
        first_pid = w.info["pid"]
        assert w.measure(job(128))["status"] == "ok"
        crashed = w.measure(job(256))
        assert crashed["status"] == "crash" and "exit code 17" in crashed["reason"]
        ok = w.measure(job(128))
        assert ok["status"] == "ok" and ok["pid"] != first_pid
        hung = w.measure(job(64))
        assert hung["status"] == "timeout"
        assert w.measure(job(128))["status"] == "ok"
        assert w.stats.restarts == 2


def test_study_survives_crashing_hanging_and_faulting_configs(tmp_path, misbehave):
    misbehave("hang:tile_m=64&warps=2;crash:tile_m=256;fault:warps=2")
    space = _space_file(tmp_path, 'family = "_synthetic"\n[fields]\ntile_m = [64, 128, 256]\nwarps = [2, 4]\n')
    (result,) = _tune(tmp_path, sampler="grid", isolate=True, job_timeout_s=3.0, space_path=str(space),
                      backend=FAKE)
    rows = {(r["config"]["tile_m"], r["config"]["warps"]): r["status"] for r in _journal_rows(result, tmp_path)}
    assert rows == {(64, 2): "timeout", (64, 4): "ok", (128, 2): "fault", (128, 4): "ok",
                    (256, 2): "crash", (256, 4): "crash"}
    assert result.winner == {"tile_m": 128, "tile_k": 32, "warps": 4, "stages": 2}
    assert result.status_counts == {"ok": 2, "timeout": 1, "fault": 1, "crash": 2}
    assert result.store_path is not None


# ---- scale-out: several processes, one study ---------------------------------------------------------------
def test_processes_share_a_study_through_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_FAKE_DELAY_S", "0.05")  # measuring takes time, as on a GPU
    monkeypatch.setenv("VIDRIAL_FAKE_RENDEZVOUS", str(tmp_path / "device1-measured"))  # however slow the spawn
    (result,) = tune(T.synthetic, [KEY128], trials=16, out=tmp_path / "out", backend=FAKE, gpus=(0, 1),
                     compiler="tuning_doubles:no_spill_compile", compile_ahead=1,
                     tuned_dir=tmp_path / "tuned", progress=False, retime_rounds=1)
    rows = _journal_rows(result, tmp_path)
    devices = {r["device"] for r in rows if r["finished"] and r["status"] == "ok"}
    assert devices == {"0", "1"}
    assert 16 <= result.trials <= 18
    assert result.winner is not None


# ---- measuring the tuner itself ----------------------------------------------------------------------------------
def test_compare_samplers_against_the_exhaustive_best(tmp_path):
    (result,) = _tune(tmp_path, sampler="grid", compare=(4, 8))
    text = (Path(result.report_dir) / "tuner_quality.md").read_text()
    assert "| tpe | 8 |" in text and "| gp | 4 |" in text and "| random | 4 |" in text
    from vidrial.tuning.records import TrialRow
    from vidrial.tuning.report import compare_samplers, exhaustive_table

    space = load_search_space(T.synthetic)
    table = exhaustive_table([TrialRow(**r) for r in _journal_rows(result, tmp_path)])
    rows = compare_samplers(T.synthetic, T.SynthKey(**KEY128), space, table, "sm_90", budgets=(10 * len(table),),
                            samplers=("random",), seeds=2)
    assert rows[0]["mean_ratio"] == pytest.approx(1.0) and rows[0]["found_optimum"] == 1.0


# ---- compile ahead with real NVRTC (no GPU needed) --------------------------------------------------------------
def test_pool_compiler_compiles_ahead_with_nvrtc(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path / "cache"))
    from vidrial.tuning.compile_pool import PoolCompiler

    fam, key = T.fault_probe, T.ProbeKey()
    pool = PoolCompiler(workers=2)
    try:
        futures = [pool.submit(fam, key, T.ProbeConfig(mode=m), "sm_90") for m in ("ok", "hang")]
        compiled = [f.result(timeout=120) for f in futures]
    finally:
        pool.close()
    for c in compiled:
        assert not isinstance(c, BaseException), c
        assert c.facts.registers > 0 and not c.facts.spills
        assert fam.infeasible_reason(key, T.ProbeConfig(), c) is None


def test_pool_compiler_builds_each_implementation_for_its_target(tmp_path, monkeypatch):
    """A study on an sm_90 GPU compiles its wgmma configs for sm_90a (family.target_arch), its mma_sync ones
    for sm_90: the tuner measures both implementations (not only the default that the launch path builds)."""
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path / "cache"))
    from vidrial.kernels.power_retention.query_state_bwd import FAMILY, QueryStateBwdConfig, QueryStateBwdKey
    from vidrial.tuning.compile_pool import PoolCompiler

    key = QueryStateBwdKey(head_dim=64, deg=2, d_tile=8)
    pool = PoolCompiler(workers=1)
    try:
        wg = pool.submit(FAMILY, key, QueryStateBwdConfig(impl="wgmma", warps=4, stages=3), "sm_90").result()
        mma = pool.submit(FAMILY, key, QueryStateBwdConfig(), "sm_90").result()
    finally:
        pool.close()
    assert not isinstance(wg, BaseException), str(wg)[:2000]
    assert (wg.arch, mma.arch) == ("sm_90a", "sm_90")


def test_settings_and_cli_arguments():
    from vidrial.cli import build_parser, main

    args = build_parser().parse_args(["tune", "--kernel", "update_state", "--key", '{"head_dim": 64}', "--trials",
                                      "7", "--sampler", "gp", "--gpus", "0,1", "--resume", "--storage",
                                      "sqlite:///x.db"])
    assert (args.kernel, args.trials, args.sampler, args.gpus, args.resume) == (["update_state"], 7, "gp", (0, 1), True)
    assert main(["tune", "--sampler", "tpe", "--compare", "10"]) == 2
    assert main(["tune", "--key", "{nope"]) == 2
    with pytest.raises(ValueError, match="sampler"):
        tune(T.synthetic, [KEY128], sampler="annealing")
    with pytest.raises(ValueError, match="TuneSettings"):
        tune(T.synthetic, [KEY128], bogus=1)
    assert TuneSettings().sampler == "tpe"


def test_import_vidrial_stays_light():
    import subprocess
    import sys

    code = ("import sys, vidrial; vidrial.tune; "
            "print(','.join(m for m in ('torch', 'cupy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == ""


# ---- robustness: a dead compile process, a buggy check() ----------------------------------------------------------
class FlakyCompiler:
    """The first future fails as if its compile process died; reset() + resubmit works."""

    def __init__(self):
        self.failed_once, self.resets = False, 0
        self.inner = T.fake_compiler()

    def submit(self, family, key, config, arch):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        f = Future()
        if not self.failed_once:
            self.failed_once = True
            f.set_exception(BrokenProcessPool("a compile process died"))
        else:
            f.set_result(self.inner(family, key, config, arch))
        return f

    def reset(self):
        self.resets += 1

    def close(self):
        pass


def test_a_dead_compile_process_is_retried(tmp_path):
    flaky = FlakyCompiler()
    (result,) = _tune(tmp_path, trials=6, compiler=flaky)
    assert flaky.resets == 1
    assert result.status_counts.get("compile_error", 0) == 0 and result.trials == 6


def test_a_raising_check_marks_configs_invalid_not_the_study(tmp_path, monkeypatch):
    def broken_check(key, config, arch):
        if config.tile_m == 64:
            raise KeyError("bug")

    monkeypatch.setattr(T.synthetic, "check", broken_check)
    (result,) = _tune(tmp_path, sampler="grid")
    rows = _journal_rows(result, tmp_path)
    assert all(r["config"]["tile_m"] != 64 for r in rows if r["config"])
    assert result.winner == T.SYNTH_OPTIMUM


def test_cli_end_to_end_with_resume(tmp_path, capsys):
    from vidrial.cli import main

    argv = ["tune", "--kernel", T.synthetic.REF, "--key", '{"head_dim": 128}', "--trials", "8", "--out",
            str(tmp_path / "out"), "--tuned-dir", str(tmp_path / "tuned"), "--backend", FAKE,
            "--compiler", "tuning_doubles:no_spill_compile", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "_synthetic" in out and "8 trials" in out and "stored in" in out
    assert main([*argv[:6], "12", *argv[7:], "--resume"]) == 0
    assert "12 trials" in capsys.readouterr().out
    assert (tmp_path / "tuned" / "fake-gpu" / "_synthetic.json").is_file()
    assert (tmp_path / "out" / "report.md").is_file()


def test_progress_is_a_tqdm_bar_with_the_best_time(capsys):
    from vidrial.tuning.loop import Progress

    bar = Progress(10, 0, "study", enabled=True)
    bar.set(2)  # a resumed study: the first count is tqdm's initial, so its rate and ETA count from here
    bar.set(4, best=1.25)
    bar.set(10)
    bar.close()
    err = capsys.readouterr().err
    assert "study" in err and "10/10" in err and "best 1.25 ms" in err and "trial/s" in err
    quiet = Progress(10, 0, "quiet", enabled=False)
    quiet.set(5, best=1.0)
    quiet.close()
    auto = Progress(10, 0, "auto", enabled=None)  # captured stderr is no terminal: no bar
    auto.set(5)
    auto.close()
    assert capsys.readouterr().err == "" and quiet.n == 5


def test_families_without_the_measurement_protocol_are_refused(tmp_path):
    with pytest.raises(ValueError, match="make_inputs, run, reference"):
        tune(T.synthetic, [KEY128], out=tmp_path)  # the default (GPU) backend needs the protocol


def test_a_startup_error_sent_just_before_the_worker_exits_is_not_lost(monkeypatch):
    """The worker sends its startup error and exits at once: the parent may see the process dead before
    it sees the message, and must still report the message (e.g. 'no CUDA device present')."""
    from vidrial.tuning.worker import MeasurementWorker, WorkerError

    class Conn:
        polls = 0

        def poll(self, timeout=0.0):  # nothing yet on the first poll; the message is there by the next
            Conn.polls += 1
            return Conn.polls > 1

        def recv(self):
            return "startup_error", "InputError: gpus: got device 0: no CUDA device present"

        def close(self):
            pass

    class DeadOnArrival:
        exitcode = 2

        def __init__(self, **kwargs):
            pass

        def start(self):
            pass

        def is_alive(self):
            return False

        def join(self, timeout=None):
            pass

    class Ctx:
        Process = DeadOnArrival

        def Pipe(self, duplex=True):
            return Conn(), Conn()

    worker = MeasurementWorker(FAKE)
    monkeypatch.setattr(worker, "_ctx", Ctx())
    with pytest.raises(WorkerError, match="no CUDA device present"):
        worker.start()


def test_import_ref_takes_a_file_path():
    """`vidrial tune --kernel tests/tuning_doubles.py:fault_probe` works from a checkout: the same module
    object as 'tuning_doubles:...', so REFs the family gives itself resolve to it in workers too."""
    from vidrial.tuning.worker import import_ref

    assert import_ref(f"{T.__file__}:synthetic") is T.synthetic
    with pytest.raises(ImportError, match="no such file"):
        import_ref("tests/nope.py:x")


# ---- warm start ---------------------------------------------------------------------------------------------------
def test_warm_start_measures_the_stale_previous_winner_right_after_the_default(tmp_path):
    """A template change makes every stored entry stale for dispatch, but its config is still the best guess:
    the re-tune measures the default (trial 0) and then the key's previous winner (trial 1)."""
    from vidrial.dispatch import tuned_entry
    from vidrial.dispatch.store import GpuIdentity, record

    key = T.SynthKey(**KEY128)
    previous = T.SynthConfig(tile_m=32, tile_k=16, warps=2, stages=1)  # far from the default and the optimum
    gpu = GpuIdentity(name="Fake GPU", arch="sm_90", sm_count=132)
    path = record(T.synthetic, key, previous, gpu=gpu, time_ms=2.0, default_time_ms=None, trials=1,
                  directory=tmp_path / "tuned")
    path.write_text(path.read_text().replace(T.synthetic.template_hash, "0ldtemplate00000"))
    assert tuned_entry(T.synthetic, key, gpu.slug, tmp_path / "tuned") is None  # stale: dispatch ignores it
    (result,) = _tune(tmp_path, trials=4, sampler="random")
    configs = {r["trial"]: r["config"] for r in _journal_rows(result, tmp_path)}
    assert configs[0] == T.SynthConfig().model_dump(mode="json")
    assert configs[1] == previous.model_dump(mode="json")


# ---- trustworthy winners: re-timing until the winner's 95% interval is narrow, ties reported -----------------
class NoisyMeasurer:
    """Times drawn around a true time per config (synthetic objective): a relative noise, seeded."""

    def __init__(self, true_ms: dict[int, float], noise: float, seed: int = 0):
        import random

        self.true_ms, self.noise, self.rng, self.calls = true_ms, noise, random.Random(seed), 0

    def measure(self, job):
        self.calls += 1
        t = self.true_ms[job["config"]["tile_m"]]
        return {"status": "ok", "time_ms": t * (1.0 + self.noise * self.rng.gauss(0.0, 1.0))}


def _retime(measurer, configs, **settings):
    from vidrial.tuning.finish import retime

    key = T.SynthKey(**KEY128)
    return retime(T.synthetic, key, load_search_space(T.synthetic), measurer, "sm_90", TuneSettings(**settings),
                  configs, set())


def test_interval95_is_students_t():
    from vidrial.tuning.finish import interval95

    assert interval95([1.0]) is None
    lo, hi = interval95([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975, 2} = 4.303
    assert (lo, hi) == pytest.approx((2.0 - 4.303 / 3**0.5, 2.0 + 4.303 / 3**0.5))


def test_retiming_goes_on_until_the_winners_interval_is_narrow():
    configs = [T.SynthConfig(tile_m=128), T.SynthConfig(tile_m=64)]
    quiet = NoisyMeasurer({128: 1.0, 64: 1.5}, noise=0.001)
    out = _retime(quiet, configs, retime_rounds=3, retime_max_rounds=12, interval_rel=0.01)
    assert quiet.calls == 2 * 3  # narrow after the minimum rounds: no more
    noisy = NoisyMeasurer({128: 1.0, 64: 1.5}, noise=0.05)
    out = _retime(noisy, configs, retime_rounds=3, retime_max_rounds=12, interval_rel=0.01)
    assert noisy.calls == 2 * 12  # 5% noise: 12 rounds give a ~3% interval, still wider than 1%: the cap
    win = out[next(k for k in out if '"tile_m":128' in k.replace(" ", ""))]
    assert len(win.rounds) == 12 and win.interval_ms[0] < win.time_ms < win.interval_ms[1]
    medium = NoisyMeasurer({128: 1.0, 64: 1.5}, noise=0.012)
    _retime(medium, configs, retime_rounds=3, retime_max_rounds=40, interval_rel=0.01)
    assert 2 * 3 < medium.calls < 2 * 40  # stops once the interval is narrow enough


def test_a_tie_is_reported_with_the_interval_in_the_result_and_the_store(tmp_path):
    """Leaders with the same true time cannot be told apart: the result (and the stored entry) carry the
    winner's 95% interval and the tie (the report names the tied configs)."""
    import json

    (result,) = tune(T.synthetic, [KEY128], trials=30, out=tmp_path / "out", isolate=False,
                     backend="tuning_doubles:TieBackend", compiler=T.fake_compiler(), tuned_dir=tmp_path / "tuned",
                     progress=False, retime_rounds=3)
    assert result.retime_rounds >= 3 and result.interval_ms is not None
    lo, hi = result.interval_ms
    assert lo <= result.time_ms <= hi
    entry = next(iter(json.loads(Path(result.store_path).read_text())["entries"].values()))
    assert entry["time_interval_ms"] == pytest.approx([lo, hi]) and entry["tied_with"] == len(result.tied_with)
    md = (Path(result.report_dir) / "leaderboard.md").read_text()
    assert "winner's 95% interval" in md
    # the leaders are the tile_m=128, tile_k=64 region (1.0 ms against >= 1.2 for the rest): a tie
    assert result.tied_with and all((c["tile_m"], c["tile_k"]) == (128, 64) for c in result.tied_with)
    assert "a tie with" in md
