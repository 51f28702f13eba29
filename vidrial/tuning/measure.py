"""Timing GPU work with CUDA events: L2 flush before every repeat, warm-up, median.

Used by the tuner's measurement worker and by benchmarks:

    from vidrial.tuning.measure import time_cuda
    t = time_cuda(lambda: op(x, y))          # Timing(median_ms=..., ...)

Each repeat writes a buffer larger than the L2 cache (so every repeat starts with a cold
L2, as in a real model where other layers ran in between), then records a start event,
runs `fn`, records an end event. Events of all repeats are read after one synchronise at
the end, so the host never stalls the GPU between repeats. The number of warm-up runs
and repeats comes from a first estimate of one call's time and the time budgets, within
[min_repeats, max_repeats].
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_L2_FALLBACK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Times of one measurement, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    times_ms: tuple[float, ...] = ()

    def as_dict(self, with_times: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_times:
            d.pop("times_ms")
        else:
            d["times_ms"] = list(self.times_ms)
        return d

    @classmethod
    def from_times(cls, times_ms: list[float], warmup: int = 0) -> Timing:
        if not times_ms:
            raise ValueError("no times")
        return cls(median_ms=float(statistics.median(times_ms)), min_ms=float(min(times_ms)),
                   max_ms=float(max(times_ms)), mean_ms=float(statistics.fmean(times_ms)),
                   repeats=len(times_ms), warmup=warmup, times_ms=tuple(float(t) for t in times_ms))


def l2_cache_bytes(device: Any = None) -> int:
    import torch

    props = torch.cuda.get_device_properties(device)
    size = int(getattr(props, "L2_cache_size", 0) or 0)
    return size if size > 0 else DEFAULT_L2_FALLBACK_BYTES


class L2Flusher:
    """Writes a buffer of twice the L2 size (at least 64 MiB) on the current stream."""

    _buffers: dict[int, Any] = {}

    def __init__(self, device: Any = None):
        import torch

        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        buf = self._buffers.get(dev.index)
        if buf is None:
            n = max(2 * l2_cache_bytes(dev), DEFAULT_L2_FALLBACK_BYTES)
            buf = torch.empty(n // 4, dtype=torch.int32, device=dev)
            self._buffers[dev.index] = buf
        self.buffer = buf

    def __call__(self) -> None:
        self.buffer.zero_()


def time_cuda(
    fn: Callable[[], Any],
    *,
    device: Any = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_repeats: int = 5,
    max_repeats: int = 200,
    warmup: int | None = None,
    repeats: int | None = None,
    flush_l2: bool = True,
) -> Timing:
    """Median time of `fn()` (which launches GPU work on the current stream), in ms.

    `warmup` / `repeats` fix the counts; otherwise they follow from `warmup_ms` / `rep_ms`
    and a first estimate, clipped to [1, ...] and [min_repeats, max_repeats]."""
    import torch

    if device is not None:
        torch.cuda.set_device(device)
    stream = torch.cuda.current_stream()
    flush = L2Flusher(device) if flush_l2 else (lambda: None)

    # estimate one call (after a first call that may load modules / allocate)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(3):
        fn()
    end.record(stream)
    end.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)

    n_warm = warmup if warmup is not None else max(1, int(warmup_ms / estimate))
    n_rep = repeats if repeats is not None else max(min_repeats, min(max_repeats, int(rep_ms / estimate)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        flush()
        s.record(stream)
        fn()
        e.record(stream)
    torch.cuda.synchronize()
    return Timing.from_times([s.elapsed_time(e) for s, e in zip(starts, ends)], warmup=n_warm)


__all__ = ["Timing", "time_cuda", "L2Flusher", "l2_cache_bytes"]
