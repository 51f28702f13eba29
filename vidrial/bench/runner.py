"""Runs the benchmark cases in this process on the current GPU.

For every case and implementation: (vidrial only) a correctness check against the float64
reference on fresh inputs, before any timing; then, for each of `preset.input_sets` fresh input
sets, `vidrial.tuning.measure.time_cuda` (CUDA events, L2 flush before every repeat, warm-up,
median). The figure is the median of the per-set medians. Decode cases are also captured in a CUDA
graph (one step) and the replay is timed; the graph time is the figure when capture works (the
eager time is kept). Every (case, implementation) is wrapped: a failure is recorded with its reason
and the run goes on; an op that is not built yet is "not available"; a peer that is not installed
is "skipped: reason".
"""
from __future__ import annotations

import datetime as _dt
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from vidrial.bench import cases as C
from vidrial.bench.peers import IMPL_NAMES, dist_version

CHECK_SEED = 4242
SEED0 = 17

STATUS_OK = "ok"
STATUS_CHECK_FAILED = "check failed"
STATUS_SKIPPED = "skipped"
STATUS_NA = "not available"
STATUS_ERROR = "error"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict[str, str | None]:
    v: dict[str, str | None] = {"python": platform.python_version()}
    try:
        import torch

        v["torch"] = torch.__version__
        v["cuda"] = torch.version.cuda
    except Exception:
        v["torch"] = None
    for key, names in (("triton", ("triton",)), ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy")),
                       ("retention", ("retention",)), ("fla", ("fla-core", "flash-linear-attention")),
                       ("numpy", ("numpy",)), ("matplotlib", ("matplotlib",))):
        v[key] = dist_version(*names)
    try:
        from vidrial import __version__

        v["vidrial"] = __version__
    except Exception:
        v["vidrial"] = None
    v["vidrial_git"] = _git_rev()
    return v


def _git_rev() -> str | None:
    import subprocess
    from pathlib import Path

    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        rev = out.stdout.strip()
        if not rev:
            return None
        # a tree that differs from HEAD (e.g. a copied working tree) is not that commit: say so
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return None


def gpu_info() -> dict[str, Any]:
    try:
        import torch

        if not torch.cuda.is_available():
            return {"name": None, "note": "no CUDA device"}
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        return {"name": p.name, "index": i, "capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count, "memory_bytes": int(p.total_memory),
                "l2_bytes": int(getattr(p, "L2_cache_size", 0) or 0)}
    except Exception as exc:
        return {"name": None, "note": f"{type(exc).__name__}: {exc}"}


def _sync():
    try:
        import torch

        torch.cuda.synchronize()
    except Exception:
        pass


