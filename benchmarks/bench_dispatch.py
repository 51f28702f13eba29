"""Per-call host overhead of `vidrial.dispatch.select_config` with a warm index.

    python benchmarks/bench_dispatch.py [--entries 200] [--number 20000] [--repeat 7] [--json]

Builds a throwaway user tuned dir with `--entries` tuned keys for a synthetic family
(over templates/testing/noop.cu.j2), warms the index and the per-key memo, then times
`select_config(family, key, gpu)` with timeit for keys that hit exactly, through the
nearest key and through the default, each with a fresh (equal, not identical) key object
as a caller would build one. Reports the median over `--repeat` runs in microseconds.
Target: < 10 us per call. With a CUDA GPU present it also times `gpu=None` (identity of
the current device looked up per call). Speed is reported here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import timeit
from pathlib import Path
from typing import ClassVar

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from vidrial import dispatch  # noqa: E402
from vidrial.core.config import KernelConfig, ProblemKey  # noqa: E402
from vidrial.core.family import KernelFamily  # noqa: E402
from vidrial.dispatch.store import GpuIdentity, record  # noqa: E402

TARGET_US = 10.0


class BenchConfig(KernelConfig):
    block: int = 128
    unroll: int = 1


class BenchKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "d")
    dtype: str = "bfloat16"
    d: int = 64
    bh: int = 1
    t: int = 1024


class BenchFamily(KernelFamily):
    name = "bench_dispatch_noop"
    template = "testing/noop.cu.j2"
    Config = BenchConfig
    Key = BenchKey
    signature = ("ptr", "ptr", "i64")

    def default_config(self, key):
        return BenchConfig()

    def render_context(self, key, config):
        return {"scale": 1.0}

    def threads_per_block(self, config):
        return config.block

    def dynamic_smem_bytes(self, key, config):
        return 0


def _median_us(fn, number: int, repeat: int) -> float:
    runs = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e6


def measure(entries: int = 200, number: int = 20000, repeat: int = 7) -> dict:
    """Times warm `select_config` calls; returns {"median_us", "per_source_us", ...}.

    Uses a temporary VIDRIAL_TUNED_DIR and calls `dispatch.reload()` before and after."""
    family = BenchFamily()
    gpu = GpuIdentity(name="Bench GPU", arch="sm_90", sm_count=132)
    saved = os.environ.get("VIDRIAL_TUNED_DIR")
    with tempfile.TemporaryDirectory(prefix="vidrial-bench-") as tmp:
        os.environ["VIDRIAL_TUNED_DIR"] = tmp
        try:
            dispatch.reload()
            bhs = [2**i for i in range(0, 10)]
            ts = [2**i for i in range(8, 18)]
            grid = [(bh, t) for bh in bhs for t in ts][:entries]
            for i, (bh, t) in enumerate(grid):
                record(family, BenchKey(bh=bh, t=t), BenchConfig(block=32 * (1 + i % 8)), gpu=gpu,
                       time_ms=1.0, default_time_ms=1.5, trials=1)
            dispatch.reload()
            cases = {
                "exact": lambda: BenchKey(bh=grid[len(grid) // 2][0], t=grid[len(grid) // 2][1]),
                "nearest": lambda: BenchKey(bh=3, t=3000),
                "default": lambda: BenchKey(dtype="float16", d=128, bh=4, t=4096),
            }
            per_source: dict[str, float] = {}
            sources: dict[str, str] = {}
            select = dispatch.select_config
            for name, make in cases.items():
                select(family, make(), gpu)  # warm: builds the index and memoises the key
                sources[name] = dispatch.last_dispatch().source
                key = make()  # equal to the memoised key, not the same object
                per_source[name] = _median_us(lambda: select(family, key, gpu), number, repeat)
            result = {
                "median_us": statistics.median(per_source.values()),
                "max_us": max(per_source.values()),
                "per_source_us": per_source,
                "sources": sources,
                "entries": len(grid),
                "target_us": TARGET_US,
            }
            try:
                import torch

                if torch.cuda.is_available():
                    key = cases["exact"]()
                    select(family, key)
                    result["current_gpu_us"] = _median_us(lambda: select(family, key), number, repeat)
            except Exception as exc:  # pragma: no cover - GPU-only path
                result["current_gpu_error"] = str(exc)
            return result
        finally:
            if saved is None:
                os.environ.pop("VIDRIAL_TUNED_DIR", None)
            else:
                os.environ["VIDRIAL_TUNED_DIR"] = saved
            dispatch.reload()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.entries, args.number, args.repeat)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"select_config warm host overhead ({result['entries']} tuned entries), median of {args.repeat} "
          f"x {args.number} calls:")
    for name, us in result["per_source_us"].items():
        print(f"  {name:8s} {us:6.2f} us  (resolved as {result['sources'][name]})")
    if "current_gpu_us" in result:
        print(f"  gpu=None {result['current_gpu_us']:6.2f} us  (current device looked up per call)")
    verdict = "OK" if result["max_us"] < TARGET_US else "OVER TARGET"
    print(f"median {result['median_us']:.2f} us, max {result['max_us']:.2f} us; target < {TARGET_US} us: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
