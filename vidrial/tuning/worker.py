"""Measurement in an isolated worker process.

The parent (the tuner) sends (family, key, config) jobs over a pipe to a worker process
started with multiprocessing's "spawn" method; the worker loads the cached cubin, runs
the config once against the family's reference (first use only), times it with CUDA
events (vidrial.tuning.measure) and sends a result dict back. A config that faults
(illegal address, launch failure: the CUDA context is dead afterwards) makes the worker
report the fault and exit; one that hangs past the job timeout, or a worker that dies,
is killed by the parent. Either way the trial is recorded as failed, and the next job
starts a fresh worker: the study goes on.

Result dicts (JSON across the pipe; the tuner reads them as vidrial.tuning.records.Measurement):
{"status": S, "time_ms": float | None, "reason": str, ...} with S one of
    ok        measured (time_ms is the median, "timing" has the details)
    wrong     ran, but the outputs differ from the reference (rel_err > tolerance)
    invalid   the family's check() rejects the config (ConfigError)
    error     a Python-side or recoverable CUDA error (the worker lives on)
    fault     a CUDA fault that corrupts the context (the worker restarts)
    timeout   no answer within the job timeout (the worker was killed)
    crash     the worker process died
The backend that does the work is pluggable (`backend="module:Class"`), so CPU tests use
a fake backend with the same process isolation.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from vidrial.core.errors import VidrialError
from vidrial.tuning.records import FAILED_STATUSES  # noqa: F401 (re-exported)

DEFAULT_BACKEND = "vidrial.tuning.worker:GpuBackend"


class WorkerError(VidrialError, RuntimeError):
    """The measurement worker could not be started."""


def import_ref(ref: str) -> Any:
    """'package.module:attr' or 'path/to/file.py:attr' -> the object. A file's folder goes on
    sys.path and the file is imported under its own name, so the objects in it can name themselves
    by 'module:attr' and processes spawned later (which inherit sys.path) import the same module."""
    module, _, attr = ref.rpartition(":")
    if not module or not attr:
        raise ValueError(f"expected 'module:attribute' or 'file.py:attribute', got {ref!r}")
    if module.endswith(".py") or os.sep in module:
        path = Path(module).resolve()
        if not path.is_file():
            raise ImportError(f"no such file {module!r}", path=str(path))
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        module = path.stem
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_family(ref: Any) -> Any:
    """A KernelFamily from a registered name, a 'module:attr' reference, or a family itself."""
    if not isinstance(ref, str):
        return ref
    if ":" in ref:
        try:
            return import_ref(ref)
        except (ImportError, AttributeError) as exc:
            from vidrial.core.errors import InputError

            raise InputError("kernel", repr(ref), "a registered family name or the 'module:attr' of a "
                             f"KernelFamily (importing it failed: {exc})") from None
    from vidrial.kernels import get_family

    return get_family(ref)


def family_ref(family: Any) -> str:
    """How a worker process finds `family` again: its REF ('module:attr') or registered name."""
    return getattr(family, "REF", None) or family.name


class ProblemMismatchError(VidrialError, ValueError):
    """make_inputs built a problem that the op dispatches under another key than the tuned one."""


def check_inputs_key(family: Any, key: Any, inputs: Any) -> None:
    """Raises ProblemMismatchError unless the public op would dispatch `inputs` under `key` itself:
    the winner is stored under `key`, so timing another problem would store a winner for the wrong
    sizes. A family whose inputs_key says nothing (None) passes."""
    actual = family.inputs_key(inputs, key)
    if actual is None or actual == key:
        return
    differ = ", ".join(f"{k}: {v} (key {getattr(key, k)})" for k, v in actual.model_dump().items()
                       if v != getattr(key, k))
    raise ProblemMismatchError(
        f"{family.name}: make_inputs builds a problem that the op dispatches under another key ({differ}); "
        "the tuner would store a winner timed on other sizes. make_inputs must build sizes inside the key's "
        "buckets (docs/TUNING.md, 'What the tuner times')")


# ---- the GPU backend (runs inside the worker) ------------------------------------------------
_FATAL_WORDS = ("illegal", "launch failure", "misaligned", "unspecified launch", "trap", "hardware stack",
                "an illegal instruction", "context is destroyed", "device-side assert", "CUDA_ERROR_LAUNCH_FAILED")


class GpuBackend:
    """Compiles (from the cubin cache), checks and times family configs on one GPU."""

    def __init__(self, device_index: int = 0):
        import torch

        from vidrial.core.errors import InputError

        self.torch = torch
        self.device_index = device_index
        if not torch.cuda.is_available():
            raise InputError("gpus", f"device {device_index}: no CUDA device present",
                             "a machine with a CUDA GPU (tuning measures, it does not guess)")
        if not 0 <= device_index < torch.cuda.device_count():
            raise InputError("gpus", device_index, f"a device index below {torch.cuda.device_count()}")
        torch.cuda.set_device(device_index)
        self.device = torch.device("cuda", device_index)
        self._inputs_key: Any = None
        self._inputs: Any = None
        self._expected: Any = None

    def hello(self) -> dict[str, Any]:
        from vidrial.dispatch.store import GpuIdentity, Toolchain

        gpu = GpuIdentity.current(self.device_index)
        return {"gpu": gpu.model_dump(), "arch": gpu.arch, "toolchain": Toolchain.current().model_dump(),
                "device_index": self.device_index, "pid": os.getpid()}

    def _inputs_for(self, family: Any, key: Any, seed: int):
        memo = (family.name, key, seed)
        if self._inputs_key != memo:
            self._inputs = self._expected = None
            self.torch.cuda.empty_cache()
            inputs = family.make_inputs(key, self.device, seed)
            check_inputs_key(family, key, inputs)
            self._inputs, self._inputs_key = inputs, memo
        return self._inputs

    def _expected_for(self, family: Any, key: Any, inputs: Any):
        if self._expected is None:
            self._expected = family.reference(key, inputs)
            self.torch.cuda.synchronize(self.device)
        return self._expected

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        from vidrial.core.errors import CompileError, ConfigError
        from vidrial.tuning.measure import time_cuda

        torch = self.torch
        family = resolve_family(job["family"])
        key = family.Key.model_validate(job["key"])
        config = family.Config.model_validate(job["config"])
        started = time.perf_counter()
        try:
            family.launchable(key, config, job["arch"])
        except ConfigError as exc:
            return {"status": "invalid", "reason": str(exc)}
        except CompileError as exc:
            return {"status": "compile_error", "reason": str(exc)[:2000]}
        try:
            inputs = self._inputs_for(family, key, int(job.get("seed", 0)))
            rel_err = None
            if job.get("check", True):
                expected = self._expected_for(family, key, inputs)
                outputs = family.run(key, config, inputs)
                torch.cuda.synchronize(self.device)
                rel_err = float(family.check_outputs(key, inputs, outputs, expected))
                del outputs
                tol = float(family.tolerance(key))
                if not rel_err <= tol:
                    return {"status": "wrong", "rel_err": rel_err,
                            "reason": f"relative error {rel_err:.3g} against the reference exceeds {tol:.3g}"}
            timing = time_cuda(lambda: family.run(key, config, inputs), device=self.device,
                               **job.get("timing", {}))
        except NotImplementedError as exc:
            return {"status": "error", "reason": str(exc)}
        except Exception as exc:  # decide whether the CUDA context survived
            fatal = not self._healthy() or any(w.lower() in str(exc).lower() for w in _FATAL_WORDS)
            return {"status": "fault" if fatal else "error", "fatal": fatal,
                    "reason": f"{type(exc).__name__}: {str(exc).strip()[:1500]}"}
        return {"status": "ok", "time_ms": timing.median_ms, "timing": timing.as_dict(), "rel_err": rel_err,
                "seconds": time.perf_counter() - started}

    def _healthy(self) -> bool:
        torch = self.torch
        try:
            torch.cuda.synchronize(self.device)
            x = torch.ones(8, device=self.device)
            return float((x + 1).sum().item()) == 16.0
        except Exception:
            return False


# ---- the worker process ------------------------------------------------------------------------
def _worker_main(conn: Any, backend_ref: str, device_index: int, parent_pid: int | None = None) -> None:
    import signal

    if parent_pid is not None:  # a worker hung in a kernel outlives a killed tuner otherwise
        from vidrial.tuning.liveness import die_with_parent

        die_with_parent(parent_pid)
    # Ctrl-C goes to the whole process group: the parent handles it (and stops this worker);
    # the worker must not report an interrupted measurement as this config's failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        backend = import_ref(backend_ref)(device_index)
        conn.send(("hello", backend.hello()))
    except BaseException as exc:  # startup failure: tell the parent why
        try:
            detail = "" if isinstance(exc, VidrialError) else "\n" + traceback.format_exc()[-3000:]
            conn.send(("startup_error", f"{type(exc).__name__}: {exc}{detail}"))
        finally:
            os._exit(2)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            os._exit(0)
        if message[0] == "stop":
            conn.close()
            os._exit(0)
        _, job_id, job = message
        try:
            result = backend.run(job)
        except BaseException as exc:
            result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"}
        try:
            conn.send(("result", job_id, result))
        except Exception:
            os._exit(3)
        if result.get("fatal"):
            conn.close()
            os._exit(4)  # the CUDA context is dead: the parent starts a fresh worker


@dataclass
class WorkerStats:
    started: int = 0
    restarts: int = 0
    jobs: int = 0


class MeasurementWorker:
    """Parent side of one measurement worker process, bound to one device.

    measure(job) never raises for a bad config: faults, hangs and crashes come back as
    result dicts (status fault / timeout / crash) and the worker is restarted lazily."""

    def __init__(self, backend: str = DEFAULT_BACKEND, device_index: int = 0, job_timeout_s: float = 120.0,
                 startup_timeout_s: float = 300.0):
        self.backend, self.device_index = backend, device_index
        self.job_timeout_s, self.startup_timeout_s = job_timeout_s, startup_timeout_s
        self._ctx = get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._job_id = 0
        self.info: dict[str, Any] | None = None
        self.stats = WorkerStats()

    # -- lifecycle --
    def start(self) -> dict[str, Any]:
        if self._proc is not None and self._proc.is_alive():
            return self.info or {}
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.backend, self.device_index, os.getpid()),
                                 name=f"vidrial-measure-{self.device_index}", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self.stats.started += 1
        if self.stats.started > 1:
            self.stats.restarts += 1
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if parent.poll(0.05):
                try:
                    kind, payload = parent.recv()
                except (EOFError, OSError):  # it died without a word: its exit code is all there is
                    proc.join(timeout=5)
                    kind, payload = "startup_error", ("worker closed its pipe during startup" if proc.exitcode is None
                                                      else f"worker exited with code {proc.exitcode} during startup")
                break
            if not proc.is_alive():
                if parent.poll(0):  # it sent why, then exited before the poll above saw the message
                    continue
                kind, payload = "startup_error", f"worker exited with code {proc.exitcode} during startup"
                break
            if time.monotonic() > deadline:
                kind, payload = "startup_error", f"worker did not start within {self.startup_timeout_s:.0f} s"
                break
        if kind != "hello":
            self._kill()
            raise WorkerError(f"measurement worker ({self.backend}, device {self.device_index}) failed: {payload}")
        self.info = payload
        return payload

    def _kill(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            try:
                self._conn.send(("stop",))
                self._proc.join(timeout=5)
            except (OSError, BrokenPipeError):
                pass
        self._kill()

    def __enter__(self) -> MeasurementWorker:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- jobs --
    def measure(self, job: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        timeout_s = self.job_timeout_s if timeout_s is None else timeout_s
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            self.start()
        self._job_id += 1
        job_id = self._job_id
        self.stats.jobs += 1
        proc, conn = self._proc, self._conn
        try:
            conn.send(("job", job_id, job))
        except (OSError, BrokenPipeError) as exc:
            self._kill()
            return {"status": "crash", "reason": f"could not send the job to the worker: {exc}"}
        deadline = time.monotonic() + timeout_s
        while True:
            if conn.poll(0.05):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    proc.join(timeout=5)
                    code = proc.exitcode
                    self._kill()
                    return {"status": "crash", "reason": f"worker died (exit code {code})"}
                if message[0] == "result" and message[1] == job_id:
                    result = message[2]
                    if result.get("fatal"):
                        proc.join(timeout=30)
                        self._kill()
                    return result
                continue  # a stale message
            if not proc.is_alive():
                code = proc.exitcode
                self._kill()
                return {"status": "crash", "reason": f"worker died (exit code {code}) while measuring"}
            if time.monotonic() > deadline:
                self._kill()
                return {"status": "timeout", "reason": f"no result within {timeout_s:.0f} s (hang?); worker killed"}


class InProcessMeasurer:
    """Runs a backend in this process (no isolation): for synthetic objectives and tests."""

    def __init__(self, backend: Any, device_index: int = 0):
        self.impl = import_ref(backend)(device_index) if isinstance(backend, str) else backend
        self.info: dict[str, Any] | None = None
        self.stats = WorkerStats()

    def start(self) -> dict[str, Any]:
        if self.info is None:
            self.info = self.impl.hello()
            self.stats.started = 1
        return self.info

    def measure(self, job: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        self.start()
        self.stats.jobs += 1
        return self.impl.run(job)

    def close(self) -> None:
        pass


__all__ = ["MeasurementWorker", "InProcessMeasurer", "GpuBackend", "WorkerError", "resolve_family", "family_ref",
           "import_ref", "FAILED_STATUSES", "DEFAULT_BACKEND"]
