"""The tuned-config store: one JSON file per (GPU model, kernel family).

Layout: `<root>/<gpu slug>/<family name>.json`, validated by `TunedFile`. Two roots are
read: the folder shipped with the package (`vidrial.core.paths.data_dir("tuned_configs")`)
and the user's folder (`$VIDRIAL_TUNED_DIR`, default `<user cache>/tuned_configs`), which
overrides the shipped one entry by entry. The tuner writes with `record()`.

Each entry carries what makes it trustworthy: the template hash (a changed template makes
the entry stale), the GPU identity, the toolchain versions, the tuned and the default
config's times and the number of trials. A file whose `schema_version` differs from
`SCHEMA_VERSION`, or an entry whose template hash differs from the family's, is ignored
by the dispatcher (one warning per file) and listed as stale by `vidrial show`. Entries are
validated one by one: an entry that does not match the schema costs that entry only.

Writes are safe with several tuning processes at once: `record()` takes a file lock
(`<family>.json.lock` next to the file), reads the file, merges the new entry, writes a
temp file in the same folder and `os.replace`s it over the old one, so readers see the
old or the new file, never a half-written one, and no writer loses another's entries.
Files are created like `open()` creates them (mode 0666 & ~umask), so a shared or shipped
folder stays readable by others. Nothing is dropped silently: a file that cannot be used
is moved aside, and a file with some invalid entries is copied aside before its valid
entries are rewritten (`<name>.json.bad-<unix time>-<pid>-<n>`, never overwriting one).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from filelock import FileLock
from pydantic import BaseModel, FiniteFloat, ValidationError

from vidrial.core.config import FrozenModel, KernelConfig, ProblemKey
from vidrial.core.errors import InputError
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
    time_ms: FiniteFloat  # JSON has no inf/NaN (pydantic would write null, and the entry would not load)
    default_time_ms: FiniteFloat | None
    trials: int
    tuned_at: str  # ISO-8601 UTC, e.g. "2026-11-28T11:30:00Z"
    # the winner's 95% interval from the tuner's interleaved re-timing rounds, and how many leaders it could
    # not be told from (their intervals overlap: a tie, broken by search-space order); absent in older entries
    time_interval_ms: tuple[FiniteFloat, FiniteFloat] | None = None
    tied_with: int = 0

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
    """The tuned_configs folder shipped with vidrial (None if the install lacks it, or it cannot be
    read: a warning then, never an exception)."""
    try:
        return data_dir("tuned_configs")
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn(f"tuned configs: cannot read the shipped folder ({exc}); shipped configs skipped")
        return None


def file_path(root: Path, gpu_slug: str, family_name: str) -> Path:
    return Path(root) / gpu_slug / f"{family_name}.json"


class _Envelope(BaseModel):
    """A tuned file's outer fields; its entries are validated one by one, so that one bad entry costs
    only itself."""

    schema_version: int
    family: str
    gpu: str
    entries: dict[str, Any]


@dataclass(frozen=True)
class ReadResult:
    """What `read_file` found in one tuned file."""

    path: Path
    tuned: TunedFile | None  # its valid entries; None: nothing is usable (unreadable, not JSON, not the schema)
    reason: str | None = None  # why the file (tuned None) or some of its entries (`invalid`) were left out
    invalid: dict[str, str] = field(default_factory=dict)  # key string -> why that entry does not validate
    data: bytes | None = None  # the file's bytes as read (to keep a copy before rewriting it)

    @property
    def problem(self) -> str | None:
        return None if self.reason is None else f"tuned configs {self.path}: {self.reason}"

    @property
    def message(self) -> str | None:
        """The problem with what was done about it, for a warning."""
        if self.problem is None:
            return None
        return self.problem + ("; file skipped" if self.tuned is None else "; those entries skipped")


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where or '<root>'}: {first.get('msg')}"


def _cannot_read(path: Path, exc: OSError) -> ReadResult:
    return ReadResult(Path(path), None, f"cannot read ({exc})")


def read_file(path: Path, *, missing_ok: bool = False) -> ReadResult | None:
    """Reads and validates one tuned file, entry by entry; never raises and never warns (callers say
    what they do about `reason`). None only when `missing_ok` and there is no such file.

    A file of another `schema_version` keeps its envelope and the entries that validate under this
    version's models, with no reason given: the caller sees the version and treats it as stale."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        return None if missing_ok else _cannot_read(path, exc)
    except OSError as exc:  # e.g. PermissionError: an unreadable folder or file
        return _cannot_read(path, exc)

    def unusable(reason: str) -> ReadResult:
        return ReadResult(path, None, reason, data=data)

    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return unusable(f"not UTF-8 text ({exc})")
    except json.JSONDecodeError as exc:
        return unusable(f"not valid JSON ({exc})")
    if not isinstance(raw, dict):
        return unusable(f"expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    other_version = isinstance(version, int) and version != SCHEMA_VERSION
    try:
        envelope = _Envelope.model_validate(raw)
    except ValidationError as exc:
        if not other_version:
            return unusable(f"does not match the schema ({exc.error_count()} errors, first at {_first_error(exc)})")
        envelope = _Envelope(schema_version=version, family=str(raw.get("family", "")),
                             gpu=str(raw.get("gpu", "")), entries={})
    entries: dict[str, TunedEntry] = {}
    invalid: dict[str, str] = {}
    for key_string, value in envelope.entries.items():
        try:
            entries[key_string] = TunedEntry.model_validate(value)
        except ValidationError as exc:
            invalid[key_string] = _first_error(exc)
    tuned = TunedFile(schema_version=envelope.schema_version, family=envelope.family, gpu=envelope.gpu,
                      entries=entries)
    reason = None
    if invalid and not other_version:  # another version is stale as a whole: its entries need no reason
        first = next(iter(invalid))
        reason = (f"{len(invalid)} of {len(envelope.entries)} entries do not match the schema "
                  f"(first, {first}: {invalid[first]})")
    return ReadResult(path, tuned, reason, invalid, data)


def recorded_entries(family_name: str, key_string: str, gpu_slug: str,
                     roots: list[Path | None]) -> list[tuple[Path, TunedEntry]]:
    """The entries recorded for `key_string` of `family_name` on `gpu_slug` in each of `roots` (None: skipped), in
    that order, whatever their template hash or schema version: the tuner starts from them (warm start), where
    dispatch would ignore stale ones. Never raises and never warns (dispatch warns about bad files)."""
    out = []
    for root in roots:
        if root is None:
            continue
        found = read_file(file_path(root, gpu_slug, family_name), missing_ok=True)
        if found is None or found.tuned is None or found.tuned.family != family_name:
            continue
        entry = found.tuned.entries.get(key_string)
        if entry is not None:
            out.append((found.path, entry))
    return out


def load_file(path: Path) -> TunedFile | None:
    """Reads one tuned file: its valid entries, or None when nothing in it is usable (missing, unreadable or
    corrupt file). Whatever is left out gives one warning (TunedConfigWarning); it never raises.

    A readable file with another `schema_version` keeps only the entries that validate under this
    version's models (the caller sees the version and treats it as stale)."""
    found = read_file(path)
    if found.message is not None:
        _warn(found.message)
    return found.tuned


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
    interval_ms: tuple[float, float] | None = None,
    tied_with: int = 0,
) -> Path:
    """Stores a tuned winner in `<directory or user_tuned_dir()>/<gpu.slug>/<family.name>.json`
    and returns the file's path.

    Read-modify-write under a file lock, then an atomic replace: entries for other keys
    (written by this or any other process) are kept. For the same key the new entry
    replaces the existing one when it is faster, or when the existing one was tuned
    against another template hash (stale), or on another GPU (name/arch/SM count);
    otherwise the faster existing entry is kept. A corrupt file, or one with another
    schema version, is moved aside to `<name>.json.bad-<unix time>-<pid>-<n>` and a new
    file is started; a file with some invalid entries is copied there and rewritten with
    its valid ones. `time_ms` and `default_time_ms` must be finite and >= 0 (InputError
    otherwise). `interval_ms`: the winner's 95% interval; `tied_with`: leaders it ties with. `toolchain` defaults to this process's `Toolchain.current()` (a tuner whose
    timing ran in a worker process may pass the worker's)."""
    time_ms = _time_ms("time_ms", time_ms)
    default_time_ms = None if default_time_ms is None else _time_ms("default_time_ms", default_time_ms, optional=True)
    key = _as_model(family.Key, key)
    config = _as_model(family.Config, config)
    root = Path(directory) if directory is not None else user_tuned_dir()
    path = file_path(root, gpu.slug, family.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = TunedEntry(
        key=key.model_dump(mode="json"),
        config=config.model_dump(mode="json"),
        template_hash=family.template_hash_for(config),
        gpu=gpu,
        toolchain=toolchain if toolchain is not None else Toolchain.current(),
        time_ms=time_ms,
        default_time_ms=default_time_ms,
        trials=int(trials),
        tuned_at=now_utc(),
        time_interval_ms=None if interval_ms is None else (float(interval_ms[0]), float(interval_ms[1])),
        tied_with=int(tied_with),
    )
    key_string = key.key_string()

    def keep_better(entries: dict[str, TunedEntry]) -> None:
        old = entries.get(key_string)
        if old is None or _replaces(entry, old, family):
            entries[key_string] = entry

    _update_file(path, family.name, gpu.slug, keep_better, unreadable="move aside")
    return path


def _time_ms(argument: str, value: Any, *, optional: bool = False) -> float:
    """`value` as a float, or InputError: JSON cannot hold inf/NaN (the entry would be written as null and
    then fail to load), and a negative time is no measurement."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise InputError(argument, value, "a finite time in ms >= 0" + (", or None (not timed)" if optional else ""))
    return number


Unreadable = Literal["move aside", "raise"]

_ASIDE_COUNT = itertools.count()


def _aside_path(path: Path) -> Path:
    """A free `<name>.bad-<unix time>-<pid>-<n>` next to `path`: the pid and counter keep two backups made in
    the same second apart; callers hold the file's lock, so no other writer takes the name meanwhile."""
    while True:
        aside = path.with_name(f"{path.name}.bad-{int(time.time())}-{os.getpid()}-{next(_ASIDE_COUNT)}")
        if not os.path.lexists(aside):
            return aside


def _label_mismatch(path: Path, tuned: TunedFile) -> tuple[str, str] | None:
    """(what the file says, what its path says) when the family or GPU in `tuned` contradicts its path
    `<gpu slug>/<family>.json` (file fields, then each entry's GPU); None when they agree."""
    path = Path(path)
    if tuned.family != path.stem:
        return f"family {tuned.family!r}", f"family {path.stem!r} (the file name)"
    folder = path.parent.name
    path_says = f"gpu {folder!r} (the folder)"
    if tuned.gpu != folder:
        return f"gpu {tuned.gpu!r}", path_says
    for key_string, entry in tuned.entries.items():
        if entry.gpu.slug != folder:
            return f"entry {key_string} tuned on {entry.gpu.name!r} (slug {entry.gpu.slug!r})", path_says
    return None


def _require_labels(path: Path, tuned: TunedFile) -> None:
    mismatch = _label_mismatch(path, tuned)
    if mismatch is not None:
        said, path_says = mismatch
        raise InputError(f"tuned file {path}", said, f"{path_says}: a file's content must match its path "
                                                     "<gpu slug>/<family>.json (fix the file or move it)")


def _update_file(path: Path, family_name: str, gpu_slug: str, update: Callable[[dict[str, TunedEntry]], None], *,
                 unreadable: Unreadable) -> None:
    """Read-modify-write of one tuned file under its lock, then an atomic replace: `update(entries)` edits
    the dict of the file's valid entries in place.

    unreadable="move aside" (record): a corrupt file or one of another schema version is moved aside and a new
    file is started; a file with some invalid entries is copied aside first, its valid entries are kept.
    unreadable="raise" (merge into shipped configs): any of these, or a file whose content contradicts its
    path, is refused with InputError and left as it is."""
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        entries: dict[str, TunedEntry] = {}
        found = read_file(path, missing_ok=True)
        if found is not None:
            tuned = found.tuned
            if tuned is not None and tuned.schema_version != SCHEMA_VERSION:
                found = ReadResult(path, None, f"schema version {tuned.schema_version} (this vidrial writes "
                                               f"{SCHEMA_VERSION})", data=found.data)
                tuned = None
            if unreadable == "raise":
                if found.reason is not None:
                    raise InputError(f"destination {path}", found.reason, "a valid tuned file (not merged into; "
                                     "fix the file or move it aside)")
                _require_labels(path, tuned)
            if tuned is None:
                aside = _aside_path(path)
                os.replace(path, aside)
                _warn(f"{found.problem}; moved to {aside.name}, a new file started")
            else:
                entries = dict(tuned.entries)
                if found.invalid:
                    aside = _aside_path(path)
                    write_atomic(aside, found.data)  # a copy: readers keep seeing the file until it is replaced
                    _warn(f"{found.problem}; the file as it was is kept as {aside.name}, its valid entries stay")
        update(entries)
        tuned = TunedFile(schema_version=SCHEMA_VERSION, family=family_name, gpu=gpu_slug,
                          entries=dict(sorted(entries.items())))
        write_atomic(path, tuned.model_dump_json(indent=2) + "\n")


def _replaces(new: TunedEntry, old: TunedEntry, family: KernelFamily) -> bool:
    """The new entry wins when it is faster, when the old one is stale (its own implementation's template
    changed since, or its config no longer validates) or was measured on another GPU. An entry of another
    implementation (another template) is not stale: the faster one stays."""
    try:
        stale = old.template_hash != family.template_hash_for(family.Config.model_validate(old.config))
    except (ValidationError, ValueError):
        stale = True
    return stale or old.gpu != new.gpu or new.time_ms < old.time_ms


def write_atomic(path: Path, data: str | bytes) -> None:
    """Writes `data` (str: as UTF-8) to a temp file in `path`'s folder, fsyncs it and renames it over `path`.
    The file gets mode 0666 & ~umask, as open() would create it (mkstemp's 0600 would hide a shared or
    shipped folder's files from everyone else)."""
    path = Path(path)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _new_temp(path: Path) -> tuple[int, Path]:
    """Creates `.<name>.<random>.tmp` next to `path` (O_EXCL, like mkstemp, but mode 0666: the kernel applies
    the umask) and returns (its fd, its path)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name next to {path}")


def tuned_files(root: Path | None) -> list[Path]:
    """Every `<gpu>/<family>.json` under `root` (sorted; empty when root is None or missing). A folder or file
    that cannot be read is left out with one warning naming it and the error; it never raises."""
    if root is None:
        return []
    root = Path(root)
    try:
        if not root.is_dir():
            return []
        candidates = list(root.glob("*/*.json"))
    except OSError as exc:
        _warn(f"tuned configs {root}: cannot read ({exc}); folder skipped")
        return []
    found = []
    for path in candidates:
        try:
            if path.is_file():
                found.append(path)
        except OSError as exc:
            _warn(_cannot_read(path, exc).message)
    return sorted(found)


def merge(source: Path, destination: Path) -> dict[str, int]:
    """Copies every entry of the tuned files under `source` (a tuning run's store) into the files of the
    same `<gpu>/<family>.json` under `destination` (e.g. the shipped tuned_configs/), each under that
    file's lock with an atomic replace; entries of keys `source` does not hold are kept.

    Unlike `record`, the source entry replaces the destination's for the same key even when the older
    one is faster: a tuning run that is being shipped is the newer measurement of that key (an older
    time may come from another measurement setup, e.g. a smaller problem in the same bucket).

    A file (source or destination) whose family or GPU contradicts its path is refused with InputError:
    the path decides where an entry is looked up, so a mislabelled file would ship entries that are
    never used. Every source file, and every destination file it goes into, is checked before anything
    is written: a bad one merges nothing. Returns counts {"added", "replaced", "files"}."""
    from vidrial.core.errors import InputError
    from vidrial.core.paths import check_folder_argument

    check_folder_argument("destination", destination)
    counts = {"added": 0, "replaced": 0, "files": 0}
    sources: list[tuple[Path, TunedFile]] = []
    for src in tuned_files(Path(source)):
        tuned = load_file(src)
        if tuned is None or tuned.schema_version != SCHEMA_VERSION or not tuned.entries:
            continue
        _require_labels(src, tuned)
        sources.append((src, tuned))
    for src, _ in sources:
        dst = Path(destination) / src.parent.name / src.name
        found = read_file(dst, missing_ok=True)
        if found is None:
            continue
        problem = found.reason
        if problem is None and found.tuned is not None and found.tuned.schema_version != SCHEMA_VERSION:
            problem = f"schema version {found.tuned.schema_version}, this vidrial writes {SCHEMA_VERSION}"
        if problem is not None:
            raise InputError("destination", f"{dst} ({problem})",
                             "tuned files that can be merged into (fix or move this one aside, then ship again)")
    for src, tuned in sources:
        dst = Path(destination) / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)

        def take_all(entries: dict[str, TunedEntry], new: dict[str, TunedEntry] = tuned.entries) -> None:
            for key_string, entry in new.items():
                counts["replaced" if key_string in entries else "added"] += 1
                entries[key_string] = entry

        _update_file(dst, src.stem, src.parent.name, take_all, unreadable="raise")
        counts["files"] += 1
    return counts
