"""The search loop: asks, evaluates and tells the trials of one study (see vidrial.tuning.tuner
for a trial's life), with a progress bar."""
from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

from vidrial.tuning.liveness import OWNER_ATTR, StudyLeases
from vidrial.tuning.records import Measurement, MemoHit, TrialRecord
from vidrial.tuning.search_space import SearchSpace
from vidrial.tuning.settings import TuneSettings
from vidrial.tuning.study import ATTR, canonical, fail_stale_trials, has_set_constraint, trial_record
from vidrial.tuning.worker import family_ref


def measure_job(fam_ref: str, key: Any, config: Any, arch: str, settings: TuneSettings, check: bool) -> dict[str, Any]:
    """The worker protocol's job for one measurement of `config` (JSON: it crosses a pipe)."""
    return {"family": fam_ref, "key": key.model_dump(mode="json"), "config": config.model_dump(mode="json"),
            "arch": arch, "check": check, "seed": settings.input_seed, "timing": settings.timing()}


class Progress:
    """The tuner's progress bar: tqdm on stderr (trials, rate, ETA, best time so far). enabled: True / False, or
    None for a bar only when stderr is a terminal (logs and captured output stay clean)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool | None = True):
        self.total, self.n, self.desc = total, initial, desc
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.best: float | None = None
        self._bar: Any = None

    def set(self, n: int, best: float | None = None) -> None:
        if best is not None:
            self.best = best
        if self.enabled and self._bar is None:
            from tqdm import tqdm

            # made at the first count: a resumed study's done trials are tqdm's `initial`, out of the rate and ETA
            self._bar = tqdm(total=self.total, initial=n, desc=self.desc, unit="trial", dynamic_ncols=True,
                             file=sys.stderr)
        elif self._bar is not None and n > self.n:
            self._bar.update(n - self.n)
        if self._bar is not None and self.best is not None:
            self._bar.set_postfix_str(f"best {self.best:.4g} ms", refresh=False)
        self.n = n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


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
        self.memo: dict[str, MemoHit] = {}
        self.counted = 0
        self.best: float | None = None
        self.max_ok: float | None = None
        self.stopped_because = ""
        self._fam_ref = family_ref(family)
        self._use_set_constraint = has_set_constraint()
        self._open: dict[int, Any] = {}  # asked, not yet told

    # -- state from storage --
    def sync(self) -> None:
        from optuna.trial import TrialState

        counted = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            a = trial_record(t)
            if not a.counted:
                if a.status == "invalid" and a.ck is not None:
                    self.memo.setdefault(a.ck, MemoHit(t.number, Measurement("invalid", reason=a.reason)))
                continue
            counted += 1
            if a.memo_of is None and a.ck is not None and t.state == TrialState.COMPLETE:
                self.memo.setdefault(a.ck, MemoHit(t.number, Measurement(a.status, a.time_ms, a.reason)))
            if a.status == "ok" and a.time_ms is not None:
                self._saw_ok(a.time_ms)
        self.counted = counted

    def _saw_ok(self, time_ms: float) -> None:
        self.best = time_ms if self.best is None else min(self.best, time_ms)
        self.max_ok = time_ms if self.max_ok is None else max(self.max_ok, time_ms)

    # -- telling --
    def _tell(self, trial: Any, config: Any, ck: str | None, result: Measurement,
              memo_of: int | None = None) -> None:
        record = TrialRecord.of(result, self.device_label, ck,
                                None if config is None else config.model_dump(mode="json"), memo_of)
        trial.set_user_attr(ATTR, record.to_attrs())  # one storage write (journal appends are locked + synced)
        if self._use_set_constraint:
            trial.set_constraint("feasible", record.constraint)
        # a failed config is told a time worse than every measured one, so samplers move away from it
        value = result.time_ms if result.ok else (2.0 * self.max_ok if self.max_ok else 1000.0)
        self.study.tell(trial, value)
        self._open.pop(trial.number, None)
        if result.ok:
            self._saw_ok(value)
        if ck is not None and memo_of is None:
            self.memo[ck] = MemoHit(trial.number, Measurement(result.status, record.time_ms, record.reason))
        if record.counted:
            self.counted += 1
            if self.progress is not None:
                self.progress.set(self.counted, self.best)

    def _fail(self, trial: Any, status: str = "interrupted") -> None:
        from optuna.trial import TrialState

        try:
            trial.set_user_attr(ATTR, TrialRecord(status=status).to_attrs())
            self.study.tell(trial, state=TrialState.FAIL)
        except Exception:
            pass
        self._open.pop(trial.number, None)

    # -- evaluation --
    def _evaluate(self, p: _Pending) -> Measurement:
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
                return Measurement("compile_error", reason=f"{type(compiled).__name__}: {compiled}"[:2000])
            facts = compiled.facts.model_dump()
            try:
                reason = self.family.infeasible_reason(self.key, p.config, compiled)
            except Exception as exc:
                return Measurement("error", reason=f"infeasible_reason failed: {type(exc).__name__}: {exc}",
                                   facts=facts)
            if reason:
                return Measurement("infeasible", reason=reason, facts=facts)
        else:
            facts = None
        result = Measurement.from_dict(self.measurer.measure(
            measure_job(self._fam_ref, self.key, p.config, self.arch, self.settings, self.settings.check)))
        return result if result.facts is not None or facts is None else replace(result, facts=facts)

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
            1 for t in trials if t.state != TrialState.RUNNING and trial_record(t).counted)

    def _stop_reason(self) -> str | None:
        """Why not to ask another trial (None: ask). Under the guard, so the count stays true."""
        if self._used() >= self.budget:
            return "trial budget reached"
        if self.deadline is not None and time.time() >= self.deadline:
            return "time budget reached"
        if self.n_valid is not None and sum(1 for m in self.memo.values() if m.result.status != "invalid") >= self.n_valid:
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
                            self._tell(trial, None, None, Measurement("invalid", reason=why))
                            invalid_streak += 1
                            if invalid_streak > 2000:
                                self.stopped_because = "the sampler keeps suggesting invalid configs"
                                break
                            continue
                    invalid_streak = 0
                    ck = canonical(config)
                    memo = self.memo.get(ck)
                    if memo is not None:
                        self._tell(trial, config, ck, memo.result, memo_of=memo.trial)
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
                memo = self.memo.get(p.ck)
                if memo is not None:
                    self._tell(p.trial, p.config, p.ck, memo.result, memo_of=memo.trial)
                    continue
                self._tell(p.trial, p.config, p.ck, self._evaluate(p))
        except BaseException:
            for trial in list(self._open.values()):  # asked but not told: fail them, so a resume re-asks
                self._fail(trial)
            raise
        return self.stopped_because


__all__ = ["SearchLoop", "Progress", "measure_job"]
