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

Modules: settings (TuneSettings, argument checks), records (typed trial records), study
(storage, sampler, naming), loop (SearchLoop), compile_pool, finish (re-timing, the winner,
the store), report; this one is the API (tune, tune_key) and the warm start.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vidrial.core.errors import InputError
from vidrial.dispatch.store import GpuIdentity
from vidrial.tuning.compile_pool import FunctionCompiler, PoolCompiler, make_compiler
from vidrial.tuning.finish import already_tuned, finish, is_valid, pick_winner, retime
from vidrial.tuning.liveness import StudyLeases, describe, die_with_parent, exit_on_sigterm
from vidrial.tuning.loop import Progress, SearchLoop
from vidrial.tuning.records import UNCOUNTED, StudyResult
from vidrial.tuning.report import compare_samplers, exhaustive_table, write_comparison, write_report, write_summary
from vidrial.tuning.search_space import SearchSpace, SearchSpaceError, load_search_space
from vidrial.tuning.settings import (
    PRESETS,
    SAMPLERS,
    TuneSettings,
    check_settings,
    check_storage,
    journal_path,
    require_tuner,
)
from vidrial.tuning.study import (
    ATTR,
    canonical,
    fail_stale_trials,
    make_sampler,
    make_storage,
    study_leases,
    study_name,
    trial_attrs,
    trial_rows,
)
from vidrial.tuning.worker import DEFAULT_BACKEND, InProcessMeasurer, MeasurementWorker, family_ref, resolve_family


def make_measurer(settings: TuneSettings, device_index: int) -> Any:
    if settings.isolate:
        return MeasurementWorker(settings.backend, device_index, settings.job_timeout_s, settings.startup_timeout_s)
    return InProcessMeasurer(settings.backend, device_index)


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


def _params_in_space(space: SearchSpace, key: Any, config: Any, arch: str) -> dict[str, Any] | None:
    """`config`'s searched values when the search space can suggest exactly `config` (None: it cannot)."""
    params = space.params_of(config)
    if not all(params[n] in space.fields[n] for n in space.fields):
        return None
    made, _ = space.make_config(key, params, arch)
    return params if made is not None and canonical(made) == canonical(config) else None


def previous_winners(family: Any, key: Any, gpu_slug: str, settings: TuneSettings) -> list[Any]:
    """Warm start: the configs recorded for exactly `key` on this GPU model, in the tuned dir being written,
    then the user's, then the shipped one, even where their template hash is stale (a template change
    rarely moves the optimum far), as long as they still validate against the family's Config."""
    from vidrial.core.paths import user_tuned_dir
    from vidrial.dispatch.store import recorded_entries, shipped_tuned_dir

    out, seen = [], set()
    roots = [settings.tuned_dir, user_tuned_dir(), shipped_tuned_dir()]
    for _, entry in recorded_entries(family.name, key.key_string(), gpu_slug, roots):
        try:
            config = family.Config.model_validate(entry.config)
        except ValidationError:
            continue
        if canonical(config) not in seen:
            seen.add(canonical(config))
            out.append(config)
    return out


