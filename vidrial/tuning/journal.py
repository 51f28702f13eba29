"""The journal file of the default Optuna storage, made robust to killed processes.

- The write lock is a flock() on <journal>.flock instead of Optuna's symlink lock
  (<journal>.lock): the kernel drops a flock when its holder dies, so a process killed in the
  middle of an append cannot stall the next run (Optuna breaks a stale symlink lock only after
  30 s). A <journal>.lock left by an older version is ignored (so an older version must not
  write the same journal at the same time).
- A process killed in the middle of an append leaves a torn last line (no newline). Optuna
  skips it when reading, but the next append glues its line to the fragment and from then on
  every read fails (json.JSONDecodeError, the file not named). So whoever holds the write lock
  cuts a torn tail off before appending (no writer is mid-line then), keeps a backup of the
  file and says so on stderr. A journal that already holds a glued line (an older version
  appended after a tear) is repaired when it is opened: the complete operation after the
  fragment is kept.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from vidrial.core.errors import VidrialError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: Optuna's own lock
    fcntl = None  # type: ignore[assignment]

_OP = b'{"op_code"'  # how every journal line starts (Optuna writes op_code first)


class JournalError(VidrialError, ValueError):
    """A journal file that cannot be read even after repair: names the file."""


class FlockJournalLock:
    """An exclusive flock() on `path`; never stale (released by the kernel when its holder dies).
    The lock interface of JournalFileBackend (acquire, release)."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the lock


class RepairingJournalBackend(JournalFileBackend):
    """JournalFileBackend with the flock write lock that cuts a torn tail before each append."""

    def __init__(self, path: str):
        super().__init__(path, lock_obj=FlockJournalLock(path + ".flock") if fcntl is not None else None)
        with self.locked():
            repair_journal(self._file_path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        with self.locked():
            if _ends_torn(self._file_path):
                repair_journal(self._file_path)
            with open(self._file_path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())


def _ends_torn(path: str) -> bool:
    """Whether the last line lacks its newline (one byte read)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return False
        f.seek(size - 1)
        return f.read(1) != b"\n"


def _operation(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _glued(line: bytes) -> bytes | None:
    """The operation glued after a fragment in `line` (None: none)."""
    start = line.find(_OP, 1)
    while start != -1:
        if _operation(line[start:]):
            return line[start:]
        start = line.find(_OP, start + 1)
    return None


def repair_journal(path: str | Path, whole: bool = False) -> Path | None:
    """Cuts a torn tail off the journal at `path` and repairs a glued last line (every line with
    whole=True), keeping a backup of the file; returns the backup (None: nothing to repair).
    Call with the write lock held: then no writer is in the middle of a line."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    first = 0 if whole else max(len(lines) - 1, 0)
    bad = next((i for i in range(first, len(lines)) if not _operation(lines[i])), None)
    if bad is None and not torn:
        return None
    bad = len(lines) if bad is None else bad
    rest = lines[bad:]
    good = [_operation(line) for line in rest]
    salvaged = [line if ok else _glued(line) for line, ok in zip(rest, good)]
    kept = [line for line in salvaged if line is not None]
    offset = sum(len(line) + 1 for line in lines[:bad])  # the lines before stay where they are
    stamp = time.strftime("%Y%m%dT%H%M%S")
    backup = path.with_name(f"{path.name}.{stamp}.bak")
    n = 0
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.{stamp}-{n}.bak")
    shutil.copy2(path, backup)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"".join(line + b"\n" for line in kept))
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    broken = good.count(False) + bool(torn)
    glued = len(kept) - good.count(True)
    print(f"vidrial tune: journal {path}: skipped {broken} torn line(s) (a process was killed while writing)"
          + (f", kept the {glued} operation(s) appended after the tear" if glued else "")
          + f"; the file as it was is in {backup}", file=sys.stderr, flush=True)
    return backup


def open_journal(path: str | Path) -> JournalStorage:
    """A JournalStorage on the journal file `path`, repaired first when torn."""
    path = str(path)
    try:
        return JournalStorage(RepairingJournalBackend(path))
    except ValueError as exc:  # a glued line inside the file (json.JSONDecodeError is a ValueError)
        with RepairingJournalBackend(path).locked():
            repaired = repair_journal(path, whole=True)
        if repaired is None:
            raise JournalError(f"journal {path} cannot be read ({type(exc).__name__}: {exc}); it is not a "
                               "journal that a killed process tore (no torn line found)") from exc
        try:
            return JournalStorage(RepairingJournalBackend(path))
        except ValueError as again:
            raise JournalError(f"journal {path} cannot be read even after repair ({again}); the file as it was "
                               f"is in {repaired}") from again


__all__ = ["open_journal", "repair_journal", "RepairingJournalBackend", "FlockJournalLock", "JournalError"]
