"""Reports: a study's leaderboard and search history (<out>/<family>/<gpu>/<key>/), the run's
summary (<out>/report.md), and the tuner's own quality: samplers replayed on an exhaustive study."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidrial.tuning.loop import SearchLoop
from vidrial.tuning.records import StudyResult, TrialRow
from vidrial.tuning.search_space import SearchSpace
from vidrial.tuning.settings import TuneSettings
from vidrial.tuning.study import make_sampler, slug
from vidrial.tuning.worker import InProcessMeasurer


def write_report(result: StudyResult, rows: list[TrialRow], space: SearchSpace, out_dir: Path,
                 study: Any = None) -> Path:
    """<out>/<family>/<gpu>/<key>/: leaderboard.md, leaderboard.csv, history.csv, and with the Optuna study
    (and matplotlib) Optuna's own plots: history.png (optimization history) and importance.png (parameter
    importances, fANOVA) when the study has enough finished trials."""
    from vidrial.dispatch.store import slugify

    d = Path(out_dir) / result.family / slugify(result.gpu["name"]) / slug(",".join(
        f"{k}={v}" for k, v in result.key.items()))
    d.mkdir(parents=True, exist_ok=True)
    fields = list(space.fields)
    # leaderboard.csv: every evaluated config (memo repeats left out)
    evaluated = [r for r in rows if r.finished and r.memo_of is None and r.config is not None]
    retimes = {r.row.ck: r.retime_ms for r in result.leaderboard}
    evaluated.sort(key=lambda r: (r.status != "ok", r.time_ms if r.time_ms is not None else math.inf, r.trial))
    with open(d / "leaderboard.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "status", "time_ms", "retime_ms", *fields, "registers", "spill_bytes",
                    "static_smem", "rel_err", "device", "reason"])
        for i, r in enumerate(evaluated, 1):
            facts = r.facts or {}
            w.writerow([i, r.trial, r.status, _fmt(r.time_ms), _fmt(retimes.get(r.ck)),
                        *[r.config.get(n) for n in fields], facts.get("registers", ""),
                        (facts.get("spill_store_bytes", 0) + facts.get("spill_load_bytes", 0)) if facts else "",
                        facts.get("static_smem_bytes", ""), _fmt(r.rel_err), r.device, r.reason])
    # history.csv
    best = math.inf
    history = []
    for r in sorted((r for r in rows if r.finished), key=lambda r: r.trial):
        if r.status == "ok" and r.time_ms is not None:
            best = min(best, r.time_ms)
        history.append((r.trial, r.status, r.time_ms, None if best == math.inf else best))
    with open(d / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "time_ms", "best_so_far_ms"])
        for t, s, tm, b in history:
            w.writerow([t, s, _fmt(tm), _fmt(b)])
    plot_note = _optuna_plots(study, d, f"{result.family} {result.key}")
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
             f"- re-timing: {result.retime_rounds} interleaved rounds; winner's 95% interval "
             + (f"{_fmt(result.interval_ms[0])} .. {_fmt(result.interval_ms[1])} ms" if result.interval_ms
                else "n/a (fewer than two rounds)")
             + (f"; a tie with {len(result.tied_with)} leader(s) (overlapping intervals, broken by search-space "
                f"order): " + ", ".join(f"`{_label(c)}`" for c in result.tied_with) if result.tied_with else ""),
             f"- stored: {result.store_path or 'not recorded'}", ""]
    lines += ["## Leaderboard", "", "| rank | trial | " + " | ".join(fields) + " | time ms | re-timed ms |",
              "|" + "---|" * (len(fields) + 4)]
    for i, r in enumerate([r for r in evaluated if r.status == "ok"][:20], 1):
        lines.append(f"| {i} | {r.trial} | " + " | ".join(str(r.config.get(n)) for n in fields)
                     + f" | {_fmt(r.time_ms)} | {_fmt(retimes.get(r.ck))} |")
    failed = [r for r in evaluated if r.status != "ok"]
    if failed:
        lines += ["", "## Rejected and failed configs", "", "| trial | status | config | reason |", "|---|---|---|---|"]
        for r in failed[:40]:
            reason = str(r.reason).replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r.trial} | {r.status} | `{_label(r.config)}` | {reason} |")
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


def _optuna_plots(study: Any, d: Path, title: str) -> str:
    """optuna.visualization.matplotlib's optimization history and parameter importances of the study (the
    importances need two completed trials with different times and a parameter that varied)."""
    if study is None:
        return "(no plots: the study was not given; the data is in history.csv)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return ("(plots skipped: matplotlib is not installed; `pip install vidrial[plot]`. "
                "The data is in history.csv.)")
    import optuna

    notes = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    plots = [("history.png", "search history", ovm.plot_optimization_history)]
    varied = {n for t in complete for n in t.params if len({str(u.params.get(n)) for u in complete}) > 1}
    if len({t.value for t in complete}) > 1 and varied:
        plots.append(("importance.png", "parameter importance", ovm.plot_param_importances))
    for name, what, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on its matplotlib plots
                ax = plot(study)
            ax.set_title(f"{what}: {title}", fontsize=9)
            ax.figure.set_size_inches(8, 4.5)
            ax.figure.tight_layout()
            ax.figure.savefig(d / name, dpi=110)
            plt.close(ax.figure)
            notes.append(f"![{what}]({name})")
        except Exception as exc:  # a plot must never fail a study
            notes.append(f"({what} plot skipped: {type(exc).__name__}: {exc})")
    return "\n\n".join(notes)


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


# ---- measuring the tuner itself: samplers replayed on an exhaustive study -----------------------
class TableBackend:
    """Measurement backend that replays an exhaustive study's results (no GPU)."""

    def __init__(self, table: dict[str, dict[str, Any]], gpu: dict[str, Any], arch: str):
        self.table, self.gpu, self.arch = table, gpu, arch

    def hello(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "arch": self.arch}

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        ck = json.dumps(job["config"], sort_keys=True, separators=(",", ":"))
        return dict(self.table.get(ck, {"status": "error", "reason": "not in the exhaustive table"}))


def exhaustive_table(result_rows: list[TrialRow]) -> dict[str, dict[str, Any]]:
    """ck -> result (the worker protocol's dict, which TableBackend replays), from the trial rows of an
    exhaustive (grid) study."""
    table = {}
    for r in result_rows:
        if r.finished and r.memo_of is None and r.ck and r.status != "invalid":
            res: dict[str, Any] = {"status": r.status, "reason": r.reason}
            if r.time_ms is not None:
                res["time_ms"] = r.time_ms
            table[r.ck] = res
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
                replay = InProcessMeasurer(TableBackend(table, gpu, arch))
                loop = SearchLoop(family, key, space, study, settings, replay, None, arch, n, None, n_valid=len(table))
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


__all__ = ["write_report", "write_summary", "compare_samplers", "exhaustive_table", "write_comparison",
           "TableBackend"]
