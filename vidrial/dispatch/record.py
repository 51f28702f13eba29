"""Recording the problem keys a program dispatches, to tune exactly those (`vidrial tune --keys FILE`).

    with vidrial.tuning.record("keys.json"):
        loss = model(batch).sum(); loss.backward()    # and decode steps

What is recorded: every key the dispatcher is asked for, i.e. every kernel call made with `config=None`
(what a model's calls do), per family and deduplicated, in first-seen order. Calls given an explicit
config are not recorded: nothing would dispatch them, so tuning their key would not change them. The
hook is `KernelFamily.config_for`, the one point every call goes through, so it covers every family
with no per-family code, on CUDA, on the CPU host emulation, and on `meta` tensors: while a recording
is active a call on meta tensors is planned (prepare -> key -> recorded -> outputs allocated on meta) and
launches nothing, so a model moved to the meta device records its keys without a GPU.

On exit (also when the block raises: what ran is recorded) the keys are merged with those already in
the file and written atomically as `{family name: [key dicts]}`. Recordings nest; each sees every call
made inside it. The active recordings live in a contextvar (no module-global switch), so threads and
async tasks started outside a recording are not recorded.

This module imports neither the tuner nor Optuna (a kernel call imports it); `vidrial.tuning.record` is
this `record`.
"""
from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidrial.core.errors import InputError

if TYPE_CHECKING:
    from vidrial.core.config import ProblemKey
    from vidrial.core.family import KernelFamily

__all__ = ["Recorder", "record", "recording", "note", "read_keys", "load_keys", "write_keys"]


class Recorder:
    """The keys one `record(...)` block saw: {family name: {key string: key as JSON}}, in first-seen order."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.keys: dict[str, dict[str, dict[str, Any]]] = {}
        # (family name, key) already seen: the hot path is one set lookup per call after the first
        self._seen: set[tuple[str, Any]] = set()

    def add(self, family: KernelFamily, key: ProblemKey) -> None:
        marker = (family.name, key)
        if marker in self._seen:
            return
        self._seen.add(marker)
        self.keys.setdefault(family.name, {}).setdefault(key.key_string(), key.model_dump(mode="json"))

    def as_json(self) -> dict[str, list[dict[str, Any]]]:
        return {name: list(keys.values()) for name, keys in self.keys.items()}


_ACTIVE: contextvars.ContextVar[tuple[Recorder, ...]] = contextvars.ContextVar("vidrial_recorders", default=())


def recording() -> bool:
    """Whether a `record(...)` block is active in this context."""
    return bool(_ACTIVE.get())


def note(family: KernelFamily, key: ProblemKey) -> None:
    """Called by `KernelFamily.config_for` for each dispatched key (a no-op outside `record`)."""
    for recorder in _ACTIVE.get():
        recorder.add(family, key)


@contextmanager
def record(path: str | Path | None = None) -> Iterator[Recorder]:
    """Records the keys dispatched inside the block (see the module docstring); on exit merges them into
    `path` (None: nothing is written; the yielded Recorder holds them). The file is read first, so a
    file that is not a keys file fails before the block runs, not after it."""
    target = None if path is None else Path(path)
    existing = read_keys(target, "path") if target is not None and target.exists() else {}
    recorder = Recorder(target)
    token = _ACTIVE.set(_ACTIVE.get() + (recorder,))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
        if target is not None:
            write_keys(target, _merge(existing, recorder.as_json()))


def _merge(old: dict[str, list[dict[str, Any]]], new: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict]]:
    """old's keys first, then new ones not already there (compared as sorted JSON)."""
    out = {name: list(keys) for name, keys in old.items()}
    for name, keys in new.items():
        have = {json.dumps(k, sort_keys=True) for k in out.get(name, [])}
        for k in keys:
            text = json.dumps(k, sort_keys=True)
            if text not in have:
                have.add(text)
                out.setdefault(name, []).append(k)
    return out


def write_keys(path: str | Path, keys: dict[str, list[dict[str, Any]]]) -> None:
    """Writes a keys file atomically (temp file + rename: a reader sees the old or the new file)."""
    from vidrial.dispatch.store import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(keys, indent=2) + "\n")


def read_keys(path: str | Path, argument: str = "keys_file") -> dict[str, list[dict[str, Any]]]:
    """A keys file's content, checked for shape only ({family name: [JSON objects]}); InputError naming
    `argument`, the file and what is wrong otherwise."""
    path = Path(path)
    where = f"keys file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(argument, where, f"a readable JSON file ({exc})") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(argument, f"{where}: not valid JSON ({exc})",
                         "a JSON object {family name: [key objects]} as vidrial.tuning.record writes") from None
    if not isinstance(data, dict):
        raise InputError(argument, f"{where}: a JSON {type(data).__name__}", "a JSON object {family name: [key objects]}")
    for name, keys in data.items():
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise InputError(argument, f"{where}: family {name!r} maps to {json.dumps(keys)[:80]}",
                             "a list of key objects")
    return data


def load_keys(path: str | Path, families: dict[str, KernelFamily]) -> dict[str, list[ProblemKey]]:
    """A keys file validated against `families` (name -> family; the tuner passes the registered ones):
    {family name: [Key models]} (file order, no repeats). An unknown family or a key that does not validate
    is an InputError naming the file, the family, the key's position and why."""
    argument = "keys_file"
    from pydantic import ValidationError

    out: dict[str, list[ProblemKey]] = {}
    for name, keys in read_keys(path).items():
        family = families.get(name)
        if family is None:
            raise InputError(argument, f"keys file {path}: family {name!r}",
                             f"one of {', '.join(sorted(families)) or '(none registered)'}")
        models: list[ProblemKey] = []
        for i, raw in enumerate(keys):
            try:
                key = family.Key.model_validate(raw)
            except (ValidationError, ValueError) as exc:
                if isinstance(exc, ValidationError):
                    err = exc.errors()[0]
                    loc = ".".join(str(p) for p in err.get("loc", ()))
                    why = f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))
                else:
                    why = str(exc)
                raise InputError(argument, f"keys file {path}: {name} key #{i} {json.dumps(raw)}",
                                 f"a valid {family.Key.__name__} ({why})") from None
            if key not in models:
                models.append(key)
        if models:
            out[name] = models
    return out
