"""Decode-step benchmark (issue 5): one new token per step, b in {1, 8, 64}, h=8, d=64, p=2.

    python3 benchmarks/bench_decode.py [--batches 1 8 64] [--no-retention] [--out bench_decode.json]

Columns, per batch size b (state for a long history, KV heads h = query heads = 8):
  vidrial fp32 / bf16 state : vidrial.power_retention_inference, cache = the new token only
                              (D = 2304, d_tile 8), one fused launch per step
  vidrial fp32, cache 256   : same with 256 cached tokens (the middle of a 512-token window)
  retention                 : retention 1.0.7 (Triton) power_retention_inference, same shapes
                              (its state: D = 2560, bf16, + fp32 sum of keys)
  SDPA                      : torch scaled_dot_product_attention of the new token against a
                              65536-token bf16 KV cache
Timing: every case is captured in a CUDA graph (one step) and replayed; each replay is queued
behind an L2 flush (a 256 MB write) and timed with CUDA events: "graph us" is the step's GPU time
(what a graph-replayed decode loop pays per token), median of --iters. "eager us" is a plain Python
call after the flush has finished (torch.cuda.synchronize), so it includes the Python and launch
overhead (the latency of an un-graphed step). Cases that cannot be captured have no graph time. GB/s = bytes the step must read (state +
sum of keys + cache, or the KV cache for SDPA) / time, against the device copy ceiling measured
in the same run ((read + write) / time of a 1 GiB device-to-device copy).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, D_HEAD, DEG = 8, 64, 2
DEV = "cuda"


def _flush_buffer():
    return torch.empty(64 << 20, dtype=torch.float32, device=DEV)


def time_fn(fn, iters: int, flush, graph: bool) -> tuple[float | None, str]:
    """Median microseconds of fn() (graph-replayed when graph=True), L2 flushed before each run."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            run = g.replay
        except Exception as exc:  # noqa: BLE001 - report and fall back
            torch.cuda.synchronize()
            return None, f"graph capture failed: {type(exc).__name__}: {str(exc)[:120]}"
    times = []
    for _ in range(iters):
        flush.zero_()
        if not graph:
            # eager: the GPU waits for the Python call, so the time includes its overhead (latency)
            torch.cuda.synchronize()
        # graph: the replay is queued behind the flush, so the time is the step's GPU time
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times), ""