def tune_key(family: Any, key: Any, settings: TuneSettings, *, measurer: Any = None, compiler: Any = None,
             space: SearchSpace | None = None) -> StudyResult:
    """Tunes `family` for one problem `key`; see the module docstring."""
    require_tuner(settings.sampler)
    import optuna

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
            skipped = already_tuned(family, key, gpu, arch, name, settings)
            if skipped is not None:
                return skipped
        leases = study_leases(settings.storage, out_dir, name)
        with leases.guard():  # no other process starts or joins the study meanwhile
            live = leases.live()
            if live and not settings.resume:  # deleting it would pull the study from under them
                where = journal_path(settings.storage, out_dir) or settings.storage
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
        default = family.default_config_for(key, arch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # measured first: the default config (the speedup's baseline), then the previous winners
            previous = previous_winners(family, key, gpu.slug, settings) if settings.warm_start else []
            for config in [default, *previous]:
                params = _params_in_space(space, key, config, arch)
                if params is not None:
                    study.enqueue_trial(params, skip_if_exists=True)
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
        return finish(family, key, space, study, settings, measurer, gpu, arch, name, loop, stopped,
                      default if is_valid(space, key, default, arch) else None)
    finally:
        compiler.close()
        if own_measurer:
            measurer.close()
        if leases is not None:
            leases.release()


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


def _from_keys_file(kernel: Any, path: str | Path) -> list[tuple[Any, list[Any]]]:
    """(family, keys) per family of a keys file (vidrial.tuning.record's output), in file order. Names resolve
    among the registered families and those `kernel` names ('module:attr' too); with an explicit `kernel`
    only its families are taken, and each must be in the file."""
    from vidrial.dispatch.record import load_keys
    from vidrial.kernels import families as registered

    explicit = kernel not in (None, "all")
    named = {f.name: f for f in _families(kernel)} if explicit else {}
    plan = load_keys(path, {**registered(), **named})
    if explicit:
        missing = sorted(set(named) - set(plan))
        if missing:
            raise InputError("kernel", ", ".join(missing), f"families with keys in keys file {path} "
                             f"(it has {', '.join(plan) or 'none'}); leave --kernel out to tune all of them")
        plan = {name: keys for name, keys in plan.items() if name in named}
    if not plan:
        raise InputError("keys_file", f"keys file {path} with no keys", "at least one recorded key "
                         "(record them with vidrial.tuning.record(path))")
    fams = {**registered(), **named}
    return [(fams[name], keys) for name, keys in plan.items()]


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
    keys_file: str | Path | None = None,
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
    ends. keys_file: a JSON file {family: [keys]} (what vidrial.tuning.record writes): exactly its keys
    are tuned, for its families (with `kernel` other than "all": those families only); not with `keys`.
    Other options: fields of TuneSettings
    (arch, seed, job_timeout_s, leaders, record, tuned_dir, progress, ...)."""
    if sampler not in SAMPLERS:
        raise InputError("sampler", repr(sampler), f"one of {', '.join(SAMPLERS)}")
    require_tuner(sampler, bool(compare))  # before anything is created: the light install has no Optuna
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
    if keys_file is not None and keys:
        raise InputError("keys", f"both keys and keys_file {keys_file}", "one source of problem keys")
    if keys_file is not None:
        work = _from_keys_file(kernel, keys_file)
    else:
        work = [(family, None) for family in _families(kernel)]
    explicit = kernel not in (None, "all") or keys_file is not None  # named families: problems are errors
    results = []
    measured_on: tuple[GpuIdentity, str] | None = None  # (GPU, arch) of the first study: all run there
    for family, file_keys in work:
        try:
            space = load_search_space(family, settings.space_path)
        except SearchSpaceError as exc:
            if explicit:
                raise
            print(f"vidrial tune: skipping {family.name}: {exc}", file=sys.stderr)
            continue
        missing = _missing_protocol(family) if settings.backend == DEFAULT_BACKEND else []
        if missing:
            why = (f"{family.name} does not implement {', '.join(missing)} (the tuner protocol: "
                   "docs/HELPERS.md, 'Tuner protocol')")
            if explicit:
                raise InputError("kernel", family.name, "a family that implements make_inputs, run and reference; "
                                 + why)
            print(f"vidrial tune: skipping {why}", file=sys.stderr)
            continue
        for key in (file_keys if file_keys is not None else _keys(family, keys, preset)):
            result = None
            if settings.skip_tuned and measured_on is not None:  # known GPU: skip without starting a worker
                gpu, arch = measured_on
                result = already_tuned(family, key, gpu, arch, study_name(family, gpu.slug, key), settings)
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
                rows = compare_samplers(family, key, space, exhaustive_table(trial_rows(study)), result.arch,
                                        budgets=tuple(compare))
                write_comparison(rows, Path(result.report_dir) / "tuner_quality.md", f"{family.name} {key.label()}")
    if settings.report and results:
        write_summary(results, settings.out_dir)
    return results


# the API, and the names that were here before the tuner was split by concern (issue 14)
__all__ = ["tune", "tune_key", "previous_winners", "TuneSettings", "StudyResult", "SearchLoop", "PoolCompiler",
           "FunctionCompiler", "Progress", "make_storage", "check_storage", "check_settings", "make_sampler",
           "study_name", "pick_winner", "retime", "compare_samplers", "exhaustive_table", "write_report",
           "write_summary", "SAMPLERS", "PRESETS", "UNCOUNTED", "canonical", "trial_attrs", "trial_rows"]
