"""Dispatch: which config a kernel call uses, from the tuned-config store.

For a family, a problem key and a GPU, `select_config` returns, in this order:

1. exact: the tuned config stored for this very key;
2. nearest: a config tuned for a compatible key, i.e. one with the same compile-time
   constants (`key.compile_part()`), at the smallest distance over the runtime fields
   (`key.runtime_part()`): the sum of |log2(a / b)| over numeric fields plus 1 per
   differing non-numeric field; ties go to the smaller `key_string()`;
3. default: `family.default_config_for(key, arch)` (the family's default implementation on that arch).

A GPU model with no tuned file of the family at all (shipped or user folder) borrows the entries of the
nearest tuned GPU of the same arch (nearest SM count; an H100 uses the H200's, both sm_90; never another
arch's) and goes through the same three steps over them; the result says so (`Dispatch.borrowed_from`,
`Dispatch.label`: "exact (nvidia-h200, same arch)"). The first such dispatch warns once per GPU model and
process (`UntunedGpuWarning`), naming the commands that tune it. The decision is per family: a family
tuned on this GPU (e.g. from `vidrial tune --keys`) uses its own file, the others keep borrowing.

A tuned config is used only if `family.check(key, config, gpu.arch)` accepts it for the
key at hand (else the next candidate, finally the default). For the exact key the user's
entry is tried first and, when check rejects it, the shipped entry for the same key, then
nearest, then default; a rejected exact entry gives one warning per key. A call never fails
because of the store: unreadable or corrupt files are skipped with one warning, entries that
do not validate or are stale (template hash or schema version differ) are ignored with one
warning per file, and every other entry of such a file is still used.

Cost: the index of a (family, GPU model) is built once per process from the shipped
folder and then the user folder (whose entries override shipped ones key by key); every
resolved key is memoised, so a repeated call is two dict lookups (see
benchmarks/bench_dispatch.py). `reload()` drops everything (tests, after tuning).
`last_dispatch()` tells what the most recent call chose; with VIDRIAL_DEBUG_DISPATCH=1
(read at import and by `reload()`) every call whose choice differs from the previous
one also writes it to `<user cache>/last_dispatch.json`, so `vidrial show --last` in
another process can read it (debugging only: that write is a file replace).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.paths import user_cache_dir, user_tuned_dir
import vidrial.dispatch.store as store  # the module (tests patch it), not the package: no import cycle
from vidrial.dispatch.store import SCHEMA_VERSION, GpuIdentity, TunedConfigWarning, TunedEntry

if TYPE_CHECKING:
    from vidrial.core.family import KernelFamily

Source = Literal["exact", "nearest", "default"]
Origin = Literal["shipped", "user"]


@dataclass(frozen=True)
class Dispatch:
    """What one call chose (returned by `last_dispatch()`)."""

    family: str
    key: ProblemKey
    config: KernelConfig
    source: Source
    path: Path | None  # the tuned file the config came from (None for the default)
    gpu: str | None  # GPU slug
    tuned_key: ProblemKey | None = None  # the key the config was tuned for (nearest: a neighbour)
    note: str | None = None  # why tuned entries for this very key were passed over (family.check)
    # the slug of the GPU whose entries were used when this GPU has none for the family (same arch only)
    borrowed_from: str | None = None

    @property
    def label(self) -> str:
        """`source`, and whose entries it came from when borrowed: "exact (nvidia-h200, same arch)"."""
        return self.source if self.borrowed_from is None else f"{self.source} ({self.borrowed_from}, same arch)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "key": self.key.model_dump(mode="json"),
            "config": self.config.model_dump(mode="json"),
            "source": self.source,
            "path": None if self.path is None else str(self.path),
            "gpu": self.gpu,
            "tuned_key": None if self.tuned_key is None else self.tuned_key.model_dump(mode="json"),
            "note": self.note,
            "borrowed_from": self.borrowed_from,
            "label": self.label,
        }


@dataclass(frozen=True)
class Candidate:
    """A usable tuned entry, parsed into the family's models."""

    key: ProblemKey
    config: KernelConfig
    entry: TunedEntry
    path: Path
    origin: Origin
    key_string: str
    coords: tuple[Any, ...]  # runtime fields: log2 of numeric ones, raw value of others


@dataclass(frozen=True)
class StaleEntry:
    path: Path
    origin: Origin
    key: str  # the entry's key string ("*" for a whole file)
    reason: str