def _free(collect: bool = False):
    try:
        import gc

        import torch

        if collect:
            gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def graph_replay(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Capture one call of `fn` in a CUDA graph (after warm-up on a side stream); returns replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    graph_replay.keep.append(g)  # the graph owns its memory pool; keep it alive while it is timed
    return g.replay


graph_replay.keep = []  # type: ignore[attr-defined]


def _last_dispatch() -> dict[str, Any] | None:
    """What vidrial's dispatcher chose for the last kernel of the call (tuned exact / nearest /
    default config), so a reader knows whether the GPU had tuned configs."""
    try:
        from vidrial.dispatch import last_dispatch

        d = last_dispatch()
        return None if d is None else _json_safe(d.as_dict())
    except Exception:
        return None


def _json_safe(x: Any) -> Any:
    import json

    try:
        return json.loads(json.dumps(x, default=str))
    except Exception:
        return str(x)


def _status_of_skip(text: str) -> str:
    return STATUS_NA if text.startswith("not available") else STATUS_SKIPPED


def run_impl(case: C.Case, impl: C.Impl, preset: C.Preset, *, over_budget: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    row: dict[str, Any] = case.describe()
    row.update(impl=impl.name, flops=impl.flops, bytes=impl.bytes, status=None, note=impl.note or "")
    if impl.skipped:
        row.update(status=_status_of_skip(impl.skipped), note=impl.skipped)
        return row
    if over_budget:
        row.update(status=STATUS_SKIPPED, note=f"skipped: past the preset's time budget ({preset.budget_s:g} s)")
        return row
    t_start = time.perf_counter()
    try:
        if impl.check is not None:
            chk = impl.check(CHECK_SEED)
            _sync()
            chk["passed"] = bool(chk["rel_err"] <= chk["tol"])
            row["check"] = chk
            _free()
        timing = dict(warmup_ms=preset.warmup_ms, rep_ms=preset.rep_ms, max_repeats=preset.max_repeats)
        from vidrial.tuning.measure import time_cuda

        eager, graph, graph_note = [], [], None
        for i in range(preset.input_sets):
            fn = impl.make(SEED0 + i)
            if i == 0:
                t0 = time.perf_counter()
                fn()
                _sync()
                row["first_call_s"] = time.perf_counter() - t0
                if impl.name == "vidrial":
                    row["last_dispatch"] = _last_dispatch()
            eager.append(time_cuda(fn, **timing))
            if case.kind == "decode" and graph_note is None:
                try:
                    graph.append(time_cuda(graph_replay(fn), **timing))
                except Exception as exc:  # capture is not possible for every implementation
                    _sync()
                    graph_note = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); eager time"
                    graph = []
            fn = None
            graph_replay.keep.clear()
            _free()
        row["eager_ms"] = statistics.median(t.median_ms for t in eager)
        row["per_set_ms"] = [t.median_ms for t in eager]
        row["timing"] = [t.as_dict() for t in eager]
        if graph:
            row["graph_ms"] = statistics.median(t.median_ms for t in graph)
            row["per_set_graph_ms"] = [t.median_ms for t in graph]
            row["ms"] = row["graph_ms"]
            row["timed"] = "CUDA graph replay"
        else:
            row["ms"] = row["eager_ms"]
            row["timed"] = "eager"
            if graph_note:
                row["note"] = "; ".join(x for x in (row["note"], graph_note) if x)
        chk = row.get("check")
        row["status"] = STATUS_OK if chk is None or chk["passed"] else STATUS_CHECK_FAILED
    except NotImplementedError as exc:
        row.update(status=STATUS_NA, note=f"not available: {str(exc)[:300]}")
    except Exception as exc:
        row.update(status=STATUS_ERROR, note=f"{type(exc).__name__}: {str(exc)[:400]}",
                   traceback=traceback.format_exc(limit=6)[-2000:])
    finally:
        graph_replay.keep.clear()
        _sync()
        _free(collect=True)
    row["wall_s"] = time.perf_counter() - t_start
    return row


def derive(rows: list[dict[str, Any]], ceilings: dict[str, Any]) -> None:
    """Adds throughput, fraction of the ceiling and the speed ratios to each peer (in place).

    vs[peer] = peer ms / this ms: above 1 this implementation is faster than that peer."""
    mm = (ceilings.get("matmul") or {}).get("flops_per_s")
    cp = (ceilings.get("copy") or {}).get("bytes_per_s")
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    for r in rows:
        ms = r.get("ms")
        if not ms:
            continue
        sec = ms * 1e-3
        s = r["shape"]
        if r["kind"] == "decode":
            r["us_per_step"] = ms * 1e3
            if r.get("bytes"):
                r["bytes_per_s"] = r["bytes"] / sec
                r["ceiling_fraction"] = r["bytes_per_s"] / cp if cp else None
                r["ceiling"] = "copy"
        else:
            r["tokens_per_s"] = s["b"] * s["t"] / sec
            if r.get("flops"):
                r["flops_per_s"] = r["flops"] / sec
                r["ceiling_fraction"] = r["flops_per_s"] / mm if mm else None
                r["ceiling"] = "matmul"
        r["vs"] = {p: other["ms"] / ms for p, other in by_case[r["case"]].items()
                   if p != r["impl"] and other.get("ms")}


def _order(cases: list[C.Case]) -> list[C.Case]:
    """Standard shapes (A, B) and decode first, so a time budget cuts the sweep's extra points."""
    key = {id(c): (0 if ({"A", "B", "decode"} & set(c.tags)) else 1, i) for i, c in enumerate(cases)}
    return sorted(cases, key=lambda c: key[id(c)])


def run(preset: C.Preset, kinds: tuple[str, ...] = C.KINDS, *, autotune_configs: int | None = None,
        skip_peers: tuple[str, ...] = (), budget_s: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        log: Callable[[str], None] = print, progress: bool | None = False) -> dict[str, Any]:
    """Runs the preset; returns the result document (see report.py). `on_progress(doc)` is called
    after each case (the command writes the JSON there, so a crash leaves the numbers so far).
    progress: a tqdm bar on stderr over the (case, impl) runs (None: only when stderr is a terminal)."""
    from vidrial.bench import ceilings as ceil
    from vidrial.bench.peers import load_all

    t0 = time.perf_counter()
    budget = preset.budget_s if budget_s is None else budget_s
    ac = preset.autotune_configs if autotune_configs is None else autotune_configs
    doc: dict[str, Any] = {
        "schema": "vidrial-bench/1", "date": _now(), "preset": preset.name, "kinds": list(kinds),
        "gpu": gpu_info(), "versions": versions(), "command": " ".join(sys.argv),
        "settings": {"preset": dict(vars(preset)), "autotune_configs": ac, "budget_s": budget,
                     "check_tokens": C.CHECK_TOKENS, "fwd_tol": C.FWD_TOL, "grad_tol": C.GRAD_TOL,
                     "fwd_bwd_factor": C.FWD_BWD_FACTOR,
                     "inputs": "bf16 randn; log_G = logsigmoid(randn + 4); deg 2, d 64, h 8, chunk 1024; "
                               "default d_tile; FLOPs with the exact D = C(d+p-1, p)"},
        "peers": {}, "ceilings": {}, "results": [],
    }
    log(f"vidrial bench --preset {preset.name}: {doc['gpu'].get('name')} ({doc['date']})")
    peers = load_all(ac, skip=skip_peers)
    doc["peers"] = {n: p.as_dict() for n, p in peers.items()}
    for n in IMPL_NAMES:
        p = peers[n]
        log(f"  {n:<10} {'ok' if p.available else ''} {p.version or ''} {p.note} "
            + " ".join(f"[{k}: {v}]" for k, v in p.missing.items()))
    timing = dict(warmup_ms=preset.warmup_ms, rep_ms=preset.rep_ms, max_repeats=preset.max_repeats)
    doc["ceilings"] = ceil.measure(**timing)
    cp, mm = doc["ceilings"]["copy"].get("bytes_per_s"), doc["ceilings"]["matmul"].get("flops_per_s")
    log(f"  ceilings: copy {cp / 1e12 if cp else float('nan'):.2f} TB/s (read+write), "
        f"bf16 matmul {mm / 1e12 if mm else float('nan'):.0f} TFLOP/s")
    all_cases = _order(C.build_cases(preset, kinds, peers))
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(all_cases) * len(IMPL_NAMES), desc="bench", unit="run", file=sys.stderr,
               disable=not show, dynamic_ncols=True)
    for k, case in enumerate(all_cases):
        for name in IMPL_NAMES:
            over = bool(budget) and (time.perf_counter() - t0) > budget
            try:
                row = run_impl(case, case.impls[name], preset, over_budget=over, log=log)
            except Exception as exc:  # belt and braces: run_impl catches its own failures
                row = case.describe()
                row.update(impl=name, status=STATUS_ERROR, note=f"{type(exc).__name__}: {exc}")
            doc["results"].append(row)
            with tqdm.external_write_mode():  # the row's line above the bar, not through it
                log(_line(time.perf_counter() - t0, k + 1, len(all_cases), row))
            bar.update(1)
        derive(doc["results"], doc["ceilings"])
        doc["elapsed_s"] = time.perf_counter() - t0
        if on_progress is not None:
            try:
                on_progress(doc)
            except Exception as exc:
                log(f"  (could not write progress: {exc})")
    bar.close()
    doc["elapsed_s"] = time.perf_counter() - t0
    log(f"done in {doc['elapsed_s']:.0f} s")
    return doc


def _line(elapsed: float, k: int, n: int, r: dict[str, Any]) -> str:
    head = f"[{elapsed:6.1f}s {k}/{n}] {r['case']:<34} {r['impl']:<10}"
    if r.get("ms") is not None:
        chk = r.get("check")
        c = "" if chk is None else f" check {chk['rel_err']:.1e}{'' if chk['passed'] else ' FAILED'}"
        return f"{head} {r['ms']:9.3f} ms{c} {r.get('timed', '') if r['kind'] == 'decode' else ''}"
    return f"{head} {r['status']}: {r.get('note', '')}"


__all__ = ["run", "run_impl", "derive", "versions", "gpu_info"]