def copy_ceiling_gbs(flush) -> float:
    """(read + write) bytes / time of a 1 GiB device copy, GB/s (median of 20)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def vidrial_case(b: int, state_dtype, cache_len: int):
    from vidrial import power_retention_inference
    from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim

    dt = default_d_tile(D_HEAD, DEG)
    D = feature_dim(D_HEAD, DEG, dt)
    q = torch.randn(b, 1, H, D_HEAD, device=DEV).bfloat16()
    K = torch.randn(b, cache_len, H, D_HEAD, device=DEV).bfloat16()
    V = torch.randn(b, cache_len, H, D_HEAD, device=DEV).bfloat16()
    G = torch.nn.functional.logsigmoid(4 + torch.randn(b, cache_len, H, device=DEV))
    S = (torch.randn(b, H, D, D_HEAD, device=DEV) * 0.01).to(state_dtype)
    z = torch.rand(b, H, D, device=DEV) * 100

    def fn():
        return power_retention_inference(q, K, V, G, S, z, deg=DEG, switch_over_seq_len=512)

    nbytes = S.numel() * S.element_size() + z.numel() * 4 + 2 * K.numel() * 2 + G.numel() * 4
    return fn, nbytes


def retention_case(b: int, cache_len: int):
    import retention
    from retention._utils import compute_expanded_dim

    D = compute_expanded_dim(D_HEAD, DEG)
    q = torch.randn(b, 1, H, D_HEAD, device=DEV).bfloat16()
    K = torch.randn(b, cache_len, H, D_HEAD, device=DEV).bfloat16()
    V = torch.randn(b, cache_len, H, D_HEAD, device=DEV).bfloat16()
    G = torch.nn.functional.logsigmoid(4 + torch.randn(b, cache_len, H, device=DEV))
    S = (torch.randn(b, H, D, D_HEAD, device=DEV) * 0.01).bfloat16()
    z = torch.rand(b, H, D, device=DEV) * 100

    def fn():
        return retention.power_retention_inference(q, K, V, G, S, z, deg=DEG, scale=1.0 / math.sqrt(D_HEAD),
                                                   switch_over_seq_len=512)

    nbytes = S.numel() * 2 + z.numel() * 4 + 2 * K.numel() * 2 + G.numel() * 4
    return fn, nbytes


def sdpa_case(b: int, kv_len: int = 65536):
    q = torch.randn(b, H, 1, D_HEAD, device=DEV).bfloat16()
    K = torch.randn(b, H, kv_len, D_HEAD, device=DEV).bfloat16()
    V = torch.randn(b, H, kv_len, D_HEAD, device=DEV).bfloat16()

    def fn():
        return torch.nn.functional.scaled_dot_product_attention(q, K, V)

    return fn, 2 * K.numel() * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-retention", action="store_true", help="skip retention (its Triton autotune is slow)")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--out", default="bench_decode.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode: no CUDA device")
    flush = _flush_buffer()
    ceiling = copy_ceiling_gbs(flush)
    dev_name = torch.cuda.get_device_name()
    print(f"# {dev_name}; copy ceiling {ceiling:.0f} GB/s (read+write); h={H} d={D_HEAD} p={DEG}; medians of "
          f"{args.iters} L2-flushed runs")
    cases = [("vidrial fp32 state", lambda b: vidrial_case(b, torch.float32, 1)),
             ("vidrial bf16 state", lambda b: vidrial_case(b, torch.bfloat16, 1)),
             ("vidrial fp32, cache 256", lambda b: vidrial_case(b, torch.float32, 256))]
    if not args.no_retention:
        cases.append(("retention 1.0.7 (Triton)", lambda b: retention_case(b, 1)))
    if not args.no_sdpa:
        cases.append(("SDPA, 65536-token KV cache", sdpa_case))
    rows = []
    header = f"{'case':28s} {'b':>3s} {'graph us':>9s} {'eager us':>9s} {'MB read':>8s} {'GB/s':>7s} {'% copy':>7s}  note"
    print(header)
    print("-" * len(header))
    out_path = Path(args.out)
    for b in args.batches:
        for name, make in cases:
            row = dict(case=name, b=b, h=H, d=D_HEAD, deg=DEG)
            try:
                fn, nbytes = make(b)
                t0 = time.perf_counter()
                e_us, _ = time_fn(fn, args.iters, flush, graph=False)  # eager first: a failed capture
                g_us, note = time_fn(fn, args.iters, flush, graph=True)  # cannot hide the eager number
                best = g_us if g_us is not None else e_us
                gbs = nbytes / (best * 1e-6) / 1e9
                row.update(graph_us=g_us, eager_us=e_us, bytes=nbytes, gbs=gbs, copy_fraction=gbs / ceiling,
                           note=note, seconds=time.perf_counter() - t0)
                print(f"{name:28s} {b:3d} {g_us if g_us is not None else float('nan'):9.1f} {e_us:9.1f} "
                      f"{nbytes / 1e6:8.1f} {gbs:7.0f} {100 * gbs / ceiling:6.1f}%  {note}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a failing peer must not hide the others
                row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                print(f"{name:28s} {b:3d}   error: {row['error']}", flush=True)
            finally:
                fn = None
                torch.cuda.empty_cache()
            rows.append(row)
            out_path.write_text(json.dumps(dict(device=dev_name, copy_ceiling_gbs=ceiling, torch=torch.__version__,
                                                python=platform.python_version(), rows=rows), indent=1))
    # the bar: beat both peers at b=8, goal <= 20 us per step
    def best_us(case, b):
        for r in rows:
            if r["case"] == case and r["b"] == b and "error" not in r:
                return r["graph_us"] if r.get("graph_us") is not None else r["eager_us"]
        return None
    ours = [best_us(c, 8) for c in ("vidrial fp32 state", "vidrial bf16 state")]
    peers = [best_us(c, 8) for c in ("retention 1.0.7 (Triton)", "SDPA, 65536-token KV cache")]
    if 8 in args.batches and all(v is not None for v in ours):
        msg = f"b=8: vidrial {min(ours):.1f} us (fp32 state {ours[0]:.1f}, bf16 {ours[1]:.1f})"
        msg += "; peers " + ", ".join(f"{v:.1f} us" for v in peers if v is not None)
        msg += f"; goal <= 20 us: {'met' if min(ours) <= 20 else 'NOT met'}"
        print(msg)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
