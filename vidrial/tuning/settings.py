"""The tuner's settings, and the checks of what a person gets wrong, run before any study, worker
or storage exists."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidrial.core.errors import InputError
from vidrial.tuning.worker import DEFAULT_BACKEND

SAMPLERS = ("tpe", "gp", "grid", "random")
PRESETS = ("shapes", "standard", "quick")


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
    retime_rounds: int = 3  # at least this many interleaved rounds of the leaders and the default
    retime_max_rounds: int = 12  # ... and more, up to this many, until the winner's 95% interval is narrow
    interval_rel: float = 0.01  # the winner's 95% interval half-width, relative to its time, to stop at
    tie_rel: float = 0.005
    check: bool = True
    input_seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_repeats: int = 5
    max_repeats: int = 200
    record: bool = True
    tuned_dir: Path | None = None
    warm_start: bool = True  # enqueue the key's previous winners (stale template hash too) after the default
    skip_tuned: bool = False  # keys with an exact entry (shipped, user dir or tuned_dir) for this GPU are skipped
    progress: bool | None = None  # the tqdm bar; None: only when stderr is a terminal
    report: bool = True
    space_path: str | None = None

    def timing(self) -> dict[str, Any]:
        return {"warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms, "min_repeats": self.min_repeats,
                "max_repeats": self.max_repeats}

    def ahead(self) -> int:
        if self.compile_ahead is not None:
            return max(1, self.compile_ahead)
        return max(2, min(8, os.cpu_count() or 2))


def journal_path(url: str | None, out_dir: Path) -> Path | None:
    """The journal file that storage `url` names (None: a storage URL)."""
    if url is None:
        return Path(out_dir) / "journal.log"
    if url.startswith("journal:"):
        return Path(url[len("journal:"):])
    return Path(url) if "://" not in url else None


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
    journal = journal_path(url, out_dir)
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


def require_tuner(sampler: str = "tpe", compare: bool = False) -> None:
    """MissingExtraError (pip install "vidrial[tune]") unless the tuner's dependencies are installed: the light
    install runs kernels without Optuna; scipy is needed only by the GP sampler (also replayed by --compare)."""
    from vidrial.core.errors import require_extra

    require_extra("tune", ("optuna",), "the tuner (vidrial tune)")
    if sampler == "gp":
        require_extra("tune", ("scipy",), "--sampler gp")
    if compare:
        require_extra("tune", ("scipy",), "--compare (it replays the GP sampler)")


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


__all__ = ["TuneSettings", "check_settings", "require_tuner", "check_storage", "journal_path", "SAMPLERS", "PRESETS",
           "STORAGE_RULE"]
