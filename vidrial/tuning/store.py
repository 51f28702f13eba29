"""The tuned-config store: one JSON file per (GPU model, kernel family).

Layout: `<root>/<gpu slug>/<family name>.json`, validated by `TunedFile`. Two roots are
read: the folder shipped with the package (`vidrial.core.paths.data_dir("tuned_configs")`)
and the user's folder (`$VIDRIAL_TUNED_DIR`, default `<user cache>/tuned_configs`), which
overrides the shipped one entry by entry. The tuner writes with `record()`.

Each entry carries what makes it trustworthy: the template hash (a changed template makes
the entry stale), the GPU identity, the toolchain versions, the tuned and the default
config's times and the number of trials. A file whose `schema_version` differs from
`SCHEMA_VERSION`, or an entry whose template hash differs from the family's, is ignored
by the dispatcher (one warning per file) and listed as stale by `vidrial show`.

Writes are safe with several tuning processes at once: `record()` takes a file lock
(`<family>.json.lock` next to the file), reads the file, merges the new entry, writes a
temp file in the same folder and `os.replace`s it over the old one, so readers see the
old or the new file, never a half-written one, and no writer loses another's entries.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from pydantic import BaseModel, ValidationError

from vidrial.core.config import FrozenModel, KernelConfig, ProblemKey
from vidrial.core.paths import data_dir, user_tuned_dir

if TYPE_CHECKING:
    from vidrial.core.family import KernelFamily

SCHEMA_VERSION: int = 1

LOCK_TIMEOUT_S = 120.0


class TunedConfigWarning(UserWarning):
    """A tuned-config file or entry was ignored (corrupt, stale or invalid)."""


def slugify(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (also accepts a slug and returns it unchanged)."""
    return re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")


class GpuIdentity(FrozenModel):
    """Which GPU a config was tuned on. Files are grouped by `slug` (the model name)."""

    name: str  # e.g. "NVIDIA H200"
    arch: str  # e.g. "sm_90"
    sm_count: int

    @property
    def slug(self) -> str:
        return _slug_of(self.name)

    @classmethod
    def current(cls, device_index: int | None = None) -> GpuIdentity:
        """The identity of CUDA device `device_index` (the current device when None)."""
        import torch

        from vidrial.core.errors import InputError

        if not torch.cuda.is_available():
            raise InputError("gpu", "no CUDA device present", "a CUDA GPU, or an explicit GpuIdentity / --gpu NAME")
        props = torch.cuda.get_device_properties(device_index)
        return cls(name=props.name, arch=_arch_name(props.major, props.minor), sm_count=props.multi_processor_count)


@cache
def _slug_of(name: str) -> str:
    return slugify(name)


def _arch_name(major: int, minor: int) -> str:
    from vidrial.core.arch import normalize_arch

    try:
        return normalize_arch(f"sm_{major}{minor}")
    except Exception:  # an arch vidrial has no limits for is still an identity
        return f"sm_{major}{minor}"


class Toolchain(FrozenModel):
    """Versions that produced a tuned entry (informational: they do not make it stale)."""

    vidrial: str | None = None
    nvrtc: str | None = None
    cupy: str | None = None
    torch: str | None = None
    driver: str | None = None

    @classmethod
    def current(cls) -> Toolchain:
        return _current_toolchain()


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


@cache
def _current_toolchain() -> Toolchain:
    import vidrial

    nvrtc = driver = None
    try:
        from vidrial.core.toolchain import nvrtc_version

        nvrtc = nvrtc_version()
    except Exception:
        pass
    try:
        from cupy_backends.cuda.api import runtime

        v = int(runtime.driverGetVersion())
        driver = f"{v // 1000}.{(v % 1000) // 10}" if v else None
    except Exception:
        pass
    return Toolchain(
        vidrial=vidrial.__version__,
        nvrtc=nvrtc,
        cupy=_dist_version("cupy-cuda13x", "cupy-cuda12x", "cupy"),
        torch=_dist_version("torch"),
        driver=driver,
    )