@dataclass
class FileReport:
    path: Path
    origin: Origin
    status: Literal["ok", "corrupt", "stale"]
    entries: int = 0  # entries in the file
    used: int = 0  # entries that dispatch can use
    problems: list[str] = field(default_factory=list)


@dataclass
class Index:
    """Everything tuned for one (family, GPU model), shipped then user (user wins per key)."""

    family: str
    gpu: str
    exact: dict[ProblemKey, Candidate] = field(default_factory=dict)
    # entries that a later folder overrides for the same key, most recent first: tried when check
    # rejects the winner (a user entry must not hide a shipped one that works)
    shadowed: dict[ProblemKey, list[Candidate]] = field(default_factory=dict)
    groups: dict[str, list[Candidate]] = field(default_factory=dict)  # by compile signature
    files: list[FileReport] = field(default_factory=list)
    stale: list[StaleEntry] = field(default_factory=list)

    @property
    def arch(self) -> str | None:
        """The arch the entries were tuned on (for checks when no GpuIdentity is at hand)."""
        for cand in self.exact.values():
            return cand.entry.gpu.arch
        return None

    def candidates(self, key: ProblemKey) -> list[Candidate]:
        """Every usable entry recorded for exactly `key`, in the order dispatch tries them."""
        first = self.exact.get(key)
        return [] if first is None else [first, *self.shadowed.get(key, ())]


# ---- index ----------------------------------------------------------------------------

def _compile_signature(key: ProblemKey) -> str:
    dumped = key.model_dump(mode="json")
    return json.dumps({k: dumped[k] for k in key.COMPILE_FIELDS}, sort_keys=True)


def _log2(value: float) -> float:
    return math.log2(value) if value > 0 else -1.0  # sizes <= 0 count as 0.5


def _coords(key: ProblemKey) -> tuple[Any, ...]:
    out: list[Any] = []
    for value in key.runtime_part().values():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(_log2(float(value)))
        else:
            out.append(("=", value))
    return tuple(out)


def distance(a: ProblemKey, b: ProblemKey) -> float:
    """Distance between two keys with the same compile part (see the module docstring)."""
    return _distance(_coords(a), _coords(b))


def _distance(a: tuple[Any, ...], b: tuple[Any, ...]) -> float:
    total = 0.0
    for x, y in zip(a, b):
        if isinstance(x, float) and isinstance(y, float):
            total += abs(x - y)
        elif x != y:
            total += 1.0
    return total


def _read_into(index: Index, family: KernelFamily, found: store.ReadResult, origin: Origin, warn: bool) -> None:
    path, tuned = found.path, found.tuned
    if tuned is None:
        message = found.message
        index.files.append(FileReport(path, origin, "corrupt", problems=[message]))
        index.stale.append(StaleEntry(path, origin, "*", message))
        if warn:
            warnings.warn(message, TunedConfigWarning, stacklevel=4)
        return
    total = len(tuned.entries) + len(found.invalid)
    report = FileReport(path, origin, "ok", entries=total)
    index.files.append(report)
    if tuned.schema_version != SCHEMA_VERSION or tuned.family != family.name:
        if tuned.schema_version != SCHEMA_VERSION:
            reason = f"schema version {tuned.schema_version} (this vidrial reads {SCHEMA_VERSION})"
        else:
            reason = f"file is for family {tuned.family!r}, not {family.name!r}"
        report.status = "stale"
        report.problems.append(reason)
        index.stale.append(StaleEntry(path, origin, "*", reason))
        if warn:
            warnings.warn(f"tuned configs {path}: {reason}; its {total or 'entries'} "
                          f"entries are ignored (re-tune with `vidrial tune`)", TunedConfigWarning, stacklevel=4)
        return
    for key_string, why in found.invalid.items():
        index.stale.append(StaleEntry(path, origin, key_string, f"does not match the schema: {why}"))
    stale_hash = invalid = 0
    for key_string, entry in tuned.entries.items():
        try:
            key = family.Key.model_validate(entry.key)
            config = family.Config.model_validate(entry.config)
        except ValidationError as exc:
            invalid += 1
            index.stale.append(StaleEntry(path, origin, key_string,
                                          f"does not validate: {exc.errors()[0].get('msg')}"))
            continue
        expected_hash = family.template_hash_for(config)  # that of the implementation the entry runs
        if entry.template_hash != expected_hash:
            stale_hash += 1
            index.stale.append(StaleEntry(path, origin, key_string,
                                          f"template hash {entry.template_hash} != {expected_hash}"))
            continue
        cand = Candidate(key, config, entry, path, origin, key.key_string(), _coords(key))
        overridden = index.exact.get(key)
        if overridden is not None:  # a later file (the user's) overrides an earlier one; kept as a fallback
            index.shadowed.setdefault(key, []).insert(0, overridden)
        index.exact[key] = cand
        report.used += 1
    if stale_hash or invalid or found.invalid:
        parts = []
        if found.invalid:
            first = next(iter(found.invalid))
            parts.append(f"{len(found.invalid)} do not match the schema (first, {first}: {found.invalid[first]})")
        if stale_hash:
            parts.append(f"{stale_hash} tuned with another version of the template")
        if invalid:
            parts.append(f"{invalid} do not validate against {family.name}'s Key/Config")
        report.status = "stale"
        report.problems.extend(parts)
        if warn:
            warnings.warn(f"tuned configs {path}: {total} entries, ignored: " + "; ".join(parts)
                          + " (re-tune with `vidrial tune`)", TunedConfigWarning, stacklevel=4)


