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


# Student t quantiles t_{0.975, df} for df = 1..30 (above: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval95(rounds: list[float]) -> tuple[float, float] | None:
    """The 95% interval of the mean of the round times (Student t; the rounds are interleaved, so drift of
    the GPU spreads over all candidates instead of biasing one); None with fewer than two rounds."""
    n = len(rounds)
    if n < 2:
        return None
    mean = statistics.fmean(rounds)
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(rounds) / n**0.5
    return (mean - half, mean + half)


def _narrow(out: dict[str, Retimed], rel: float) -> bool:
    """The current winner's (lowest median) interval is within `rel` of its time."""
    timed = [v for v in out.values() if v.status is None and v.rounds]
    if not timed:
        return True
    best = min(timed, key=lambda v: statistics.median(v.rounds))
    iv = interval95(best.rounds)
    return iv is not None and (iv[1] - iv[0]) / 2 <= rel * statistics.median(best.rounds)


def retime(family: Any, key: Any, space: SearchSpace, measurer: Any, arch: str, settings: TuneSettings,
           candidates: list[Any], first_use: set[str]) -> dict[str, Retimed]:
    """Re-times `candidates` in interleaved rounds (order rotated each round, so drift spreads over all of
    them): `settings.retime_rounds` at least, then more up to `settings.retime_max_rounds` until the
    current winner's 95% interval is within `settings.interval_rel` of its time. Returns ck -> Retimed (the
    median of the round medians and the interval, or the status of the round that failed)."""
    fam_ref = family_ref(family)
    out = {canonical(c): Retimed() for c in candidates}
    least = max(1, settings.retime_rounds)
    for r in range(max(least, settings.retime_max_rounds)):
        alive = [c for c in candidates if out[canonical(c)].status is None]
        if not alive or (r >= least and _narrow(out, settings.interval_rel)):
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
            v.interval_ms = interval95(v.rounds)
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
    win_rt = retimed.get(canonical(winner)) if winner is not None else None
    interval = win_rt.interval_ms if win_rt is not None else None
    tied_with = []  # leaders the re-timing cannot tell from the winner: their 95% intervals overlap
    if interval is not None:
        for c in candidates:
            rt = retimed.get(canonical(c))
            if canonical(c) != canonical(winner) and rt is not None and rt.interval_ms is not None \
                    and rt.interval_ms[0] <= interval[1] and interval[0] <= rt.interval_ms[1]:
                tied_with.append(c.model_dump(mode="json"))
    leaderboard = []
    for r in ranked:
        rt = retimed.get(r.ck, Retimed())
        leaderboard.append(LeaderboardRow(r, rt.time_ms, rt.status))
    result = StudyResult(
        family=family.name, key=key.model_dump(mode="json"), study_name=name, gpu=gpu.model_dump(), arch=arch,
        winner=winner.model_dump(mode="json") if winner is not None else None, time_ms=win_time,
        default_config=default.model_dump(mode="json") if default is not None else None,
        default_time_ms=default_time, trials=counted, status_counts=dict(counts), leaderboard=leaderboard,
        stopped_because=stopped, interval_ms=interval,
        retime_rounds=max((len(v.rounds) for v in retimed.values()), default=0), tied_with=tied_with)
    if winner is not None and settings.record:
        from vidrial.dispatch.store import record

        path = record(family, key, winner, gpu=gpu, time_ms=win_time, default_time_ms=default_time, trials=counted,
                      directory=settings.tuned_dir, interval_ms=interval, tied_with=len(tied_with))
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