class TunedEntry(BaseModel):
    """One tuned winner: the config for one problem key on one GPU."""

    key: dict[str, Any]  # the family's ProblemKey, as JSON
    config: dict[str, Any]  # the family's KernelConfig, as JSON
    template_hash: str
    gpu: GpuIdentity
    toolchain: Toolchain
    time_ms: float
    default_time_ms: float | None
    trials: int
    tuned_at: str  # ISO-8601 UTC, e.g. "2026-11-28T11:30:00Z"

    @property
    def speedup(self) -> float | None:
        """Default config's time / tuned time (None when the default was not timed)."""
        if self.default_time_ms is None or self.time_ms <= 0:
            return None
        return self.default_time_ms / self.time_ms


class TunedFile(BaseModel):
    """A whole `<gpu slug>/<family>.json` file."""

    schema_version: int
    family: str
    gpu: str  # the GPU slug, same as the folder name
    entries: dict[str, TunedEntry]  # keyed by ProblemKey.key_string()


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def shipped_tuned_dir() -> Path | None:
    """The tuned_configs folder shipped with vidrial (None if the install lacks it)."""
    try:
        return data_dir("tuned_configs")
    except FileNotFoundError:
        return None


def file_path(root: Path, gpu_slug: str, family_name: str) -> Path:
    return Path(root) / gpu_slug / f"{family_name}.json"


def load_file(path: Path) -> TunedFile | None:
    """Reads one tuned file. A missing, unreadable or corrupt file gives one warning
    (TunedConfigWarning) and None; it never raises.

    A readable file with another `schema_version` whose entries do not validate under
    this version's models is returned with no entries (the caller sees the version and
    treats it as stale)."""
    got = _read_file(Path(path))
    if isinstance(got, str):
        _warn(f"tuned configs {path}: {got}; file skipped")
        return None
    return got


def _read_file(path: Path) -> TunedFile | str:
    """The tuned file at `path`, or why it cannot be read (the reason load_file warns with)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"cannot read ({exc})"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(raw, dict):
        return f"expected a JSON object, got {type(raw).__name__}"
    try:
        return TunedFile.model_validate(raw)
    except ValidationError as exc:
        version = raw.get("schema_version")
        if isinstance(version, int) and version != SCHEMA_VERSION:
            return TunedFile(schema_version=version, family=str(raw.get("family", "")),
                             gpu=str(raw.get("gpu", "")), entries={})
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return (f"does not match the schema ({exc.error_count()} errors, first at "
                f"{where or '<root>'}: {first.get('msg')})")


def _warn(message: str) -> None:
    warnings.warn(message, TunedConfigWarning, stacklevel=3)


def _as_model(model: type[BaseModel], value: Any) -> Any:
    if isinstance(value, model):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return model.model_validate(value)


def record(
    family: KernelFamily,
    key: ProblemKey | dict,
    config: KernelConfig | dict,
    *,
    gpu: GpuIdentity,
    time_ms: float,
    default_time_ms: float | None,
    trials: int,
    directory: Path | None = None,
    toolchain: Toolchain | None = None,
) -> Path:
    """Stores a tuned winner in `<directory or user_tuned_dir()>/<gpu.slug>/<family.name>.json`
    and returns the file's path.

    Read-modify-write under a file lock, then an atomic replace: entries for other keys
    (written by this or any other process) are kept. For the same key the new entry
    replaces the existing one when it is faster, or when the existing one was tuned
    against another template hash (stale), or on another GPU (name/arch/SM count);
    otherwise the faster existing entry is kept. A corrupt file, or one with another
    schema version, is moved aside to `<name>.json.bad-<unix time>` and a new file is
    started. `toolchain` defaults to this process's `Toolchain.current()` (a tuner whose
    timing ran in a worker process may pass the worker's)."""
    key = _as_model(family.Key, key)
    config = _as_model(family.Config, config)
    root = Path(directory) if directory is not None else user_tuned_dir()
    path = file_path(root, gpu.slug, family.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = TunedEntry(
        key=key.model_dump(mode="json"),
        config=config.model_dump(mode="json"),
        template_hash=family.template_hash,
        gpu=gpu,
        toolchain=toolchain if toolchain is not None else Toolchain.current(),
        time_ms=float(time_ms),
        default_time_ms=None if default_time_ms is None else float(default_time_ms),
        trials=int(trials),
        tuned_at=now_utc(),
    )
    key_string = key.key_string()

    def keep_better(entries: dict[str, TunedEntry]) -> None:
        old = entries.get(key_string)
        if old is None or _replaces(entry, old):
            entries[key_string] = entry

    _update_file(path, family.name, gpu.slug, keep_better, unreadable="move aside")
    return path


def _update_file(path: Path, family_name: str, gpu_slug: str, update, *, unreadable: str) -> None:
    """Read-modify-write of one tuned file under its lock, then an atomic replace: `update(entries)` edits
    the dict of the file's entries in place. A corrupt file or one of another schema version is moved
    aside (unreadable="move aside", a new file is started) or refused with ValueError ("raise")."""
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        entries: dict[str, TunedEntry] = {}
        if path.exists():
            existing = load_file(path)
            if existing is not None and existing.schema_version == SCHEMA_VERSION:
                entries = dict(existing.entries)
            elif unreadable == "raise":
                raise ValueError(f"tuned configs {path}: unreadable or schema version differs; not merged into")
            else:
                aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
                os.replace(path, aside)
                _warn(f"tuned configs {path}: unreadable or schema version differs; moved to {aside.name}")
        update(entries)
        tuned = TunedFile(schema_version=SCHEMA_VERSION, family=family_name, gpu=gpu_slug,
                          entries=dict(sorted(entries.items())))
        write_atomic(path, tuned.model_dump_json(indent=2) + "\n")


def _replaces(new: TunedEntry, old: TunedEntry) -> bool:
    return old.template_hash != new.template_hash or old.gpu != new.gpu or new.time_ms < old.time_ms


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temp file in `path`'s folder, fsyncs it and renames it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def tuned_files(root: Path | None) -> list[Path]:
    """Every `<gpu>/<family>.json` under `root` (sorted; empty when root is None or missing)."""
    if root is None or not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("*/*.json") if p.is_file())


