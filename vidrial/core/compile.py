"""Compiling is a pure function: (source, arch, options) -> cubin + resource facts.

Results live in a content-addressed on-disk cache (user cache dir, VIDRIAL_CACHE_DIR
overrides) keyed by hash(source, arch, NVRTC version, options): `<key>.cubin` next to
`<key>.json` (the resource facts and the cubin's sha256). Writes are atomic and durable
(temp file + fsync + rename), so processes compiling the same kernel at once are safe: the
last rename wins with identical bytes. A load checks the cubin against its sha256, so a
truncated or damaged cubin is recompiled and replaced instead of being a hit forever. The
cache is bounded (VIDRIAL_CACHE_MAX_MB, default 2 GiB): after a write the least recently
used entries (mtime, touched on every hit) are evicted. No GPU is needed: the arch is
always explicit.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from vidrial.core.arch import normalize_arch
from vidrial.core.errors import CompileError, InputError
from vidrial.core.paths import user_cache_dir
from vidrial.core.render import RenderedKernel
from vidrial.core.toolchain import cuda_include_dir, nvrtc_module, nvrtc_version

BASE_OPTIONS: tuple[str, ...] = ("-std=c++17", "--use_fast_math", "-default-device", "--ptxas-options=-v")


class CompileFacts(BaseModel):
    """What ptxas reports about one entry point."""

    model_config = ConfigDict(frozen=True)

    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_frame_bytes: int
    static_smem_bytes: int
    barriers: int = 0
    # False when the log carried no resource report for the entry (the numbers above are then
    # unknown, not zero); such facts are never cached, and the CLI shows them as unknown
    reported: bool = True

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


class _CacheRecord(BaseModel):
    """`<key>.json`: the facts and what the cubin next to it must hash to."""

    facts: CompileFacts
    cubin_sha256: str
    cubin_bytes: int


@dataclass(frozen=True)
class CompiledKernel:
    entry: str
    arch: str
    cubin: bytes
    facts: CompileFacts
    cache_key: str
    seconds: float  # compile time; 0.0 on a cache hit
    cached: bool


def cache_key(source: str, arch: str, options: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (source, normalize_arch(arch), nvrtc_version(), "\x1f".join(options)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cubin_cache_dir() -> Path:
    return user_cache_dir() / "cubin"


DEFAULT_CACHE_MAX_MB = 2048
_STALE_TMP_S = 3600.0  # a temp file this old is a write that was interrupted, not one in progress
_ENTRY = re.compile(r"[0-9a-f]{64}\.(cubin|json)")  # what the cache writes: <sha256 key>.cubin / .json


def cache_limit_bytes() -> int:
    """The cache's size bound: $VIDRIAL_CACHE_MAX_MB megabytes (MiB), default 2048."""
    text = os.environ.get("VIDRIAL_CACHE_MAX_MB")
    if text is None or not text.strip():
        return DEFAULT_CACHE_MAX_MB * 2**20
    try:
        mb = float(text)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb > 0):
        raise InputError("VIDRIAL_CACHE_MAX_MB", repr(text), "a positive number of megabytes (MiB), e.g. 2048")
    return int(mb * 2**20)


def _entries() -> dict[Path, list[Path]]:
    """The cache's entries: `<dir>/<key>` -> its existing files (.cubin, .json); nothing else is touched."""
    out: dict[Path, list[Path]] = {}
    for shard in cubin_cache_dir().glob("[0-9a-f][0-9a-f]"):
        if not shard.is_dir():
            continue
        for f in shard.iterdir():
            if _ENTRY.fullmatch(f.name) and f.name.startswith(shard.name) and f.is_file():
                out.setdefault(f.with_suffix(""), []).append(f)
    return out


def _size(files: Iterable[Path]) -> int:
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except OSError:  # removed by another process meanwhile
            pass
    return total


def _last_used(files: list[Path]) -> float:
    try:
        return max(f.stat().st_mtime for f in files)
    except OSError:
        return 0.0


def _remove_entry(files: Iterable[Path]) -> None:
    # facts first: a reader never finds facts whose cubin is gone (it would be a miss anyway: the hash)
    for f in sorted(files, key=lambda f: f.suffix != ".json"):
        f.unlink(missing_ok=True)


def _evict(limit: int, keep: Path) -> None:
    """Removes least recently used entries until the cache holds at most `limit` bytes; never `keep`
    (the entry just written, which the caller is about to use)."""
    entries = _entries()
    sizes = {base: _size(files) for base, files in entries.items()}
    total = sum(sizes.values())
    if total <= limit:
        return
    for base in sorted(entries, key=lambda b: _last_used(entries[b])):
        if total <= limit:
            break
        if base == keep:
            continue
        _remove_entry(entries[base])
        total -= sizes[base]


