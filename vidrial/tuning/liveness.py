"""Which processes work a study, and child processes that die with their parent.

Leases. A process that works a study holds an exclusive flock() on its own lease file,
<root>/<study hash>/<token>.lease (root: next to the journal, or the output dir for a storage
URL). The kernel drops a flock when its holder dies, even by SIGKILL, so "live" needs no
heartbeat and no pid check (pids are reused): a lease file whose lock can be taken is stale.
The trials a process asks carry its token (user attr OWNER_ATTR), which tells the trials
left RUNNING by a dead process from those of live ones. <root>/<study hash>/guard, flock()ed
for a moment, makes "look at the leases, then delete or create the study" and "count the
budget, then ask" atomic across processes. Processes that share a storage URL find each other
only when they also share the output dir. Without fcntl (not POSIX) there are no leases:
nothing is live and the guard does nothing.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

OWNER_ATTR = "vidrial_owner"  # trial user attr: the token of the lease of the process that asked it
_PR_SET_PDEATHSIG = 1


def _lockable(fd: int) -> bool:
    """Takes an exclusive flock on `fd` if nobody holds one (True), else False."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class StudyLeases:
    """The leases of one study; acquire() takes this process's own."""

    def __init__(self, root: Path, study: str):
        self.study = study
        self.dir = Path(root) / hashlib.sha256(study.encode()).hexdigest()[:16]
        self.token: str | None = None
        self._fd: int | None = None
        self._guard_depth = 0

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Holds the study's guard lock (re-entrant within this object)."""
        if fcntl is None or self._guard_depth:
            self._guard_depth += 1
            try:
                yield
            finally:
                self._guard_depth -= 1
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "guard", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._guard_depth = 1
            yield
        finally:
            self._guard_depth = 0
            os.close(fd)  # drops the lock

    def acquire(self) -> str:
        """Takes this process's lease; returns its token (also OWNER_ATTR of the trials it asks)."""
        if self.token is not None:
            return self.token
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if fcntl is not None:
            with self.guard():  # live() runs under the guard too: it never sees a lease half made
                tmp = self.dir / f"{token}.tmp"
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                         "argv": sys.argv[:8]}).encode())
                os.rename(tmp, self.dir / f"{token}.lease")
            self._fd = fd
        self.token = token
        return token

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.dir / f"{self.token}.lease")
            except OSError:
                pass
            os.close(self._fd)
        self._fd = self.token = None

    def live(self) -> dict[str, dict[str, Any]]:
        """token -> what its lease file says (pid, host, since, argv), for each live lease, this
        process's own included. Lease files of dead processes are removed. Call under guard()."""
        out: dict[str, dict[str, Any]] = {}
        if self.token is not None:
            out[self.token] = {"pid": os.getpid(), "host": socket.gethostname()}
        if fcntl is None or not self.dir.is_dir():
            return out
        for path in self.dir.iterdir():
            if path.suffix not in (".lease", ".tmp") or path.stem == self.token:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)  # flock needs no write access
            except FileNotFoundError:  # released meanwhile
                continue
            try:
                if _lockable(fd):
                    try:
                        path.unlink()
                    except OSError:  # gone already, or not ours to remove: stale either way
                        pass
                elif path.suffix == ".lease":
                    try:
                        out[path.stem] = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
                    except ValueError:
                        out[path.stem] = {}
            finally:
                os.close(fd)
        return out


def describe(leases: dict[str, dict[str, Any]]) -> str:
    """'pid 12 on host h since 10:04:05 (vidrial tune ...)' for each lease."""
    parts = []
    for token, info in leases.items():
        since = time.strftime("%H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
        cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(info.get("argv", [])))
        parts.append(f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {since}"
                     + (f" ({cmd})" if cmd else ""))
    return "; ".join(parts) or "none"


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Makes this child process get `sig` when its parent `parent_pid` dies, so a `kill -9` of
    the parent does not leave children working for nobody. Linux: prctl(PR_SET_PDEATHSIG); the
    kernel sends it when the parent *thread* that started the child ends, and the tuner starts
    its children from the thread that also waits for them. Elsewhere: a thread polls the parent."""
    if sys.platform.startswith("linux"):
        try:
            if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os.kill(os.getpid(), sig)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="vidrial-parent-watch", daemon=True).start()


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so cleanup runs (open trials are failed, workers stopped)."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


__all__ = ["StudyLeases", "OWNER_ATTR", "describe", "die_with_parent", "exit_on_sigterm"]