def merge(source: Path, destination: Path) -> dict[str, int]:
    """Copies every entry of the tuned files under `source` (a tuning run's store) into the files of the
    same `<gpu>/<family>.json` under `destination` (e.g. the shipped tuned_configs/), each under that
    file's lock with an atomic replace; entries of keys `source` does not hold are kept.

    Unlike `record`, the source entry replaces the destination's for the same key even when the older
    one is faster: a tuning run that is being shipped is the newer measurement of that key (an older
    time may come from another measurement setup, e.g. a smaller problem in the same bucket).
    Returns counts {"added", "replaced", "files"}."""
    from vidrial.core.errors import InputError
    from vidrial.core.paths import check_folder_argument

    check_folder_argument("destination", destination)
    counts = {"added": 0, "replaced": 0, "files": 0}
    plan: list[tuple[TunedFile, Path]] = []
    for src in tuned_files(Path(source)):
        tuned = load_file(src)
        if tuned is None or tuned.schema_version != SCHEMA_VERSION or not tuned.entries:
            continue
        dst = Path(destination) / src.parent.name / src.name
        # every destination file is checked before the first is written: a bad one merges nothing
        existing = _read_file(dst) if dst.exists() else None
        if isinstance(existing, TunedFile) and existing.schema_version != SCHEMA_VERSION:
            existing = f"schema version {existing.schema_version}, this vidrial writes {SCHEMA_VERSION}"
        if isinstance(existing, str):
            raise InputError("destination", f"{dst} ({existing})",
                             "tuned files that can be merged into (fix or move this one aside, then ship again)")
        plan.append((tuned, dst))
    for tuned, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)

        def take_all(entries: dict[str, TunedEntry], new: dict[str, TunedEntry] = tuned.entries) -> None:
            for key_string, entry in new.items():
                counts["replaced" if key_string in entries else "added"] += 1
                entries[key_string] = entry

        _update_file(dst, tuned.family, tuned.gpu, take_all, unreadable="raise")
        counts["files"] += 1
    return counts
