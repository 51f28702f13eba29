"""Compiling ahead: the next candidates compile (NVRTC, through the core's on-disk cache) in
spawned processes while the current one is measured. A compiler's submit() returns a Future
whose result is a CompiledKernel or the exception that compiling raised."""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from vidrial.tuning.liveness import die_with_parent
from vidrial.tuning.settings import TuneSettings
from vidrial.tuning.worker import import_ref


class PoolCompiler:
    """Compiles (family, key, config, arch) in spawned worker processes through the core's
    compile cache; submit() returns a Future of a CompiledKernel or a CompileError."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._pool: Any = None

    def submit(self, family: Any, key: Any, config: Any, arch: str) -> Future:
        """arch: the GPU's; the config's implementation picks the compile target (wgmma kernels: sm_90a)."""
        from vidrial.core.compile import _compile_job

        try:
            job = (family.render(key, config), family.target_arch(config, arch), (),
                   f"{family.name}: {key.label()} | {config.label()}")
        except Exception as exc:  # rendering errors are this config's failure
            f: Future = Future()
            f.set_result(exc)
            return f
        if self.workers <= 1:
            f = Future()
            f.set_result(_compile_job(job))
            return f
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                             initializer=die_with_parent, initargs=(os.getpid(),))
        return self._pool.submit(_compile_job, job)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def reset(self) -> None:
        """Drops a broken pool; the next submit() starts a fresh one. Pending futures of the
        old pool fail and are retried by the search loop."""
        self.close()


class FunctionCompiler:
    """Wraps a compile function (family, key, config, arch) -> CompiledKernel (tests, fakes)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def submit(self, family: Any, key: Any, config: Any, arch: str) -> Future:
        f: Future = Future()
        try:
            f.set_result(self.fn(family, key, config, arch))
        except Exception as exc:
            f.set_result(exc)
        return f

    def close(self) -> None:
        pass


def make_compiler(settings: TuneSettings, override: Any = None) -> Any:
    if override is not None:
        return override if hasattr(override, "submit") else FunctionCompiler(override)
    if settings.compiler:
        return FunctionCompiler(import_ref(settings.compiler))
    return PoolCompiler(settings.compile_workers or settings.ahead())


__all__ = ["PoolCompiler", "FunctionCompiler", "make_compiler"]
