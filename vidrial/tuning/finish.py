"""Finishing a study: re-time the leaders and the default config in interleaved rounds, pick
the winner deterministically, record it in the tuned-config store and write the report."""
from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from vidrial.tuning.loop import SearchLoop, measure_job
from vidrial.tuning.records import UNCOUNTED, LeaderboardRow, Measurement, Retimed, StudyResult, TrialRow
from vidrial.tuning.report import write_report
from vidrial.tuning.search_space import SearchSpace
from vidrial.tuning.settings import TuneSettings
from vidrial.tuning.study import canonical, trial_rows
from vidrial.tuning.worker import family_ref


def retime(family: Any, key: Any, space: SearchSpace, measurer: Any, arch: str, settings: TuneSettings,
           candidates: list[Any], first_use: set[str]) -> dict[str, Retimed]:
    """Re-times `candidates` in `settings.retime_rounds` interleaved rounds (order rotated
    each round, so drift spreads over all of them); returns ck -> Retimed (the median of the
    round medians, or the status of the round that failed)."""
    fam_ref = family_ref(family)
    out = {canonical(c): Retimed() for c in candidates}
    for r in range(max(1, settings.retime_rounds)):
        alive = [c for c in candidates if out[canonical(c)].status is None]
        if not alive:
            break
        shift = r % len(alive)
        for config in alive[shift:] + alive[:shift]:
            ck = canonical(config)
            check = settings.check and ck in first_use  # each config is checked once, on its first run
            res = Measurement.from_dict(measurer.measure(measure_job(fam_ref, key, config, arch, settings, check)))
            first_use.discard(ck)
            if res.status != "ok":
                out[ck] = Retimed(status=res.status, reason=res.reason)
            else:
                out[ck].rounds.append(float(res.time_ms))
    for v in out.values():
        if v.rounds:
            v.time_ms = float(statistics.median(v.rounds))
    return out


def _order_key(space: SearchSpace, config: Any) -> tuple:
    """Search-space order of a config's searched values (earlier choices first)."""
    dumped = config.model_dump(mode="json")
    out = []
    for name, choices in space.fields.items():
        v = dumped.get(name)
        out.append(choices.index(v) if v in choices else len(choices))
    return tuple(out)


def pick_winner(space: SearchSpace, timed: list[tuple[Any, float]], tie_rel: float) -> Any:
    """The fastest config; configs within `tie_rel` of the fastest tie, and the tie goes to the
    one first in search-space order (then canonical JSON): deterministic for equal inputs."""
    if not timed:
        return None
    best = min(t for _, t in timed)
    tied = [c for c, t in timed if t <= best * (1.0 + tie_rel)]
    return min(tied, key=lambda c: (_order_key(space, c), canonical(c)))


def is_valid(space: SearchSpace, key: Any, config: Any, arch: str) -> bool:
    try:
        space.family.check(key, config, arch)
        return True
    except Exception:
        return False


def _measured(finished: list[TrialRow]) -> list[TrialRow]:
    """Distinct measured configs (their best study time), best first."""
    best: dict[str, TrialRow] = {}
    for r in finished:
        if r.status == "ok" and r.memo_of is None and r.ck:
            prev = best.get(r.ck)
            if prev is None or r.time_ms < prev.time_ms:
                best[r.ck] = r
    return sorted(best.values(), key=lambda r: (r.time_ms, r.trial))


def finish(family: Any, key: Any, space: SearchSpace, study: Any, settings: TuneSettings, measurer: Any,
           gpu: Any, arch: str, name: str, loop: SearchLoop, stopped: str, default: Any) -> StudyResult:
    rows = trial_rows(study)
    finished = [r for r in rows if r.finished]
    counts = Counter(r.status for r in finished if r.memo_of is None)
    counted = sum(1 for r in finished if r.status not in UNCOUNTED)
    ranked = _measured(finished)
    measured = {r.ck for r in ranked}
    leaders = [family.Config.model_validate(r.config) for r in ranked[: max(1, settings.leaders)]]
    candidates = list(leaders)
    first_use: set[str] = set()
    if default is not None:
        dck = canonical(default)
        if dck not in {canonical(c) for c in candidates}:
            candidates.append(default)
        if dck not in measured:
            first_use.add(dck)
    retimed = retime(family, key, space, measurer, arch, settings, candidates, first_use) if candidates else {}
    timed = [(c, retimed[canonical(c)].time_ms) for c in leaders
             if canonical(c) in retimed and retimed[canonical(c)].time_ms is not None]
    if not timed:  # re-timing failed for every leader: fall back to the study's times
        timed = [(family.Config.model_validate(r.config), r.time_ms) for r in ranked[: settings.leaders]]
    winner = pick_winner(space, timed, settings.tie_rel)
    # the default config may itself be the fastest
    default_time = retimed[canonical(default)].time_ms if default is not None and canonical(default) in retimed \
        else None
    if winner is not None and default is not None and default_time is not None:
        wt = dict((canonical(c), t) for c, t in timed)[canonical(winner)]
        if default_time < wt / (1.0 + settings.tie_rel):
            winner = default
            timed.append((default, default_time))
    win_time = dict((canonical(c), t) for c, t in timed).get(canonical(winner)) if winner is not None else None
    leaderboard = []
    for r in ranked:
        rt = retimed.get(r.ck, Retimed())
        leaderboard.append(LeaderboardRow(r, rt.time_ms, rt.status))
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
        result.report_dir = str(write_report(result, rows, space, Path(settings.out_dir), study=study))
    return result


def already_tuned(family: Any, key: Any, gpu: Any, arch: str, name: str, settings: TuneSettings) -> StudyResult | None:
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


__all__ = ["retime", "pick_winner", "finish", "already_tuned", "is_valid"]
