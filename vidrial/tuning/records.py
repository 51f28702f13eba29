"""Typed records of the tuner: what one evaluation measured, what a trial holds in the study
storage, the rows a finished study is read back as, and a study's result.

Across process boundaries (the measurement worker's pipe, Optuna's user attributes) these stay
JSON dicts with the same keys as always, so journals written by an older vidrial still resume;
they become records at the boundary (`Measurement.from_dict`, `TrialRecord.from_attrs`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# a measurement's status: ok, or why the config lost (vidrial.tuning.worker describes each); the tuner adds
# invalid (constraints / check()), infeasible (compiled facts), compile_error and interrupted (never measured)
FAILED_STATUSES = ("wrong", "invalid", "error", "fault", "timeout", "crash", "compile_error", "infeasible")
UNCOUNTED = ("invalid", "interrupted")  # statuses that do not count against the trial budget
REASON_CHARS = 500  # a reason stored on a trial is cut here (tracebacks are long)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Measurement:
    """The outcome of evaluating one config: the worker's answer, or the tuner's own verdict
    before anything ran (compile_error, infeasible, invalid, a memoised repeat)."""

    status: str
    time_ms: float | None = None  # the median, for status ok
    reason: str = ""
    rel_err: float | None = None  # against the reference (first use only)
    facts: dict[str, Any] | None = None  # compiled facts, CompileFacts.model_dump()
    timing: dict[str, Any] | None = None  # Timing.as_dict()
    fatal: bool = False  # the CUDA context died with it (the worker restarts)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.time_ms is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        """From the worker protocol's dict (a missing status is an error)."""
        return cls(status=str(d.get("status") or "error"), time_ms=_float(d.get("time_ms")),
                   reason=str(d.get("reason") or ""), rel_err=_float(d.get("rel_err")), facts=d.get("facts") or None,
                   timing=d.get("timing") or None, fatal=bool(d.get("fatal")))


@dataclass(frozen=True)
class TrialRecord:
    """What the tuner records on a trial (one Optuna user attribute, vidrial.tuning.study.ATTR)."""

    status: str | None = None
    device: str | None = None
    ck: str | None = None  # canonical config JSON
    config: dict[str, Any] | None = None
    time_ms: float | None = None
    reason: str = ""
    rel_err: float | None = None
    facts: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    memo_of: int | None = None  # trial number of the measurement reused
    constraint: float | None = None  # 0 feasible, 1 violated (the samplers' constraint)

    @classmethod
    def of(cls, result: Measurement, device: str, ck: str | None, config: dict[str, Any] | None,
           memo_of: int | None = None) -> TrialRecord:
        return cls(status=result.status, device=device, ck=ck, config=config,
                   time_ms=result.time_ms if result.ok else None, reason=result.reason[:REASON_CHARS],
                   rel_err=result.rel_err, facts=result.facts, timing=result.timing, memo_of=memo_of,
                   constraint=0.0 if result.ok else 1.0)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None) -> TrialRecord:
        a = attrs or {}
        return cls(status=a.get("status"), device=a.get("device"), ck=a.get("ck"), config=a.get("config"),
                   time_ms=_float(a.get("time_ms")), reason=a.get("reason", ""), rel_err=_float(a.get("rel_err")),
                   facts=a.get("facts"), timing=a.get("timing"), memo_of=a.get("memo_of"),
                   constraint=_float(a.get("constraint")))

    def to_attrs(self) -> dict[str, Any]:
        """The stored JSON: fields that say something, under the keys journals have always used."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    @property
    def counted(self) -> bool:
        """Whether the trial counts against the trial budget."""
        return self.status is not None and self.status not in UNCOUNTED


@dataclass(frozen=True)
class MemoHit:
    """A config already evaluated in this study: reported again without measuring."""

    trial: int  # the trial that measured it
    result: Measurement


@dataclass(frozen=True)
class TrialRow:
    """One trial of a study as read back from storage (reports, finishing, tests)."""

    trial: int
    state: str  # Optuna's TrialState name
    status: str
    time_ms: float | None
    config: dict[str, Any] | None
    ck: str | None
    reason: str
    memo_of: int | None
    device: str | None
    facts: dict[str, Any] | None
    rel_err: float | None
    finished: bool  # COMPLETE or FAIL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Retimed:
    """A leader's re-timing: the median of its round medians and the 95% interval of its time, or why it failed."""

    rounds: list[float] = field(default_factory=list)
    time_ms: float | None = None
    status: str | None = None  # set when a round failed (then no time)
    reason: str = ""
    interval_ms: tuple[float, float] | None = None  # 95% interval of the mean of the rounds (>= 2 rounds)


@dataclass(frozen=True)
class LeaderboardRow:
    """A distinct measured config, best study time first, with its re-timing when it was a leader."""

    row: TrialRow
    retime_ms: float | None = None
    retime_status: str | None = None


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
    leaderboard: list[LeaderboardRow] = field(default_factory=list)
    store_path: str | None = None
    report_dir: str | None = None
    stopped_because: str = ""
    interval_ms: tuple[float, float] | None = None  # the winner's 95% interval from its re-timing rounds
    retime_rounds: int = 0  # rounds the leaders were re-timed in
    tied_with: list[dict[str, Any]] = field(default_factory=list)  # leaders whose interval overlaps the winner's

    @property
    def speedup(self) -> float | None:
        if self.time_ms and self.default_time_ms:
            return self.default_time_ms / self.time_ms
        return None


__all__ = ["Measurement", "TrialRecord", "MemoHit", "TrialRow", "Retimed", "LeaderboardRow", "StudyResult",
           "FAILED_STATUSES", "UNCOUNTED"]
