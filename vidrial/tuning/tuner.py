"""The autotuner: one Optuna study per (kernel family, GPU, problem key).

A trial: the sampler suggests one value per searched field (search_spaces/<family>.toml)
-> constraints + the Config model + family.check() (invalid: a constraint violation,
not counted against the trial budget) -> memo (a config already evaluated in this study
is reported again without measuring) -> compile (NVRTC, on-disk cache; the next
candidates are compiled ahead in a process pool while the current one is measured) ->
compiled facts (spills, shared memory, registers) that make the config infeasible are a
constraint violation -> the measurement worker (a separate process, restarted after a
fault, crash or hang) checks the config's first run against the reference and times it
(CUDA events, L2 flush, warm-up, median). Failed configs are constraint violations too.

Studies live in Optuna storage (a journal file in the output dir by default, or any
Optuna storage URL), so an interrupted run continues with --resume, and several
processes (one per GPU, `gpus=`) work one study within exactly its trial budget; each holds
a lease on it (vidrial.tuning.liveness), so a fresh run never deletes a study that a live
process works, and trials left RUNNING by a dead one are failed and asked again. The
journal survives kills (vidrial.tuning.journal). At the end the leaders and the default
config are re-timed in interleaved rounds; ties within `tie_rel` go to the config that
comes first in search-space order (smaller choices first), so the winner is
deterministic. Winners go to the tuned-config store; a report (leaderboard, history)
goes to the output dir.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vidrial.core.errors import InputError
from vidrial.tuning.liveness import OWNER_ATTR, StudyLeases, describe, die_with_parent, exit_on_sigterm
from vidrial.tuning.search_space import SearchSpace, SearchSpaceError, load_search_space
from vidrial.tuning.worker import (
    DEFAULT_BACKEND,
    InProcessMeasurer,
    MeasurementWorker,
    family_ref,
    import_ref,
    resolve_family,
)

SAMPLERS = ("tpe", "gp", "grid", "random")
PRESETS = ("shapes", "standard", "quick")
# statuses that do not count against the trial budget
UNCOUNTED = ("invalid", "interrupted")


@dataclass
class TuneSettings:
    trials: int = 40  # trial budget per study (grid: all valid configs)
    timeout_s: float | None = None  # wall-clock budget per study
    sampler: str = "tpe"
    seed: int = 0
    out_dir: Path = Path("vidrial-tune")
    storage: str | None = None  # None: journal file <out_dir>/journal.log
    resume: bool = False
    gpus: tuple[int, ...] = (0,)
    arch: str | None = None  # default: the measuring GPU's arch
    backend: str = DEFAULT_BACKEND
    isolate: bool = True  # measure in a worker process
    job_timeout_s: float = 120.0
    startup_timeout_s: float = 300.0
    compiler: str | None = None  # 'module:attr' of a compile function (tests); None: NVRTC pool
    compile_ahead: int | None = None
    compile_workers: int | None = None
    leaders: int = 3
    retime_rounds: int = 3
    tie_rel: float = 0.005
    check: bool = True
    input_seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_repeats: int = 5
    max_repeats: int = 200
    record: bool = True
    tuned_dir: Path | None = None
    skip_tuned: bool = False  # keys with an exact entry (shipped, user dir or tuned_dir) for this GPU are skipped
    progress: bool = True
    report: bool = True
    space_path: str | None = None

    def timing(self) -> dict[str, Any]:
        return {"warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms, "min_repeats": self.min_repeats,
                "max_repeats": self.max_repeats}

    def ahead(self) -> int:
        if self.compile_ahead is not None:
            return max(1, self.compile_ahead)
        return max(2, min(8, os.cpu_count() or 2))


@dataclass
class StudyResult:
    family: str
    key: dict[str, Any]
    study_name: str
    gpu: dict[str, Any]
    arch: str
    winner: dict[str, Any] | None
    time_ms: float | None
    default_config: dict[str, Any] | None
    default_time_ms: float | None
    trials: int  # counted trials (budget units)
    status_counts: dict[str, int]
    leaderboard: list[dict[str, Any]] = field(default_factory=list)
    store_path: str | None = None
    report_dir: str | None = None
    stopped_because: str = ""

    @property
    def speedup(self) -> float | None:
        if self.time_ms and self.default_time_ms:
            return self.default_time_ms / self.time_ms
        return None


# ---- helpers ---------------------------------------------------------------------------------
ATTR = "vidrial"  # the one user attribute per trial (and per study) that holds what the tuner records


def trial_attrs(trial: Any) -> dict[str, Any]:
    """What the tuner recorded on a trial: status, config, ck (canonical config JSON), time_ms,
    reason, facts, timing, rel_err, memo_of (trial number of the measurement reused), device,
    constraint (0 feasible, 1 violated)."""
    return trial.user_attrs.get(ATTR) or {}


def canonical(config: Any) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9=._-]+", "_", text).strip("_") or "key"


def study_name(family: Any, gpu_slug: str, key: Any) -> str:
    return f"{family.name}|{gpu_slug}|{key.key_string()}|{family.template_hash}"


def _journal_path(url: str | None, out_dir: Path) -> Path | None:
    """The journal file that storage `url` names (None: a storage URL)."""
    if url is None:
        return Path(out_dir) / "journal.log"
    if url.startswith("journal:"):
        return Path(url[len("journal:"):])
    return Path(url) if "://" not in url else None


def make_storage(url: str | None, out_dir: Path) -> Any:
    """An Optuna storage: a journal file by default (a path or 'journal:PATH'; repaired when a
    killed process tore it, vidrial.tuning.journal), else any Optuna storage URL
    (sqlite:///..., postgresql://...)."""
    from vidrial.tuning.journal import open_journal

    path = _journal_path(url, out_dir)
    if path is None:
        return url
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_journal(path)


def study_leases(url: str | None, out_dir: Path, name: str) -> StudyLeases:
    """The leases of study `name` (vidrial.tuning.liveness): next to the journal file, or in
    the output dir for a storage URL."""
    path = _journal_path(url, out_dir)
    return StudyLeases(path.with_name(path.name + ".leases") if path is not None else Path(out_dir) / "leases", name)


def _counted(trial: Any) -> bool:
    """Whether a finished trial counts against the trial budget."""
    status = trial_attrs(trial).get("status")
    return status is not None and status not in UNCOUNTED


def fail_stale_trials(study: Any, leases: StudyLeases, running: Sequence[Any] | None = None) -> list[int]:
    """Fails the trials left RUNNING by processes that died (their owner's lease is gone, or
    they name no owner: trials are asked and named under the guard, so one without a name was
    asked by a process that died at once) with status "interrupted" and a note: a resumed study
    asks for them again. Call under leases.guard(). Returns their numbers."""
    from optuna.trial import TrialState

    if running is None:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    foreign = [t for t in running if t.user_attrs.get(OWNER_ATTR) != leases.token]
    if not foreign:
        return []
    live = leases.live()
    stale = [t for t in foreign if t.user_attrs.get(OWNER_ATTR) not in live]
    for t in stale:
        owner = t.user_attrs.get(OWNER_ATTR) or "a process that named no lease"
        note = f"left RUNNING by {owner}, which died (killed?); failed by {leases.token or os.getpid()}"
        # optuna's public API annotates only trials this process asked: go through the storage
        study._storage.set_trial_user_attr(t._trial_id, ATTR, {"status": "interrupted", "reason": note})
        study.tell(t.number, state=TrialState.FAIL)
    if stale:
        print(f"vidrial tune: study {study.study_name}: failed {len(stale)} trial(s) left RUNNING by a process that "
              f"died (trials {', '.join(str(t.number) for t in stale)}); they are asked for again",
              file=sys.stderr, flush=True)
    return [t.number for t in stale]


STORAGE_RULE = "a journal file path, or an Optuna storage URL such as sqlite:///tune.db or postgresql://host/db"


def _sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite URL (sqlite:///rel.db, sqlite:////abs.db); None for others and in-memory."""
    scheme, _, rest = url.partition("://")
    if scheme.split("+")[0] != "sqlite":
        return None
    path = rest.partition("?")[0]
    path = path[1:] if path.startswith("/") else path  # the (empty) host ends at the first slash
    return None if path in ("", ":memory:") else Path(path)


def check_storage(url: str | None, out_dir: Path) -> None:
    """InputError for a storage that cannot work, raised before any study or worker exists (Optuna itself
    would only fail once the GPU is set up): a journal path that is a folder or lies under a file, a
    sqlite file in a missing folder, a URL of no SQLAlchemy dialect."""
    journal = _journal_path(url, out_dir)
    db = journal if journal is not None else _sqlite_file(url)
    why = None
    if db is not None:
        folder = next((p for p in db.parents if p.exists()), None)
        if db.is_dir():
            why = f"{db} is a folder, not a file"
        elif folder is not None and not folder.is_dir():
            why = f"{folder} is a file, not a folder"
        elif journal is None and not db.parent.is_dir():  # sqlite creates the file, not its folder
            why = f"the folder {db.parent} does not exist"
    if why is None and journal is None:
        try:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError, NoSuchModuleError
        except ImportError:
            why = "storage URLs need sqlalchemy, which is not installed"
        else:
            try:
                make_url(url).get_dialect()
            except (ArgumentError, NoSuchModuleError, ValueError) as exc:
                why = str(exc)
    if why is not None:
        raise InputError("storage", f"{url!r} ({why})", STORAGE_RULE)


def check_settings(settings: TuneSettings) -> None:
    """The arguments a person gets wrong, checked before anything is created, measured or compiled."""
    from vidrial.core.paths import check_folder_argument

    trials = settings.trials
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError("trials", trials, "a whole number of trials, at least 1")
    check_folder_argument("out", settings.out_dir)
    if settings.tuned_dir is not None:
        check_folder_argument("tuned_dir", settings.tuned_dir)
    check_storage(settings.storage, settings.out_dir)
    if settings.space_path is not None and not Path(settings.space_path).is_file():
        why = "a folder" if Path(settings.space_path).is_dir() else "missing"
        raise InputError("space_path", f"{settings.space_path} ({why})", "a search-space TOML file")


def _has_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints_from_attrs(trial: Any) -> Sequence[float]:
    return (float(trial_attrs(trial).get("constraint", 0.0)),)


def make_sampler(name: str, seed: int, budget: int) -> Any:
    import optuna

    name = name.lower()
    if name not in SAMPLERS:
        raise InputError("sampler", repr(name), f"one of {', '.join(SAMPLERS)}")
    cf = {} if _has_set_constraint() else {"constraints_func": _constraints_from_attrs}
    n_startup = min(10, max(3, budget // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                              n_startup_trials=n_startup, warn_independent_sampling=False, **cf)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False,
                                             **cf)
        return optuna.samplers.RandomSampler(seed=seed)  # random; grid takes its trials from the queue


def _order_key(space: SearchSpace, config: Any) -> tuple:
    """Search-space order of a config's searched values (earlier choices first)."""
    dumped = config.model_dump(mode="json")
    out = []
    for name, choices in space.fields.items():
        v = dumped.get(name)
        out.append(choices.index(v) if v in choices else len(choices))
    return tuple(out)


# ---- compiling ahead -------------------------------------------------------------------------
class PoolCompiler:
    """Compiles (family, key, config, arch) in spawned worker processes through the core's
    compile cache; submit() returns a Future of a CompiledKernel or a CompileError."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._pool: Any = None

    def submit(self, family: Any, key: Any, config: Any, arch: str) -> Future:
        from vidrial.core.compile import _compile_job

        try:
            job = (family.render(key, config), arch, (), f"{family.name}: {key.label()} | {config.label()}")
        except Exception as exc:  # rendering errors are this config's failure
            f: Future = Future()
            f.set_result(exc)
            return f
        if self.workers <= 1:
            f = Future()
            f.set_result(_compile_job(job))
            return f
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                             initializer=die_with_parent, initargs=(os.getpid(),))
        return self._pool.submit(_compile_job, job)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def reset(self) -> None:
        """Drops a broken pool; the next submit() starts a fresh one. Pending futures of the
        old pool fail and are retried by the search loop."""
        self.close()


class FunctionCompiler:
    """Wraps a compile function (family, key, config, arch) -> CompiledKernel (tests, fakes)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def submit(self, family: Any, key: Any, config: Any, arch: str) -> Future:
        f: Future = Future()
        try:
            f.set_result(self.fn(family, key, config, arch))
        except Exception as exc:
            f.set_result(exc)
        return f

    def close(self) -> None:
        pass


def make_compiler(settings: TuneSettings, override: Any = None) -> Any:
    if override is not None:
        return override if hasattr(override, "submit") else FunctionCompiler(override)
    if settings.compiler:
        return FunctionCompiler(import_ref(settings.compiler))
    return PoolCompiler(settings.compile_workers or settings.ahead())


def make_measurer(settings: TuneSettings, device_index: int) -> Any:
    if settings.isolate:
        return MeasurementWorker(settings.backend, device_index, settings.job_timeout_s, settings.startup_timeout_s)
    return InProcessMeasurer(settings.backend, device_index)


# ---- progress ----------------------------------------------------------------------------------
class Progress:
    """A progress bar with ETA: tqdm when installed, else a line on stderr every few seconds."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self._bar = None
        self._start = time.monotonic()
        self._start_n = initial
        self._last_print = 0.0
        self._first = True
        self.best: float | None = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="trial", dynamic_ncols=True,
                             file=sys.stderr)
        except ImportError:
            self._bar = None

    def set(self, n: int, best: float | None = None) -> None:
        if best is not None:
            self.best = best
        if self._first:  # resumed studies start with trials done: the ETA counts from here
            self._first = False
            self._start_n = n
            self._start = time.monotonic()
        if not self.enabled:
            self.n = n
            return
        if self._bar is not None:
            if n > self.n:
                self._bar.update(n - self.n)
            if self.best is not None:
                self._bar.set_postfix_str(f"best {self.best:.4g} ms", refresh=False)
            self.n = n
            return
        self.n = n
        now = time.monotonic()
        if now - self._last_print >= 2.0 or n >= self.total:
            self._last_print = now
            done = n - self._start_n
            rate = done / max(now - self._start, 1e-9)
            eta = (self.total - n) / rate if rate > 0 else float("nan")
            best = f", best {self.best:.4g} ms" if self.best is not None else ""
            print(f"{self.desc}: {n}/{self.total} trials, ETA {eta:.0f} s{best}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---- the search loop -----------------------------------------------------------------------------
@dataclass
class _Pending:
    trial: Any
    config: Any
    ck: str
    future: Future | None


class SearchLoop:
    """Asks, evaluates and tells trials of one study until the budget, the deadline or the
    space runs out. Several SearchLoops (processes) may work one study: with `leases` (this
    process's lease taken), each asks under the study's guard after counting the budget in
    the storage, so together they run exactly the budget."""

    def __init__(self, family: Any, key: Any, space: SearchSpace, study: Any, settings: TuneSettings,
                 measurer: Any, compiler: Any, arch: str, budget: int, deadline: float | None,
                 progress: Progress | None = None, device_label: str = "0", grid: bool = False,
                 n_valid: int | None = None, leases: StudyLeases | None = None):
        self.family, self.key, self.space, self.study = family, key, space, study
        self.settings, self.measurer, self.compiler, self.arch = settings, measurer, compiler, arch
        self.budget, self.deadline, self.progress = budget, deadline, progress
        self.device_label, self.grid, self.n_valid = device_label, grid, n_valid
        self.leases = leases
        self.memo: dict[str, dict[str, Any]] = {}
        self.counted = 0
        self.best: float | None = None
        self.max_ok: float | None = None
        self.stopped_because = ""
        self._fam_ref = family_ref(family)
        self._use_set_constraint = _has_set_constraint()
        self._open: dict[int, Any] = {}  # asked, not yet told

    # -- state from storage --
    def sync(self) -> None:
        from optuna.trial import TrialState

        counted = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            a = trial_attrs(t)
            status = a.get("status")
            if not _counted(t):
                if status == "invalid" and "ck" in a:
                    self.memo.setdefault(a["ck"], {"status": "invalid", "reason": a.get("reason", ""),
                                                   "trial": t.number})
                continue
            counted += 1
            if a.get("memo_of") is None and "ck" in a and t.state == TrialState.COMPLETE:
                self.memo.setdefault(a["ck"], {"status": status, "time_ms": a.get("time_ms"),
                                               "reason": a.get("reason", ""), "trial": t.number})
            if status == "ok" and a.get("time_ms") is not None:
                tm = float(a["time_ms"])
                self.best = tm if self.best is None else min(self.best, tm)
                self.max_ok = tm if self.max_ok is None else max(self.max_ok, tm)
        self.counted = counted

    # -- telling --
    def _tell(self, trial: Any, config: Any, ck: str | None, result: dict[str, Any], memo_of: int | None = None) -> None:
        status = result.get("status", "error")
        ok = status == "ok" and result.get("time_ms") is not None
        attrs = {"status": status, "device": self.device_label}
        if ck is not None:
            attrs["ck"] = ck
        if config is not None:
            attrs["config"] = config.model_dump(mode="json")
        if ok:
            attrs["time_ms"] = float(result["time_ms"])
        if result.get("reason"):
            attrs["reason"] = str(result["reason"])[:500]
        if result.get("rel_err") is not None:
            attrs["rel_err"] = float(result["rel_err"])
        if result.get("facts"):
            attrs["facts"] = result["facts"]
        if result.get("timing"):
            attrs["timing"] = result["timing"]
        if memo_of is not None:
            attrs["memo_of"] = memo_of
        attrs["constraint"] = 0.0 if ok else 1.0
        trial.set_user_attr(ATTR, attrs)  # one storage write (journal appends are locked + synced)
        if self._use_set_constraint:
            trial.set_constraint("feasible", attrs["constraint"])
        if ok:
            value = float(result["time_ms"])
        else:
            value = 2.0 * self.max_ok if self.max_ok else 1000.0
        self.study.tell(trial, value)
        self._open.pop(trial.number, None)
        if ok:
            self.best = value if self.best is None else min(self.best, value)
            self.max_ok = value if self.max_ok is None else max(self.max_ok, value)
        if ck is not None and memo_of is None:
            self.memo[ck] = {"status": status, "time_ms": attrs.get("time_ms"), "reason": attrs.get("reason", ""),
                             "trial": trial.number}
        if status not in UNCOUNTED:
            self.counted += 1
            if self.progress is not None:
                self.progress.set(self.counted, self.best)

    def _fail(self, trial: Any, status: str = "interrupted") -> None:
        from optuna.trial import TrialState

        try:
            trial.set_user_attr(ATTR, {"status": status})
            self.study.tell(trial, state=TrialState.FAIL)
        except Exception:
            pass
        self._open.pop(trial.number, None)

    # -- evaluation --
    def _memo_result(self, ck: str) -> dict[str, Any] | None:
        hit = self.memo.get(ck)
        if hit is None:
            return None
        result = {"status": hit["status"], "reason": hit.get("reason", "")}
        if hit.get("time_ms") is not None:
            result["time_ms"] = hit["time_ms"]
        return result

    def _evaluate(self, p: _Pending) -> dict[str, Any]:
        if p.future is not None:
            try:
                compiled = p.future.result()
            except Exception as exc:  # a compile process died (BrokenProcessPool): retry once on a fresh pool
                if hasattr(self.compiler, "reset"):
                    self.compiler.reset()
                try:
                    compiled = self.compiler.submit(self.family, self.key, p.config, self.arch).result()
                except Exception:
                    compiled = exc
            if isinstance(compiled, BaseException):
                return {"status": "compile_error", "reason": f"{type(compiled).__name__}: {compiled}"[:2000]}
            facts = compiled.facts.model_dump()
            try:
                reason = self.family.infeasible_reason(self.key, p.config, compiled)
            except Exception as exc:
                return {"status": "error", "reason": f"infeasible_reason failed: {type(exc).__name__}: {exc}",
                        "facts": facts}
            if reason:
                return {"status": "infeasible", "reason": reason, "facts": facts}
        else:
            facts = None
        job = {"family": self._fam_ref, "key": self.key.model_dump(mode="json"),
               "config": p.config.model_dump(mode="json"), "arch": self.arch, "check": self.settings.check,
               "seed": self.settings.input_seed, "timing": self.settings.timing()}
        result = dict(self.measurer.measure(job))
        if facts is not None:
            result.setdefault("facts", facts)
        return result

    def _used(self) -> int:
        """Budget units taken by all processes: counted finished trials and RUNNING ones (each
        counts once told, unless invalid or interrupted, and those are told at once or not
        counted anyway). Trials of dead processes are failed first, so they take none. Without
        leases (a study of this process alone) the local count is the same and O(1)."""
        from optuna.trial import TrialState

        if self.leases is None:
            return self.counted + len(self._open)
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL,
                                                               TrialState.PRUNED, TrialState.RUNNING))
        running = [t for t in trials if t.state == TrialState.RUNNING]
        stale = set(fail_stale_trials(self.study, self.leases, running))
        return sum(1 for t in running if t.number not in stale) + sum(
            1 for t in trials if t.state != TrialState.RUNNING and _counted(t))

    def _stop_reason(self) -> str | None:
        """Why not to ask another trial (None: ask). Under the guard, so the count stays true."""
        if self._used() >= self.budget:
            return "trial budget reached"
        if self.deadline is not None and time.time() >= self.deadline:
            return "time budget reached"
        if self.n_valid is not None and sum(1 for m in self.memo.values() if m["status"] != "invalid") >= self.n_valid:
            return "every valid config evaluated"
        if self.grid:
            from optuna.trial import TrialState

            if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                return "grid exhausted"
        return None

    def run(self) -> str:
        pending: deque[_Pending] = deque()
        invalid_streak = 0
        ahead = self.settings.ahead() if self.compiler is not None else 1
        self.sync()
        if self.progress is not None:
            self.progress.set(self.counted, self.best)
        try:
            while True:
                # ask ahead: fill the pipeline so candidates compile while one is measured
                while len(pending) < ahead:
                    # count, ask, name and (when invalid) tell under the guard: no other process
                    # counts this trial as RUNNING while it may still turn out uncounted
                    with self.leases.guard() if self.leases is not None else nullcontext():
                        reason = self._stop_reason()
                        if reason:
                            self.stopped_because = self.stopped_because or reason
                            break
                        trial = self.study.ask()
                        self._open[trial.number] = trial
                        if self.leases is not None:
                            trial.set_user_attr(OWNER_ATTR, self.leases.token)
                        values = self.space.suggest(trial)
                        config, why = self.space.make_config(self.key, values, self.arch)
                        if config is None:
                            self._tell(trial, None, None, {"status": "invalid", "reason": why})
                            invalid_streak += 1
                            if invalid_streak > 2000:
                                self.stopped_because = "the sampler keeps suggesting invalid configs"
                                break
                            continue
                    invalid_streak = 0
                    ck = canonical(config)
                    memo = self._memo_result(ck)
                    if memo is not None:
                        self._tell(trial, config, ck, memo, memo_of=self.memo[ck]["trial"])
                        continue
                    if any(q.ck == ck for q in pending):  # the same config is already on its way
                        pending.append(_Pending(trial, config, ck, None))
                        continue
                    future = (self.compiler.submit(self.family, self.key, config, self.arch)
                              if self.compiler is not None else None)
                    pending.append(_Pending(trial, config, ck, future))
                if not pending:
                    break
                if self.deadline is not None and time.time() >= self.deadline:
                    self.stopped_because = "time budget reached"
                    for q in pending:  # not measured: a resumed study asks for them again
                        self._fail(q.trial)
                    pending.clear()
                    break
                p = pending.popleft()
                self.sync()  # other processes may have measured this config meanwhile
                memo = self._memo_result(p.ck)
                if memo is not None:
                    self._tell(p.trial, p.config, p.ck, memo, memo_of=self.memo[p.ck]["trial"])
                    continue
                self._tell(p.trial, p.config, p.ck, self._evaluate(p))
        except BaseException:
            for trial in list(self._open.values()):  # asked but not told: fail them, so a resume re-asks
                self._fail(trial)
            raise
        return self.stopped_because


# ---- finishing: re-time leaders, record, report ----------------------------------------------------
def _trial_rows(study: Any) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = trial_attrs(t)
        rows.append({"trial": t.number, "state": t.state.name, "status": a.get("status", t.state.name.lower()),
                     "time_ms": a.get("time_ms"), "config": a.get("config"), "ck": a.get("ck"),
                     "reason": a.get("reason", ""), "memo_of": a.get("memo_of"), "device": a.get("device"),
                     "facts": a.get("facts"), "rel_err": a.get("rel_err"),
                     "finished": t.state in (TrialState.COMPLETE, TrialState.FAIL)})
    return rows


def retime(family: Any, key: Any, space: SearchSpace, measurer: Any, arch: str, settings: TuneSettings,
           candidates: list[Any], first_use: set[str]) -> dict[str, dict[str, Any]]:
    """Re-times `candidates` in `settings.retime_rounds` interleaved rounds (order rotated
    each round); returns ck -> {"time_ms": median of round medians, "rounds": [...]} or
    {"status": ..., "reason": ...} for a candidate that failed."""
    fam_ref = family_ref(family)
    out: dict[str, dict[str, Any]] = {canonical(c): {"rounds": []} for c in candidates}
    for r in range(max(1, settings.retime_rounds)):
        alive = [c for c in candidates if "status" not in out[canonical(c)]]
        if not alive:
            break
        shift = r % len(alive)
        for config in alive[shift:] + alive[:shift]:
            ck = canonical(config)
            job = {"family": fam_ref, "key": key.model_dump(mode="json"), "config": config.model_dump(mode="json"),
                   "arch": arch, "check": settings.check and ck in first_use, "seed": settings.input_seed,
                   "timing": settings.timing()}
            res = measurer.measure(job)
            first_use.discard(ck)
            if res.get("status") != "ok":
                out[ck] = {"status": res.get("status", "error"), "reason": res.get("reason", "")}
            else:
                out[ck]["rounds"].append(float(res["time_ms"]))
    for v in out.values():
        if v.get("rounds"):
            v["time_ms"] = float(statistics.median(v["rounds"]))
    return out


def pick_winner(space: SearchSpace, timed: list[tuple[Any, float]], tie_rel: float) -> Any:
    """The fastest config; configs within `tie_rel` of the fastest tie, and the tie goes to the
    one first in search-space order (then canonical JSON): deterministic for equal inputs."""
    if not timed:
        return None
    best = min(t for _, t in timed)
    tied = [c for c, t in timed if t <= best * (1.0 + tie_rel)]
    return min(tied, key=lambda c: (_order_key(space, c), canonical(c)))


# ---- one study ---------------------------------------------------------------------------------
def _child_main(spec: dict[str, Any]) -> None:
    """Entry point of an extra per-GPU process: works the study through the shared storage.
    Dies with the parent (SIGTERM, which fails its open trials on the way out)."""
    import optuna

    exit_on_sigterm()
    die_with_parent(spec["parent_pid"], signal.SIGTERM)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = TuneSettings(**spec["settings"])
    family = resolve_family(spec["family"])
    key = family.Key.model_validate(spec["key"])
    space = load_search_space(family, settings.space_path)
    storage = make_storage(settings.storage, Path(settings.out_dir))
    device = spec["device"]
    sampler = make_sampler(settings.sampler, settings.seed + 1000 * (device + 1), spec["budget"])
    study = optuna.load_study(study_name=spec["study_name"], storage=storage, sampler=sampler)
    measurer = make_measurer(settings, device)
    compiler = make_compiler(settings)
    leases = study_leases(settings.storage, Path(settings.out_dir), spec["study_name"])
    leases.acquire()
    try:
        measurer.start()
        SearchLoop(family, key, space, study, settings, measurer, compiler, spec["arch"], spec["budget"],
                   spec["deadline"], None, str(device), grid=spec["grid"], n_valid=spec["n_valid"],
                   leases=leases).run()
    finally:
        compiler.close()
        measurer.close()
        leases.release()


def tune_key(family: Any, key: Any, settings: TuneSettings, *, measurer: Any = None, compiler: Any = None,
             space: SearchSpace | None = None) -> StudyResult:
    """Tunes `family` for one problem `key`; see the module docstring."""
    import optuna

    from vidrial.dispatch.store import GpuIdentity

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = Path(settings.out_dir)  # created by what writes there (journal, reports): a failed start leaves none
    space = space or load_search_space(family, settings.space_path)
    gpus = tuple(settings.gpus) or (0,)
    own_measurer = measurer is None
    measurer = measurer or make_measurer(settings, gpus[0])
    compiler = make_compiler(settings, compiler)
    leases: StudyLeases | None = None
    try:
        info = measurer.start()
        gpu = GpuIdentity(**info["gpu"])
        arch = settings.arch or info["arch"]
        storage = make_storage(settings.storage, out_dir)
        name = study_name(family, gpu.slug, key)
        if settings.skip_tuned:
            skipped = _already_tuned(family, key, gpu, arch, name, settings)
            if skipped is not None:
                return skipped
        leases = study_leases(settings.storage, out_dir, name)
        with leases.guard():  # no other process starts or joins the study meanwhile
            live = leases.live()
            if live and not settings.resume:  # deleting it would pull the study from under them
                where = _journal_path(settings.storage, out_dir) or settings.storage
                raise InputError("resume", f"False for study {name!r} in {where}, which a live process is "
                                 f"working ({describe(live)})", "--resume (resume=True) to join that study, or "
                                 "another --out or --storage for a fresh one")
            if not settings.resume:
                try:
                    optuna.delete_study(study_name=name, storage=storage)
                except KeyError:
                    pass
            leases.acquire()
        valid = space.valid_configs(key, arch)
        if not valid:
            raise InputError("search space", f"{space.source} for {key.label()} on {arch}",
                             "at least one config that satisfies the constraints and the family's check()")
        grid = settings.sampler == "grid"
        budget = len(valid) if grid else max(1, settings.trials)
        sampler = make_sampler(settings.sampler, settings.seed, budget)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize",
                                        load_if_exists=True)
        if ATTR not in study.user_attrs:
            study.set_user_attr(ATTR, {"family": family.name, "key": key.model_dump(mode="json"),
                                       "gpu": gpu.model_dump(), "arch": arch})
        default = family.default_config(key)
        default_params = space.params_of(default)
        default_in_space = False
        if all(default_params[n] in space.fields[n] for n in space.fields):
            made, _ = space.make_config(key, default_params, arch)
            default_in_space = made is not None and canonical(made) == canonical(default)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if default_in_space:
                study.enqueue_trial(default_params, skip_if_exists=True)
            if grid:
                for config in valid:
                    study.enqueue_trial(space.params_of(config), skip_if_exists=True)
        deadline = time.time() + settings.timeout_s if settings.timeout_s else None
        desc = f"{family.name} {key.label()}"
        progress = Progress(budget, 0, desc, settings.progress)
        children = []
        if len(gpus) > 1:  # started from this thread, which also joins them (die_with_parent)
            from multiprocessing import get_context

            ctx = get_context("spawn")
            spec_settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
            spec_settings["gpus"] = tuple(gpus)
            for dev in gpus[1:]:
                spec = {"settings": spec_settings, "family": family_ref(family), "key": key.model_dump(mode="json"),
                        "study_name": name, "device": dev, "arch": arch, "budget": budget, "deadline": deadline,
                        "grid": grid, "n_valid": len(valid), "parent_pid": os.getpid()}
                proc = ctx.Process(target=_child_main, args=(spec,), name=f"vidrial-tune-gpu{dev}")
                proc.start()
                children.append(proc)
        loop = SearchLoop(family, key, space, study, settings, measurer, compiler, arch, budget, deadline,
                          progress, str(gpus[0]), grid=grid, n_valid=len(valid), leases=leases)
        try:
            stopped = loop.run()
        finally:
            for proc in children:
                proc.join()
            progress.close()
        with leases.guard():  # a child that crashed left its trials RUNNING
            fail_stale_trials(study, leases)
        loop.sync()
        return _finish(family, key, space, study, settings, measurer, gpu, arch, name, loop, stopped,
                       default if _is_valid(space, key, default, arch) else None)
    finally:
        compiler.close()
        if own_measurer:
            measurer.close()
        if leases is not None:
            leases.release()


def _is_valid(space: SearchSpace, key: Any, config: Any, arch: str) -> bool:
    try:
        space.family.check(key, config, arch)
        return True
    except Exception:
        return False


def _finish(family: Any, key: Any, space: SearchSpace, study: Any, settings: TuneSettings, measurer: Any,
            gpu: Any, arch: str, name: str, loop: SearchLoop, stopped: str, default: Any) -> StudyResult:
    rows = _trial_rows(study)
    finished = [r for r in rows if r["finished"]]
    counts = Counter(r["status"] for r in finished if r["memo_of"] is None)
    counted = sum(1 for r in finished if r["status"] not in UNCOUNTED)
    # distinct measured configs, best study time first
    measured: dict[str, dict[str, Any]] = {}
    for r in finished:
        if r["status"] == "ok" and r["memo_of"] is None and r["ck"]:
            prev = measured.get(r["ck"])
            if prev is None or r["time_ms"] < prev["time_ms"]:
                measured[r["ck"]] = r
    ranked = sorted(measured.values(), key=lambda r: (r["time_ms"], r["trial"]))
    leaders = [family.Config.model_validate(r["config"]) for r in ranked[: max(1, settings.leaders)]]
    candidates = list(leaders)
    first_use: set[str] = set()
    if default is not None:
        dck = canonical(default)
        if dck not in {canonical(c) for c in candidates}:
            candidates.append(default)
        if dck not in measured:
            first_use.add(dck)
    retimed = retime(family, key, space, measurer, arch, settings, candidates, first_use) if candidates else {}
    timed = [(c, retimed[canonical(c)]["time_ms"]) for c in leaders if "time_ms" in retimed.get(canonical(c), {})]
    if not timed:  # re-timing failed for every leader: fall back to the study's times
        timed = [(family.Config.model_validate(r["config"]), r["time_ms"]) for r in ranked[: settings.leaders]]
    winner = pick_winner(space, timed, settings.tie_rel)
    # the default config may itself be the fastest
    default_time = retimed.get(canonical(default), {}).get("time_ms") if default is not None else None
    if winner is not None and default is not None and default_time is not None:
        wt = dict((canonical(c), t) for c, t in timed)[canonical(winner)]
        if default_time < wt / (1.0 + settings.tie_rel):
            winner = default
            timed.append((default, default_time))
    win_time = dict((canonical(c), t) for c, t in timed).get(canonical(winner)) if winner is not None else None
    leaderboard = []
    for r in ranked:
        rt = retimed.get(r["ck"], {})
        leaderboard.append({**r, "retime_ms": rt.get("time_ms"), "retime_status": rt.get("status")})
    result = StudyResult(
        family=family.name, key=key.model_dump(mode="json"), study_name=name, gpu=gpu.model_dump(), arch=arch,
        winner=winner.model_dump(mode="json") if winner is not None else None, time_ms=win_time,
        default_config=default.model_dump(mode="json") if default is not None else None,
        default_time_ms=default_time, trials=counted, status_counts=dict(counts), leaderboard=leaderboard,
        stopped_because=stopped)
    if winner is not None and settings.record:
        from vidrial.dispatch.store import record

        path = record(family, key, winner, gpu=gpu, time_ms=win_time, default_time_ms=default_time, trials=counted,
                      directory=settings.tuned_dir)
        result.store_path = str(path)
        try:  # this process's dispatcher sees the new winner
            from vidrial import dispatch

            dispatch.reload()
        except Exception:
            pass
    if settings.report:
        result.report_dir = str(write_report(result, rows, space, Path(settings.out_dir)))
    return result


def _already_tuned(family: Any, key: Any, gpu: Any, arch: str, name: str, settings: TuneSettings) -> StudyResult | None:
    """A result standing for the entry already recorded for exactly `key` on this GPU model (None: none)."""
    from vidrial.dispatch import tuned_entry

    found = tuned_entry(family, key, gpu.slug, settings.tuned_dir)
    if found is None:
        return None
    e = found.entry  # reported once, by the caller's on_result (the CLI: "...; already tuned, in <path>")
    return StudyResult(family=family.name, key=key.model_dump(mode="json"), study_name=name, gpu=gpu.model_dump(),
                       arch=arch, winner=e.config, time_ms=e.time_ms, default_config=None,
                       default_time_ms=e.default_time_ms, trials=0, status_counts={}, store_path=str(found.path),
                       stopped_because="already tuned")


# ---- report -----------------------------------------------------------------------------------------
def write_report(result: StudyResult, rows: list[dict[str, Any]], space: SearchSpace, out_dir: Path) -> Path:
    """<out>/<family>/<gpu>/<key>/: leaderboard.md, leaderboard.csv, history.csv, history.png."""
    from vidrial.dispatch.store import slugify

    d = Path(out_dir) / result.family / slugify(result.gpu["name"]) / slug(",".join(
        f"{k}={v}" for k, v in result.key.items()))
    d.mkdir(parents=True, exist_ok=True)
    fields = list(space.fields)
    # leaderboard.csv: every evaluated config (memo repeats left out)
    evaluated = [r for r in rows if r["finished"] and r["memo_of"] is None and r["config"] is not None]
    retimes = {r["ck"]: r for r in result.leaderboard}
    evaluated.sort(key=lambda r: (r["status"] != "ok", r["time_ms"] if r["time_ms"] is not None else math.inf,
                                  r["trial"]))
    with open(d / "leaderboard.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "status", "time_ms", "retime_ms", *fields, "registers", "spill_bytes",
                    "static_smem", "rel_err", "device", "reason"])
        for i, r in enumerate(evaluated, 1):
            facts = r["facts"] or {}
            rt = retimes.get(r["ck"], {})
            w.writerow([i, r["trial"], r["status"], _fmt(r["time_ms"]), _fmt(rt.get("retime_ms")),
                        *[r["config"].get(n) for n in fields], facts.get("registers", ""),
                        (facts.get("spill_store_bytes", 0) + facts.get("spill_load_bytes", 0)) if facts else "",
                        facts.get("static_smem_bytes", ""), _fmt(r["rel_err"]), r["device"], r["reason"]])
    # history.csv
    best = math.inf
    history = []
    for r in sorted((r for r in rows if r["finished"]), key=lambda r: r["trial"]):
        if r["status"] == "ok" and r["time_ms"] is not None:
            best = min(best, r["time_ms"])
        history.append((r["trial"], r["status"], r["time_ms"], None if best == math.inf else best))
    with open(d / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "time_ms", "best_so_far_ms"])
        for t, s, tm, b in history:
            w.writerow([t, s, _fmt(tm), _fmt(b)])
    plot_note = _plot_history(history, d / "history.png", f"{result.family} {result.key}")
    # leaderboard.md
    lines = [f"# Tuning report: {result.family}", "",
             f"- key: `{json.dumps(result.key)}`",
             f"- GPU: {result.gpu['name']} ({result.arch}, {result.gpu['sm_count']} SMs)",
             f"- study: `{result.study_name}`",
             f"- trials: {result.trials} ({', '.join(f'{k} {v}' for k, v in sorted(result.status_counts.items()))})",
             f"- stopped: {result.stopped_because or 'n/a'}",
             f"- winner: `{_label(result.winner)}` at {_fmt(result.time_ms)} ms"
             + (f" (default `{_label(result.default_config)}` {_fmt(result.default_time_ms)} ms, "
                f"speedup {result.speedup:.3f}x)" if result.speedup else ""),
             f"- stored: {result.store_path or 'not recorded'}", ""]
    lines += ["## Leaderboard", "", "| rank | trial | " + " | ".join(fields) + " | time ms | re-timed ms |",
              "|" + "---|" * (len(fields) + 4)]
    for i, r in enumerate([r for r in evaluated if r["status"] == "ok"][:20], 1):
        rt = retimes.get(r["ck"], {})
        lines.append(f"| {i} | {r['trial']} | " + " | ".join(str(r["config"].get(n)) for n in fields)
                     + f" | {_fmt(r['time_ms'])} | {_fmt(rt.get('retime_ms'))} |")
    failed = [r for r in evaluated if r["status"] != "ok"]
    if failed:
        lines += ["", "## Rejected and failed configs", "", "| trial | status | config | reason |", "|---|---|---|---|"]
        for r in failed[:40]:
            reason = str(r["reason"]).replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['trial']} | {r['status']} | `{_label(r['config'])}` | {reason} |")
    lines += ["", "## Search history", "", plot_note, ""]
    (d / "leaderboard.md").write_text("\n".join(lines))
    return d


def _label(config: dict[str, Any] | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (config or {}).items())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v)


def _plot_history(history: list[tuple], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("(history plot skipped: matplotlib is not installed; `pip install vidrial[plot]`. "
                "The data is in history.csv.)")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ok = [(t, tm) for t, s, tm, _ in history if s == "ok" and tm is not None]
    bad = [t for t, s, tm, _ in history if s != "ok"]
    if ok:
        ax.scatter([t for t, _ in ok], [tm for _, tm in ok], s=12, label="measured")
        best = [(t, b) for t, _, _, b in history if b is not None]
        ax.step([t for t, _ in best], [b for _, b in best], where="post", color="C3", label="best so far")
        top = max(tm for _, tm in ok)
        if bad:
            ax.scatter(bad, [top * 1.05] * len(bad), marker="x", color="0.5", s=12, label="rejected / failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("time (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![search history]({path.name})"


def write_summary(results: list[StudyResult], out_dir: Path) -> Path:
    lines = ["# vidrial tune: summary", "", "| family | key | GPU | trials | winner | time ms | default ms | speedup | report |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rel = os.path.relpath(r.report_dir, out_dir) if r.report_dir else ""
        lines.append(f"| {r.family} | `{json.dumps(r.key)}` | {r.gpu['name']} | {r.trials} | `{_label(r.winner)}` | "
                     f"{_fmt(r.time_ms)} | {_fmt(r.default_time_ms)} | "
                     f"{f'{r.speedup:.3f}x' if r.speedup else ''} | {rel}/leaderboard.md |")
    path = Path(out_dir) / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- measuring the tuner itself ----------------------------------------------------------------
class TableBackend:
    """Measurement backend that replays an exhaustive study's results (no GPU)."""

    def __init__(self, table: dict[str, dict[str, Any]], gpu: dict[str, Any], arch: str):
        self.table, self.gpu, self.arch = table, gpu, arch

    def hello(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "arch": self.arch}

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        ck = json.dumps(job["config"], sort_keys=True, separators=(",", ":"))
        return dict(self.table.get(ck, {"status": "error", "reason": "not in the exhaustive table"}))


def exhaustive_table(result_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """ck -> result, from the trial rows of an exhaustive (grid) study."""
    table = {}
    for r in result_rows:
        if r["finished"] and r["memo_of"] is None and r["ck"] and r["status"] != "invalid":
            res = {"status": r["status"], "reason": r["reason"]}
            if r["time_ms"] is not None:
                res["time_ms"] = r["time_ms"]
            table[r["ck"]] = res
    return table


def compare_samplers(family: Any, key: Any, space: SearchSpace, table: dict[str, dict[str, Any]], arch: str,
                     budgets: Sequence[int] = (10, 20, 40), samplers: Sequence[str] = ("tpe", "gp", "random"),
                     seeds: int = 5) -> list[dict[str, Any]]:
    """Replays each sampler against an exhaustive table: for each budget N, the mean ratio
    (best found after N trials) / (exhaustive best) and how often the optimum was found."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    oks = [v["time_ms"] for v in table.values() if v.get("status") == "ok"]
    if not oks:
        return []
    optimum = min(oks)
    rows = []
    gpu = {"name": "replay", "arch": arch, "sm_count": 1}
    for sampler_name in samplers:
        for n in budgets:
            ratios, hits = [], 0
            for seed in range(seeds):
                settings = TuneSettings(trials=n, sampler=sampler_name, seed=seed, isolate=False, progress=False,
                                        record=False, report=False, check=False)
                study = optuna.create_study(sampler=make_sampler(sampler_name, seed, n), direction="minimize")
                default_params = space.params_of(family.default_config(key))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if all(default_params[k] in space.fields[k] for k in space.fields):
                        study.enqueue_trial(default_params)
                loop = SearchLoop(family, key, space, study, settings, InProcessMeasurer(TableBackend(table, gpu, arch)),
                                  None, arch, n, None, n_valid=len(table))
                loop.run()
                found = loop.best if loop.best is not None else math.inf
                ratios.append(found / optimum)
                hits += found <= optimum * (1 + 1e-9)
            rows.append({"sampler": sampler_name, "trials": n, "mean_ratio": statistics.fmean(ratios),
                         "worst_ratio": max(ratios), "found_optimum": hits / seeds, "seeds": seeds,
                         "space_valid": len(table)})
    return rows


def write_comparison(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    lines = [f"# Tuner quality: {title}", "",
             "Best time found after N trials / exhaustive best (1.000 = optimum), replayed on the exhaustive "
             "study's measurements.", "",
             "| sampler | N trials | mean ratio | worst ratio | found the optimum | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['trials']} | {r['mean_ratio']:.3f} | {r['worst_ratio']:.3f} | "
                     f"{100 * r['found_optimum']:.0f}% | {r['seeds']} |")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the API ---------------------------------------------------------------------------------------
def _families(kernel: Any) -> list[Any]:
    from vidrial.kernels import families

    if kernel is None or kernel == "all":
        fams = list(families().values())
        if not fams:
            raise InputError("kernel", "all", "at least one registered kernel family (none are registered)")
        return fams
    if isinstance(kernel, (list, tuple)):
        return [f for k in kernel for f in _families(k)]
    return [resolve_family(kernel)]


def _missing_protocol(family: Any) -> list[str]:
    from vidrial.core.family import KernelFamily

    return [m for m in ("make_inputs", "run", "reference")
            if getattr(type(family), m, None) is getattr(KernelFamily, m)]


def _keys(family: Any, keys: Any, preset: str | None) -> list[Any]:
    if keys:
        out = []
        for k in keys:
            if isinstance(k, str):
                k = json.loads(k)
            out.append(k if isinstance(k, family.Key) else family.Key.model_validate(k))
        return out
    preset = preset or "standard"
    if preset not in PRESETS:
        raise InputError("preset", repr(preset), f"one of {', '.join(PRESETS)}")
    std = list(family.shape_keys() if preset == "shapes" else family.standard_keys())
    if not std:
        raise InputError("keys", f"none given and {family.name} has no standard keys",
                         f"explicit keys (JSON objects with fields {', '.join(family.Key.model_fields)})")
    return std[:1] if preset == "quick" else std


def tune(
    kernel: Any = "all",
    keys: Sequence[Any] | None = None,
    *,
    preset: str | None = "standard",
    trials: int = 40,
    timeout: float | None = None,
    sampler: str = "tpe",
    out: str | Path = "vidrial-tune",
    storage: str | None = None,
    resume: bool = False,
    gpus: Sequence[int] | None = None,
    compare: Sequence[int] | None = None,
    measurer: Any = None,
    compiler: Any = None,
    on_result: Callable[[StudyResult], None] | None = None,
    **options: Any,
) -> list[StudyResult]:
    """Tunes kernel families and records the winners in the tuned-config store.

    kernel: a family name, "all", a 'module:attr' reference or a KernelFamily (or a list).
    keys: problem keys (dicts, JSON strings or Key models); default: the preset
    ("shapes": the keys the standard shapes dispatch, family.shape_keys(); "standard": those and the
    other variants, family.standard_keys(); "quick": the first key).
    trials / timeout: per-study trial budget and wall-clock seconds. sampler: tpe (default),
    gp, random or grid (exhaustive over every valid config). out: output dir (reports; the
    default journal storage). storage: Optuna storage URL or journal file path. resume:
    continue existing studies (else they start over). gpus: device indices; one process
    per GPU works each study. compare: with sampler="grid", budgets N at which to compare
    TPE/GP/random replayed on the exhaustive results. on_result: called with each study's result as it
    ends. Other options: fields of TuneSettings
    (arch, seed, job_timeout_s, leaders, record, tuned_dir, progress, ...)."""
    if sampler not in SAMPLERS:
        raise InputError("sampler", repr(sampler), f"one of {', '.join(SAMPLERS)}")
    unknown = sorted(set(options) - set(TuneSettings.__dataclass_fields__))
    if unknown:
        raise InputError("options", ", ".join(unknown), f"fields of TuneSettings: {', '.join(TuneSettings.__dataclass_fields__)}")
    if isinstance(compiler, str):  # a 'module:attr' reference also reaches the per-GPU processes
        options["compiler"], compiler = compiler, None
    if isinstance(measurer, str):
        options["backend"], measurer = measurer, None
    settings = TuneSettings(trials=trials, timeout_s=timeout, sampler=sampler, out_dir=Path(out), storage=storage,
                            resume=resume, gpus=tuple(gpus) if gpus else (0,), **options)
    if settings.tuned_dir is not None:
        settings.tuned_dir = Path(settings.tuned_dir)
    check_settings(settings)
    from vidrial.dispatch.store import GpuIdentity

    results = []
    measured_on: tuple[GpuIdentity, str] | None = None  # (GPU, arch) of the first study: all run there
    for family in _families(kernel):
        try:
            space = load_search_space(family, settings.space_path)
        except SearchSpaceError as exc:
            if kernel not in (None, "all"):
                raise
            print(f"vidrial tune: skipping {family.name}: {exc}", file=sys.stderr)
            continue
        missing = _missing_protocol(family) if settings.backend == DEFAULT_BACKEND else []
        if missing:
            why = (f"{family.name} does not implement {', '.join(missing)} (the tuner protocol: "
                   "docs/HELPERS.md, 'Tuner protocol')")
            if kernel not in (None, "all"):
                raise InputError("kernel", family.name, "a family that implements make_inputs, run and reference; "
                                 + why)
            print(f"vidrial tune: skipping {why}", file=sys.stderr)
            continue
        for key in _keys(family, keys, preset):
            result = None
            if settings.skip_tuned and measured_on is not None:  # known GPU: skip without starting a worker
                gpu, arch = measured_on
                result = _already_tuned(family, key, gpu, arch, study_name(family, gpu.slug, key), settings)
            if result is None:
                result = tune_key(family, key, settings, measurer=measurer, compiler=compiler, space=space)
                measured_on = (GpuIdentity(**result.gpu), result.arch)
            results.append(result)
            if on_result is not None:  # as each study ends: a run cut short still reports what it finished
                on_result(result)
            if compare and sampler == "grid" and result.report_dir:
                import optuna

                study = optuna.load_study(study_name=result.study_name,
                                          storage=make_storage(settings.storage, settings.out_dir))
                rows = compare_samplers(family, key, space, exhaustive_table(_trial_rows(study)), result.arch,
                                        budgets=tuple(compare))
                write_comparison(rows, Path(result.report_dir) / "tuner_quality.md", f"{family.name} {key.label()}")
    if settings.report and results:
        write_summary(results, settings.out_dir)
    return results


__all__ = ["tune", "tune_key", "TuneSettings", "StudyResult", "SearchLoop", "PoolCompiler", "FunctionCompiler",
           "Progress", "make_storage", "check_storage", "check_settings", "make_sampler", "study_name", "pick_winner", "retime", "compare_samplers",
           "exhaustive_table", "write_report", "write_summary", "SAMPLERS", "PRESETS"]