_NUM = r"(\d+)"


def parse_ptxas_log(log: str, entry: str) -> CompileFacts:
    """Parses `--ptxas-options=-v` output for `entry` (NVRTC passes ptxas' log through)."""
    start = log.find(f"Function properties for {entry}")
    if start < 0:
        start = log.find(f"'{entry}'")
    section = log[start:] if start >= 0 else log

    def grab(pattern: str) -> int:
        m = re.search(pattern, section)
        return int(m.group(1)) if m else 0

    return CompileFacts(
        reported=start >= 0 and re.search(rf"Used {_NUM} registers", section) is not None,
        registers=grab(rf"Used {_NUM} registers"),
        spill_store_bytes=grab(rf"{_NUM} bytes spill stores"),
        spill_load_bytes=grab(rf"{_NUM} bytes spill loads"),
        stack_frame_bytes=grab(rf"{_NUM} bytes stack frame"),
        static_smem_bytes=grab(rf"{_NUM} bytes smem"),
        barriers=grab(rf"used {_NUM} barriers"),
    )


def _numbered_excerpt(source: str, log: str, context: int = 3) -> str:
    """The source lines NVRTC's log points at, numbered, so errors can be read in place."""
    lines = source.splitlines()
    cited = sorted({int(n) for n in re.findall(r"\((\d+)\): (?:error|catastrophic)", log)})
    out: list[str] = []
    for n in cited[:8]:
        lo, hi = max(1, n - context), min(len(lines), n + context)
        out.append(f"--- around line {n} ---")
        out.extend(f"{'>' if i == n else ' '}{i:5d} | {lines[i - 1]}" for i in range(lo, hi + 1))
    return "\n".join(out)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsynced, then renamed over `path`: readers see the old or the
    new bytes, and a crash does not leave a renamed but unwritten file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(key: str, entry: str, arch: str) -> CompiledKernel | None:
    """The cached compile of `key`, or None when absent, unreadable or damaged (size or sha256 differ)."""
    base = cubin_cache_dir() / key[:2] / key
    cubin_path, facts_path = base.with_suffix(".cubin"), base.with_suffix(".json")
    try:
        record = _CacheRecord.model_validate_json(facts_path.read_bytes())
        cubin = cubin_path.read_bytes()
    except (OSError, ValueError):  # ValueError: bad JSON, or an entry of an older format without the hash
        return None
    if len(cubin) != record.cubin_bytes or hashlib.sha256(cubin).hexdigest() != record.cubin_sha256:
        return None
    try:
        os.utime(cubin_path)  # the hit makes it the most recently used (eviction order)
    except OSError:  # a read-only cache still serves hits
        pass
    return CompiledKernel(entry, arch, cubin, record.facts, key, 0.0, True)


def _store(key: str, cubin: bytes, facts: CompileFacts) -> None:
    limit = cache_limit_bytes()  # a bad VIDRIAL_CACHE_MAX_MB fails before anything is written
    base = cubin_cache_dir() / key[:2] / key
    record = _CacheRecord(facts=facts, cubin_sha256=hashlib.sha256(cubin).hexdigest(), cubin_bytes=len(cubin))
    _write_atomic(base.with_suffix(".cubin"), cubin)
    # facts last: a reader that finds the facts also finds the cubin
    _write_atomic(base.with_suffix(".json"), record.model_dump_json().encode())
    _evict(limit, keep=base)


def compile_source(
    kernel: RenderedKernel,
    arch: str,
    extra_options: Sequence[str] = (),
    label: str = "",
    use_cache: bool = True,
) -> CompiledKernel:
    """Compiles one rendered kernel to a cubin for `arch` (no GPU needed).

    `label` (usually the config) is shown in compile errors."""
    arch = normalize_arch(arch)
    options = (*BASE_OPTIONS, f"--gpu-architecture={arch}", *extra_options)
    key = cache_key(kernel.source, arch, options)
    if use_cache:
        hit = _load_cached(key, kernel.entry, arch)
        if hit is not None:
            return hit
    started = time.perf_counter()
    cubin, log = _nvrtc_compile(kernel, arch, options, label)
    facts = parse_ptxas_log(log, kernel.entry)
    if not facts.reported:
        # seen once on an H200: a compile whose log lacked ptxas' report; a second compile had it
        cubin, log = _nvrtc_compile(kernel, arch, options, label)
        facts = parse_ptxas_log(log, kernel.entry)
    seconds = time.perf_counter() - started
    if use_cache and facts.reported:
        _store(key, cubin, facts)
    return CompiledKernel(kernel.entry, arch, cubin, facts, key, seconds, False)