def build_index(family: KernelFamily, gpu_slug: str, *, warn: bool = True, extra_dir: Path | None = None) -> Index:
    """Reads the shipped and the user tuned file of `family` for GPU `gpu_slug` (not memoised);
    `extra_dir`: one more tuned-config folder, read last (as "user": it wins per key). A file that
    cannot be read (e.g. a folder without permission) is reported and skipped, never raised."""
    index = Index(family.name, gpu_slug)
    roots: list[tuple[Path | None, Origin]] = [(store.shipped_tuned_dir(), "shipped"), (user_tuned_dir(), "user"),
                                               (extra_dir, "user")]
    seen: set[Path] = set()
    for root, origin in roots:
        if root is None:
            continue
        path = store.file_path(root, gpu_slug, family.name)
        try:
            resolved = path.resolve()
        except OSError:
            resolved = path
        if resolved in seen:
            continue
        found = store.read_file(path, missing_ok=True)  # no is_file() first: it raises on an unreadable folder
        if found is None:
            continue
        seen.add(resolved)
        _read_into(index, family, found, origin, warn)
    for cand in sorted(index.exact.values(), key=lambda c: c.key_string):
        index.groups.setdefault(_compile_signature(cand.key), []).append(cand)
    return index


def tuned_entry(family: KernelFamily, key: ProblemKey, gpu_slug: str, extra_dir: Path | None = None) -> Candidate | None:
    """The usable tuned entry recorded for exactly `key` (shipped, user or `extra_dir`), else None."""
    return build_index(family, gpu_slug, warn=False, extra_dir=extra_dir).exact.get(key)


# ---- resolution ------------------------------------------------------------------------

def _check_error(family: KernelFamily, key: ProblemKey, config: KernelConfig, arch: str | None) -> str | None:
    """Why `family.check` rejects `config` for `key` (None: accepted, or `arch` None: not checked)."""
    if arch is None:
        return None
    try:
        family.check(key, config, arch)
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


def resolve(family: KernelFamily, index: Index, key: ProblemKey, arch: str | None, *, warn: bool = True) -> Dispatch:
    """exact (user, then shipped) -> nearest compatible -> default for `key` in `index` (not memoised).
    `arch=None` skips `family.check` (used by `vidrial show` for a GPU that is not present). Exact entries
    that check rejects are named in the result's `note` and, with `warn`, in one warning."""
    rejected: list[str] = []
    found: Dispatch | None = None
    for cand in index.candidates(key):
        why = _check_error(family, key, cand.config, arch)
        if why is None:
            found = Dispatch(family.name, key, cand.config, "exact", cand.path, index.gpu, cand.key)
            break
        rejected.append(f"the entry in {cand.path} fails {family.name}.check on {arch} ({why})")
    group = index.groups.get(_compile_signature(key)) if found is None else None
    if group:
        coords = _coords(key)
        ranked = sorted((_distance(coords, c.coords), c.key_string, i) for i, c in enumerate(group))
        for _, _, i in ranked:
            c = group[i]
            if c.key != key and _check_error(family, key, c.config, arch) is None:
                found = Dispatch(family.name, key, c.config, "nearest", c.path, index.gpu, c.key)
                break
    if found is None:
        found = Dispatch(family.name, key, family.default_config_for(key, arch), "default", None, index.gpu, None)
    if not rejected:
        return found
    if found.source == "exact":
        using = f"the entry in {found.path}"
    elif found.source == "nearest":
        using = f"the nearest tuned key {found.tuned_key.key_string()} from {found.path}"
    else:
        using = "the default config"
    note = f"tuned configs for {key.key_string()}: {'; '.join(rejected)}; using {using} instead"
    if warn:
        warnings.warn(note, TunedConfigWarning, stacklevel=4)
    return dataclasses.replace(found, note=note)


