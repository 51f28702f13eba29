"""One study in Optuna storage: its name, its storage (a journal file by default), its sampler,
the record the tuner keeps on each trial, and failing the trials that dead processes left RUNNING."""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidrial.core.errors import InputError
from vidrial.tuning.liveness import OWNER_ATTR, StudyLeases
from vidrial.tuning.records import TrialRecord, TrialRow
from vidrial.tuning.settings import SAMPLERS, journal_path


ATTR = "vidrial"  # the one user attribute per trial (and per study) that holds what the tuner records


def trial_attrs(trial: Any) -> dict[str, Any]:
    """What the tuner recorded on a trial, as stored (the fields of TrialRecord)."""
    return trial.user_attrs.get(ATTR) or {}


def trial_record(trial: Any) -> TrialRecord:
    return TrialRecord.from_attrs(trial.user_attrs.get(ATTR))


def canonical(config: Any) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", text).strip("_") or "key"


def study_name(family: Any, gpu_slug: str, key: Any) -> str:
    return f"{family.name}|{gpu_slug}|{key.key_string()}|{family.template_hash}"


def make_storage(url: str | None, out_dir: Path) -> Any:
    """An Optuna storage: a journal file by default (a path or 'journal:PATH'; repaired when a
    killed process tore it, vidrial.tuning.journal), else any Optuna storage URL
    (sqlite:///..., postgresql://...)."""
    from vidrial.tuning.journal import open_journal

    path = journal_path(url, out_dir)
    if path is None:
        return url
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_journal(path)


def study_leases(url: str | None, out_dir: Path, name: str) -> StudyLeases:
    """The leases of study `name` (vidrial.tuning.liveness): next to the journal file, or in
    the output dir for a storage URL."""
    path = journal_path(url, out_dir)
    return StudyLeases(path.with_name(path.name + ".leases") if path is not None else Path(out_dir) / "leases", name)


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
        study._storage.set_trial_user_attr(t._trial_id, ATTR, TrialRecord(status="interrupted", reason=note).to_attrs())
        study.tell(t.number, state=TrialState.FAIL)
    if stale:
        print(f"vidrial tune: study {study.study_name}: failed {len(stale)} trial(s) left RUNNING by a process that "
              f"died (trials {', '.join(str(t.number) for t in stale)}); they are asked for again",
              file=sys.stderr, flush=True)
    return [t.number for t in stale]


def has_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints_from_attrs(trial: Any) -> Sequence[float]:
    return (trial_record(trial).constraint or 0.0,)


def make_sampler(name: str, seed: int, budget: int) -> Any:
    import optuna

    name = name.lower()
    if name not in SAMPLERS:
        raise InputError("sampler", repr(name), f"one of {', '.join(SAMPLERS)}")
    cf = {} if has_set_constraint() else {"constraints_func": _constraints_from_attrs}
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


def trial_rows(study: Any) -> list[TrialRow]:
    """Every trial of `study`, in trial order."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = trial_record(t)
        rows.append(TrialRow(trial=t.number, state=t.state.name, status=a.status or t.state.name.lower(),
                             time_ms=a.time_ms, config=a.config, ck=a.ck, reason=a.reason, memo_of=a.memo_of,
                             device=a.device, facts=a.facts, rel_err=a.rel_err,
                             finished=t.state in (TrialState.COMPLETE, TrialState.FAIL)))
    return rows


__all__ = ["ATTR", "trial_attrs", "trial_record", "trial_rows", "canonical", "slug", "study_name", "make_storage",
           "study_leases", "fail_stale_trials", "make_sampler", "has_set_constraint"]
