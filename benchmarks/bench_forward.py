"""Forward benchmark: vidrial.power_retention vs retention 1.0.7 (Triton) vs PyTorch SDPA (flash).

Shapes (docs: docs/BENCHMARKS.md): A = b1 t65536 h8 d64 p2 chunk1024 bf16 gating;
B = b8 t8192, same otherwise. Times: CUDA events around each call after an L2 flush, median of
--reps. TFLOP/s: docs/MATH.md section 6 useful FLOPs with the exact D = C(d+p-1, p) (d_tile = 1):
b*h*t*d*(4D + 2c). Per-kernel split: each of vidrial's four kernels timed alone on the same data.

retention autotunes over dozens of configs per kernel (minutes on first use); by default each of
its autotuners is limited to --retention-configs configs, so its numbers here can be worse than
its tuned ones (docs/BENCHMARKS.md: A 5.80 ms, B 5.97 ms).

    python benchmarks/bench_forward.py [--shapes A,B] [--reps 15] [--retention-configs 2]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from vidrial.tuning.measure import time_cuda

SHAPES = {
    "A": dict(b=1, t=65536, h=8, d=64, p=2, chunk=1024),
    "B": dict(b=8, t=8192, h=8, d=64, p=2, chunk=1024),
}
ANCHOR_RETENTION_MS = {"A": 5.80, "B": 5.97}
ANCHOR_SDPA_MS = {"A": 9.57, "B": 1.26}

def bench(fn, reps: int, warmup: int = 2) -> float:
    """Median ms of fn() over `reps` runs: CUDA events, L2 flushed before each (vidrial.tuning.measure)."""
    return time_cuda(fn, warmup=warmup, repeats=reps).median_ms


def useful_flops(b, t, h, d, p, c) -> float:
    D = math.comb(d + p - 1, p)
    return b * h * t * d * (4 * D + 2 * c)


def limit_triton_autotune(max_configs: int) -> None:
    from triton.runtime.autotuner import Autotuner

    for name, mod in list(sys.modules.items()):
        if not name.startswith("retention"):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > max_configs:
                k = len(obj.configs)
                idx = sorted({(i * k) // max_configs + k // (2 * max_configs) for i in range(max_configs)})
                obj.configs = [obj.configs[i] for i in idx if i < k]


def run_shape(name, shp, reps, retention_configs, gating=True, sweep=False):
    import vidrial
    from vidrial.kernels.power_retention.discumsum import discumsum_forward
    from vidrial.kernels.power_retention.intra_chunk_attention import intra_chunk_attention
    from vidrial.kernels.power_retention.query_state import query_state
    from vidrial.kernels.power_retention.sympow import default_d_tile
    from vidrial.kernels.power_retention.update_state import update_state

    b, t, h, d, p, c = (shp[k] for k in ("b", "t", "h", "d", "p", "chunk"))
    dt = default_d_tile(d, p)
    g = torch.Generator(device="cuda").manual_seed(0)
    Q = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    K = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    V = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    log_G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device="cuda", generator=g) + 4) if gating else None
    flops = useful_flops(b, t, h, d, p, c)
    rows = []

    f = lambda: vidrial.power_retention(Q, K, V, log_G, deg=p, chunk_size=c)  # noqa: E731
    t0 = time.perf_counter()
    f()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms_v = bench(f, reps)
    rows.append(("vidrial", ms_v))

    # per-kernel split
    n = t // c
    S, s = update_state(K, V, log_G, deg=p, d_tile=dt, chunk_size=c)
    L = log_G.view(b, n, c, h).sum(2) if gating else None
    st = discumsum_forward(S, s, L, fp32_states=False, bf16_copy=True, final_state=False)
    O, l, m = intra_chunk_attention(Q, K, V, log_G, deg=p, chunk_size=c, normalize=False)
    split = {
        "update_state": bench(lambda: update_state(K, V, log_G, deg=p, d_tile=dt, chunk_size=c), reps),
        "discumsum": bench(lambda: discumsum_forward(S, s, L, fp32_states=False, bf16_copy=True), reps),
        "intra_chunk_attention": bench(
            lambda: intra_chunk_attention(Q, K, V, log_G, deg=p, chunk_size=c, normalize=False), reps),
        "query_state": bench(lambda: query_state(Q, st["Sbar16"], st["sbar"], O, l, m, log_G, deg=p, d_tile=dt,
                                                 chunk_size=c, zero_first_state=True), reps),
    }
    # query_state config sweep (checked against the default config's output)
    if sweep:
        from vidrial.kernels.power_retention.query_state import FAMILY as QF
        from vidrial.kernels.power_retention.query_state import QueryStateConfig, QueryStateKey

        qkey = QueryStateKey(head_dim=d, deg=p, d_tile=dt, o_dtype="float32", chunk_size=c)
        base = QF.default_config(qkey)
        qs = lambda cfg: query_state(Q, st["Sbar16"], st["sbar"], O, l, m, log_G, deg=p, d_tile=dt,  # noqa: E731
                                     chunk_size=c, zero_first_state=True, config=cfg)
        Y0 = qs(base).double()
        mma_flops = 2 * b * h * t * d * __import__("vidrial.kernels.power_retention.sympow",
                                                     fromlist=["x"]).feature_dim(d, p, dt)
        print(f"[{name}] query_state sweep (MMA TFLOP/s with D={mma_flops // (2 * b * h * t * d)}):")
        for tm, tk, w, stg, fp, mc in [
                (128, 32, 4, 3, "auto", 1), (128, 32, 4, 3, "generic", 1), (64, 32, 4, 3, "auto", 1),
                (64, 64, 4, 3, "auto", 1), (128, 64, 4, 3, "auto", 1), (128, 32, 8, 3, "auto", 1),
                (256, 32, 8, 3, "auto", 1), (128, 16, 4, 4, "auto", 1), (64, 32, 2, 3, "auto", 1),
                (128, 64, 8, 2, "auto", 1), (256, 64, 8, 3, "auto", 1), (128, 32, 4, 3, "auto", 4),
                (128, 32, 8, 3, "auto", 2), (64, 32, 4, 3, "auto", 4), (128, 64, 4, 4, "auto", 1)]:
            cfg = QueryStateConfig(tile_m=tm, tile_k=tk, warps=w, stages=stg, feature_path=fp, min_ctas=mc)
            try:
                QF.check(qkey, cfg, "sm_90")
                Y1 = qs(cfg).double()
                err = ((Y1 - Y0).norm() / Y0.norm()).item()
                ms = bench(lambda: qs(cfg), reps)
                facts = QF.launchable(QF.compile_key(qkey), cfg, "sm_90").compiled.facts
                print(f"   {cfg.label():<72} {ms:7.3f} ms {mma_flops / ms / 1e9:6.1f} TFLOP/s  diff {err:.1e}  "
                      f"regs {facts.registers} spill {facts.spill_store_bytes}", flush=True)
            except Exception as exc:
                print(f"   {cfg.label():<62} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    del S, s, st, O, l, m

    # SDPA flash (causal), [b, h, t, d]
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (Q, K, V))
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    except ImportError:  # pragma: no cover
        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    rows.append(("sdpa_flash", bench(sdpa, reps)))
    del qh, kh, vh

    # retention (Triton)
    try:
        os.environ.setdefault("TRITON_NO_AUTOTUNE", "1")
        import retention.triton as rt

        limit_triton_autotune(retention_configs)
        fr = lambda: rt.power_retention(Q, K, V, log_G, deg=p, chunk_size=c)  # noqa: E731
        t0 = time.perf_counter()
        Yr = fr()
        torch.cuda.synchronize()
        rfirst = time.perf_counter() - t0
        rows.append(("retention_triton", bench(fr, reps)))
        Yv = f()
        diff = ((Yv.double() - Yr.double()).norm() / Yr.double().norm()).item()
    except Exception as exc:  # keep the other numbers
        print(f"[{name}] retention failed: {type(exc).__name__}: {exc}", flush=True)
        rfirst, diff = float("nan"), float("nan")

    print(f"\n=== shape {name}: b={b} t={t} h={h} d={d} p={p} chunk={c} bf16 gating={gating} "
          f"(vidrial D={__import__('vidrial.kernels.power_retention.sympow', fromlist=['x']).feature_dim(d, p, dt)}, "
          f"d_tile={dt}; FLOPs use exact D={math.comb(d + p - 1, p)}: {flops / 1e9:.1f} GFLOP)")
    print(f"{'impl':<18}{'ms':>9}{'TFLOP/s':>10}{'vidrial/impl':>14}")
    for impl, ms in rows:
        print(f"{impl:<18}{ms:>9.3f}{flops / ms / 1e9:>10.1f}{ms_v / ms:>14.2f}")
    print(f"anchors (tuned, docs/BENCHMARKS.md): retention {ANCHOR_RETENTION_MS[name]} ms, "
          f"sdpa {ANCHOR_SDPA_MS[name]} ms;"
          f" vidrial/retention_tuned = {ms_v / ANCHOR_RETENTION_MS[name]:.2f}")
    print("vidrial per-kernel split (each alone):")
    tot = sum(split.values())
    for k, v in split.items():
        print(f"  {k:<24}{v:>8.3f} ms  ({100 * v / tot:4.1f}%)")
    print(f"  {'sum':<24}{tot:>8.3f} ms; op total {ms_v:.3f} ms (rest: padding/gate glue, launches)")
    print(f"first call (compile/load) vidrial {first:.2f} s, retention {rfirst:.2f} s; "
          f"rel diff vidrial vs retention {diff:.2e}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="A,B")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--retention-configs", type=int, default=2)
    ap.add_argument("--no-gating", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a few query_state configs on shape A")
    args = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name in args.shapes.split(","):
        run_shape(name, SHAPES[name], args.reps, args.retention_configs, gating=not args.no_gating,
                  sweep=args.sweep and name == "A")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