# ---- a GPU without tuned entries: the nearest tuned GPU of the same arch ----------------------------

class UntunedGpuWarning(UserWarning):
    """This GPU model has no tuned configs; entries of a same-arch GPU, or defaults, are used."""


def tuned_gpus(family: KernelFamily) -> list[tuple[str, Index]]:
    """Every other GPU model with a usable entry of `family` (shipped or user folder), as (slug, index);
    the index's `arch` says which arch it was tuned on. Not memoised; never warns."""
    slugs: set[str] = set()
    for root in (store.shipped_tuned_dir(), user_tuned_dir()):
        for path in _quiet_tuned_files(root):
            if path.stem == family.name:
                slugs.add(path.parent.name)
    out = []
    for slug in sorted(slugs):
        index = build_index(family, slug, warn=False)
        if index.exact:
            out.append((slug, index))
    return out


def _quiet_tuned_files(root: Path | None) -> list[Path]:
    with warnings.catch_warnings():  # an unreadable folder is reported by `vidrial show`, not on every call
        warnings.simplefilter("ignore")
        return store.tuned_files(root)


def nearest_same_arch(family: KernelFamily, gpu: GpuIdentity) -> str | None:
    """The slug of the tuned GPU whose `family` entries stand in for `gpu`'s when `gpu` has no tuned file
    for the family: same arch only (another arch's tile choices may not even fit), nearest SM count first
    (|log2| of the ratio), then by slug. None when no GPU of that arch is tuned."""
    ranked = []
    for slug, index in tuned_gpus(family):
        if slug == gpu.slug or index.arch != gpu.arch:
            continue
        sm = next(iter(index.exact.values())).entry.gpu.sm_count
        ranked.append((abs(_log2(sm) - _log2(gpu.sm_count)), slug))
    return min(ranked)[1] if ranked else None


def untuned_message(gpu: GpuIdentity, borrowed: str | None) -> str:
    using = (f"kernel families without entries for it use those tuned on {borrowed} (same arch {gpu.arch}), "
             "else defaults" if borrowed else f"no GPU of arch {gpu.arch} is tuned either: default configs")
    return (f"vidrial: no tuned configs for {gpu.name} ({gpu.slug}, {gpu.arch}); {using} (`vidrial show` marks "
            f"them). Tune this GPU: `vidrial tune --kernel all --preset shapes`, or only your model's keys: "
            f"`with vidrial.tuning.record('keys.json'): ...` then `vidrial tune --keys keys.json`")


# ---- per-process state and the hot path ------------------------------------------------------

_LOCK = threading.Lock()
_INDEXES: dict[tuple[str, str], Index] = {}
_MEMO: dict[tuple[str, GpuIdentity], dict[ProblemKey, Dispatch]] = {}
_GPUS: dict[int, GpuIdentity] = {}
_LAST: Dispatch | None = None
_BORROWED: dict[tuple[str, GpuIdentity], Index | None] = {}  # (family, GPU) without own file -> stand-in
_WARNED_UNTUNED: set[str] = set()  # GPU slugs warned about: once per GPU model per process
_DEBUG = bool(os.environ.get("VIDRIAL_DEBUG_DISPATCH"))
_torch = None


def current_gpu(device_index: int | None = None) -> GpuIdentity:
    """Identity of CUDA device `device_index` (the current device when None), memoised."""
    global _torch
    if device_index is None:
        if _torch is None:
            import torch

            _torch = torch
        try:
            device_index = _torch.cuda.current_device()
        except Exception:
            return GpuIdentity.current()  # raises InputError naming the fix when there is no GPU
    gpu = _GPUS.get(device_index)
    if gpu is None:
        gpu = _GPUS[device_index] = GpuIdentity.current(device_index)
    return gpu


def get_index(family: KernelFamily, gpu_slug: str) -> Index:
    """The per-process index of (family, GPU model), built on first use (warns once per bad file)."""
    index = _INDEXES.get((family.name, gpu_slug))
    if index is None:
        with _LOCK:
            index = _INDEXES.get((family.name, gpu_slug))
            if index is None:
                index = _INDEXES[(family.name, gpu_slug)] = build_index(family, gpu_slug)
    return index