def ptx_of(kernel: RenderedKernel, arch: str) -> str:
    """The PTX NVRTC generates for `kernel` on `arch` (virtual target compute_XX[a]; no ptxas, no cache):
    what the CPU tests read to check which instructions a template issues (e.g. wgmma.mma_async on
    sm_90a, never a silent fallback to mma.sync)."""
    arch = normalize_arch(arch)
    nvrtc = nvrtc_module()
    prog = nvrtc.createProgram(kernel.source, f"{kernel.entry}.cu", [], [])
    try:
        options = [o for o in BASE_OPTIONS if not o.startswith("--ptxas-options")]
        try:
            nvrtc.compileProgram(prog, [*options, f"--gpu-architecture={arch.replace('sm_', 'compute_')}",
                                        f"-I{cuda_include_dir()}"])
        except Exception as exc:
            raise CompileError(f"NVRTC failed to compile {kernel.entry} ({kernel.template}) to PTX for {arch}\n"
                               f"{exc}\n{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def _nvrtc_compile(kernel: RenderedKernel, arch: str, options: Sequence[str], label: str) -> tuple[bytes, str]:
    """(cubin, NVRTC log) of one compile; CompileError with the numbered source on failure."""
    nvrtc = nvrtc_module()
    prog = nvrtc.createProgram(kernel.source, f"{kernel.entry}.cu", [], [])
    try:
        all_options = [*options, f"-I{cuda_include_dir()}"]
        try:
            nvrtc.compileProgram(prog, all_options)
        except Exception as exc:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(
                f"NVRTC failed to compile {kernel.entry} ({kernel.template}) for {arch}"
                + (f"\nconfig: {label}" if label else "")
                + f"\n{exc}\n{log}\n{_numbered_excerpt(kernel.source, log)}"
            ) from None
        log = nvrtc.getProgramLog(prog)
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return cubin, log


def _compile_job(job: tuple[RenderedKernel, str, tuple[str, ...], str]) -> CompiledKernel | CompileError:
    kernel, arch, extra, label = job
    try:
        return compile_source(kernel, arch, extra, label)
    except CompileError as exc:
        return exc


def compile_many(
    jobs: Iterable[tuple[RenderedKernel, str, Sequence[str], str]],
    workers: int | None = None,
    on_done: Callable[[int, CompiledKernel | CompileError], None] | None = None,
) -> list[CompiledKernel | CompileError]:
    """Compiles (kernel, arch, extra_options, label) jobs in worker processes, in order.

    A failed compile comes back as its CompileError instead of raising, so one bad
    config does not hide the others. `on_done(index, result)` is called as each job finishes
    (in completion order: a progress bar moves while the slow ones still compile)."""
    job_list = [(k, a, tuple(o), lbl) for k, a, o, lbl in jobs]
    if workers is None:
        workers = min(len(job_list), os.cpu_count() or 1)
    results: list[CompiledKernel | CompileError | None] = [None] * len(job_list)
    if workers <= 1 or len(job_list) <= 1:
        for i, job in enumerate(job_list):
            results[i] = _compile_job(job)
            if on_done is not None:
                on_done(i, results[i])
        return results  # type: ignore[return-value]
    # spawn: forking a process that holds a CUDA context is unsafe
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_compile_job, job): i for i, job in enumerate(job_list)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done is not None:
                on_done(i, results[i])
    return results  # type: ignore[return-value]


def cache_stats() -> dict[str, int]:
    """{"entries", "bytes"} of the cubin cache (cubins and their facts files)."""
    entries = _entries()
    return {"entries": len(entries), "bytes": sum(_size(files) for files in entries.values())}


def clear_cache() -> dict[str, int]:
    """Removes every cache entry (and temp files of writes interrupted over an hour ago), nothing else;
    returns what was there (cache_stats before)."""
    before = cache_stats()
    for files in _entries().values():
        _remove_entry(files)
    for tmp in cubin_cache_dir().glob("[0-9a-f][0-9a-f]/*.tmp"):
        # _write_atomic's temp names start with the entry's name; a fresh one may be a write in progress
        if _ENTRY.match(tmp.name) and _last_used([tmp]) < time.time() - _STALE_TMP_S:
            tmp.unlink(missing_ok=True)
    for shard in cubin_cache_dir().glob("[0-9a-f][0-9a-f]"):
        try:
            shard.rmdir()  # only when empty
        except OSError:
            pass
    return before


__all__ = [
    "CompileFacts",
    "CompiledKernel",
    "compile_source",
    "compile_many",
    "parse_ptxas_log",
    "ptx_of",
    "cache_key",
    "cache_stats",
    "cache_limit_bytes",
    "clear_cache",
    "cubin_cache_dir",
]