def select_config(family: KernelFamily, key: ProblemKey, gpu: GpuIdentity | None = None) -> KernelConfig:
    """The config to run `key` with on `gpu` (the current device when None): exact tuned
    key, else the nearest compatible tuned key, else `family.default_config_for(key, arch)`."""
    global _LAST
    if gpu is None:
        gpu = current_gpu()
    memo = _MEMO.get((family.name, gpu))
    if memo is not None:
        found = memo.get(key)
        if found is not None:
            _LAST = found
            if _DEBUG:
                _write_last(found)
            return found.config
    found = _resolve_new(family, key, gpu)
    _LAST = found
    if _DEBUG:
        _write_last(found)
    return found.config


def _resolve_new(family: KernelFamily, key: ProblemKey, gpu: GpuIdentity) -> Dispatch:
    if not isinstance(key, family.Key):
        from vidrial.core.errors import InputError

        raise InputError("key", f"{type(key).__name__}", f"a {family.Key.__name__} for family {family.name!r}")
    index = get_index(family, gpu.slug)
    borrowed = None
    if not index.files:  # nothing tuned for this GPU model: a same-arch GPU's entries beat defaults
        borrowed = _borrowed_index(family, gpu)
    if borrowed is not None:
        found = resolve(family, borrowed, key, gpu.arch)
        if found.source != "default":
            found = dataclasses.replace(found, borrowed_from=borrowed.gpu)
        found = dataclasses.replace(found, gpu=gpu.slug)
    else:
        found = resolve(family, index, key, gpu.arch)
    with _LOCK:
        _MEMO.setdefault((family.name, gpu), {})[key] = found
    return found


def borrowed_index(family: KernelFamily, gpu: GpuIdentity) -> Index | None:
    """The index standing in for `gpu`'s when `gpu` has no tuned file of `family` (see `nearest_same_arch`);
    None when it has one or no GPU of its arch is tuned. Not memoised, never warns (`vidrial show`)."""
    if build_index(family, gpu.slug, warn=False).files:
        return None
    slug = nearest_same_arch(family, gpu)
    return None if slug is None else build_index(family, slug, warn=False)


def _borrowed_index(family: KernelFamily, gpu: GpuIdentity) -> Index | None:
    """Memoised per (family, GPU); the first call for a GPU model warns once (UntunedGpuWarning)."""
    memo_key = (family.name, gpu)
    if memo_key not in _BORROWED:
        slug = nearest_same_arch(family, gpu)
        index = None if slug is None else get_index(family, slug)
        with _LOCK:
            _BORROWED[memo_key] = index
            warn = gpu.slug not in _WARNED_UNTUNED
            _WARNED_UNTUNED.add(gpu.slug)
        if warn:
            warnings.warn(untuned_message(gpu, slug), UntunedGpuWarning, stacklevel=5)
    return _BORROWED[memo_key]


def last_dispatch() -> Dispatch | None:
    """What the most recent `select_config` call in this process chose (None before any)."""
    return _LAST


def reload() -> None:
    """Forgets indexes, memoised choices and the last dispatch; the next call re-reads the
    tuned files (and warns again about bad ones)."""
    global _LAST, _DEBUG, _WRITTEN
    with _LOCK:
        _INDEXES.clear()
        _MEMO.clear()
        _BORROWED.clear()
        _WARNED_UNTUNED.clear()
        _LAST = _WRITTEN = None
        _DEBUG = bool(os.environ.get("VIDRIAL_DEBUG_DISPATCH"))


def last_dispatch_file() -> Path:
    return user_cache_dir() / "last_dispatch.json"


_WRITTEN: Dispatch | None = None


def _write_last(found: Dispatch) -> None:
    """Debug mode only (VIDRIAL_DEBUG_DISPATCH=1): persists the choice for `vidrial show --last`.
    Writes only when the choice differs from the one last written (a file write costs
    hundreds of microseconds; repeated identical calls cost nothing extra)."""
    global _WRITTEN
    if found is _WRITTEN:
        return
    _WRITTEN = found
    try:
        path = last_dispatch_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = found.as_dict()
        data["pid"] = os.getpid()
        data["at"] = store.now_utc()
        store.write_atomic(path, json.dumps(data, indent=2) + "\n")
    except Exception:  # debugging aid only: never break a call
        pass
