"""Intra-chunk power attention: vidrial vs retention 1.0.7 (Triton) vs PyTorch SDPA (flash).

    python benchmarks/bench_intra_chunk_attention.py [--shapes A,B,Q] [--reps 30] [--no-retention]
                                                     [--configs default|sweep] [--json out.json]

Shapes (docs/BENCHMARKS.md): A: b=1, t=65536, h=8, d=64, p=2, chunk 1024, bf16, gating;
B: b=8, t=8192, same otherwise; Q: the quadratic path, b=1, t=16384, h=8, normalised output;
A0, Q0: A and Q without gating. Gates are logsigmoid(U(-1, 5)) per step (about -0.35 on average),
so with gating a query's weights on keys more than a few hundred steps back underflow to 0 in
float32 and the kernel stops walking back there (exactly: see the template); A0/Q0 do all the work.
Timing: CUDA events around each call after an L2 flush (256 MB memset), median of --reps.
Useful FLOPs (docs/MATH.md section 6): causal intra-chunk attention = 2 c^2 d per chunk per head
(QK^T and PV over the causal half), i.e. 2 * c * t * d * b * hq; quadratic: 2 t^2 d * b * hq.
Peers: retention's Triton attention called the way retention calls it (chunk views, cumsum'd
gates, norm=False; its own autotune runs on the first call), with and without its torch gate
cumsum in the timing, SDPA flash causal on the same chunk views (no power, no gating: a speed
yardstick) and SDPA causal on the full sequence.

Measured on an H200 (2026-11-28, 15 reps, default config tile_m=128 tile_n=64 warps=4 stages=2),
before the launcher's gate cumsum was moved to an innermost-dimension scan (that torch scan over
[b, t, h] along t cost a fixed ~0.23 ms at shapes A/B and ~3.4 ms at Q; not re-measured since):
    A  gated  0.545 ms (incl. ~0.23 ms cumsum)  | retention 1.711 ms (its cumsum included)  | SDPA chunks 0.319
    B  gated  0.547 ms (incl. ~0.23 ms cumsum)  | retention 1.712 ms                         | SDPA chunks 0.319
    A0 ungated 0.315 ms (218 TFLOP/s)           | retention 0.822 ms                         | SDPA chunks 0.323
    Q0 ungated 0.856 ms (321 TFLOP/s; stages=3: 0.831)                                       | SDPA full 1.140
    Q  gated  4.245 ms (almost all of it the old cumsum)                                     | SDPA full 1.114
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vidrial.tuning.measure import time_cuda  # noqa: E402

from vidrial.kernels.power_retention.intra_chunk_attention import (  # noqa: E402
    IntraChunkAttentionConfig as Config,
    family,
    intra_chunk_attention,
)

SHAPES = {
    "A": dict(b=1, t=65536, h=8, d=64, deg=2, chunk=1024, gating=True, normalize=False),
    "B": dict(b=8, t=8192, h=8, d=64, deg=2, chunk=1024, gating=True, normalize=False),
    "Q": dict(b=1, t=16384, h=8, d=64, deg=2, chunk=0, gating=True, normalize=True),
    # without gating (nothing decays, so no early exit: the full causal work)
    "A0": dict(b=1, t=65536, h=8, d=64, deg=2, chunk=1024, gating=False, normalize=False),
    "Q0": dict(b=1, t=16384, h=8, d=64, deg=2, chunk=0, gating=False, normalize=True),
}
SWEEP = [
    Config(tile_m=128, tile_n=64, warps=4, stages=2),
    Config(tile_m=128, tile_n=64, warps=4, stages=3),
    Config(tile_m=128, tile_n=128, warps=8, stages=2),
    Config(tile_m=64, tile_n=64, warps=4, stages=2),
    Config(tile_m=64, tile_n=64, warps=4, stages=2, min_ctas=3),
    Config(tile_m=64, tile_n=64, warps=4, stages=2, min_ctas=3, q_in_regs=False),
    Config(tile_m=128, tile_n=64, warps=4, stages=2, q_in_regs=False),
    Config(tile_m=256, tile_n=64, warps=8, stages=2),
    Config(tile_m=128, tile_n=64, warps=4, stages=2, rescale_log2=0),
]

def time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median ms of fn() over `reps` runs: CUDA events, L2 flushed before each (vidrial.tuning.measure)."""
    return time_cuda(fn, warmup=warmup, repeats=reps).median_ms


def make_inputs(b, t, h, d, gating, seed=0, **_):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Q = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    K = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    V = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    log_G = F.logsigmoid(torch.rand(b, t, h, device="cuda", generator=g) * 6 - 1) if gating else None
    return Q, K, V, log_G


def useful_flops(b, t, h, d, chunk, **_) -> float:
    if chunk:
        return 2.0 * chunk * t * d * b * h
    return 2.0 * t * t * d * b * h


def bench_shape(name: str, reps: int, configs: list, with_retention: bool, log) -> dict:
    s = SHAPES[name]
    b, t, h, d, deg, c = s["b"], s["t"], s["h"], s["d"], s["deg"], s["chunk"]
    Q, K, V, log_G = make_inputs(**s)
    flops = useful_flops(**s)
    res = {"shape": name, **s, "useful_gflop": flops / 1e9, "vidrial": {}}

    def report(label, ms):
        tf = flops / ms / 1e9
        log(f"  {name} {label:58s} {ms:8.3f} ms  {tf:7.1f} TFLOP/s")

    for cfg in configs:
        try:
            fn = lambda cfg=cfg: intra_chunk_attention(Q, K, V, log_G, deg=deg, chunk_size=c,  # noqa: E731
                                                       normalize=s["normalize"], config=cfg)
            fn()
            ms = time_ms(fn, reps)
        except Exception as exc:  # a config that does not fit this shape: report and go on
            log(f"  {name} vidrial {cfg.label()}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        res["vidrial"][cfg.label()] = ms
        report(f"vidrial {cfg.label()}", ms)
    best = min(res["vidrial"].values()) if res["vidrial"] else float("nan")
    res["vidrial_best_ms"] = best

    # SDPA flash: on the chunk views (same causal work, softmax instead of power) and on the full sequence
    qh, kh, vh = (x.transpose(1, 2) for x in (Q, K, V))
    if c:
        n = t // c
        qc, kc, vc = (x.reshape(b * n, c, h, d).transpose(1, 2) for x in (Q, K, V))
        try:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                ms = time_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True), reps)
            res["sdpa_flash_chunks_ms"] = ms
            report("SDPA flash, causal on the chunk views", ms)
        except Exception as exc:
            log(f"  SDPA flash (chunks) failed: {exc}")
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            ms = time_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), reps)
        res["sdpa_flash_full_ms"] = ms
        log(f"  {name} {'SDPA flash, causal over the full sequence (more work)':58s} {ms:8.3f} ms")
    except Exception as exc:
        log(f"  SDPA flash (full) failed: {exc}")

    if with_retention:
        try:
            from retention._attention.triton import attention as rt_attention

            scale = 1.0 / math.sqrt(d)
            if c:
                n = t // c
                def rt():
                    g = log_G.view(b, n, c, h).cumsum(2).view(b * n, c, h) if log_G is not None else None
                    return rt_attention(Q.view(b * n, c, h, d), K.view(b * n, c, h, d), V.view(b * n, c, h, d),
                                        g, deg, scale=scale, norm=False)
            else:
                def rt():
                    g = log_G.cumsum(1) if log_G is not None else None
                    return rt_attention(Q, K, V, g, deg, scale=scale, norm=True)
            t0 = time.perf_counter()
            rt()
            torch.cuda.synchronize()
            log(f"  {name} retention first call (Triton autotune) {time.perf_counter() - t0:.1f} s")
            ms = time_ms(rt, reps)
            res["retention_triton_ms"] = ms
            report("retention 1.0.7 Triton attention (incl. its gate cumsum)", ms)
            if log_G is not None:  # the kernel alone: gates cumsum'd (retention's way) outside the timing
                if c:
                    g0 = log_G.view(b, t // c, c, h).cumsum(2).view(b * (t // c), c, h)
                    qv, kv, vv = (x.view(b * (t // c), c, h, d) for x in (Q, K, V))
                    rt_kernel = lambda: rt_attention(qv, kv, vv, g0, deg, scale=scale, norm=False)  # noqa: E731
                else:
                    g0 = log_G.cumsum(1)
                    rt_kernel = lambda: rt_attention(Q, K, V, g0, deg, scale=scale, norm=True)  # noqa: E731
                ms = time_ms(rt_kernel, reps)
                res["retention_triton_kernel_ms"] = ms
                report("retention 1.0.7 Triton attention kernel only", ms)
        except Exception as exc:
            log(f"  retention failed: {type(exc).__name__}: {exc}")
    for peer in ("retention_triton_ms", "retention_triton_kernel_ms", "sdpa_flash_chunks_ms"):
        if peer in res and best == best:
            log(f"  {name} speedup of vidrial best vs {peer[:-3]}: {res[peer] / best:.2f}x")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="A,B,A0,Q,Q0")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--configs", choices=("default", "sweep"), default="sweep")
    ap.add_argument("--no-retention", action="store_true")
    ap.add_argument("--retention-shapes", default="A,B,A0,Q,Q0",
                    help="shapes on which to also time retention (its Triton autotune runs once per key)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    from vidrial.core.arch import device_arch
    from vidrial.core.compile import compile_many

    arch = device_arch()
    plan = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        key = family.Key(head_dim=s["d"], deg=s["deg"], chunk_size=s["chunk"], gating=s["gating"],
                         normalize=s["normalize"])
        configs = [family.default_config(key)]
        if args.configs == "sweep":
            configs += [c for c in SWEEP if c not in configs]
        ok = []
        for cfg in configs:
            try:
                family.check(key, cfg, arch)
                ok.append(cfg)
            except Exception as exc:
                log(f"  {name} {cfg.label()}: not valid here ({exc})")
        plan.append((name, key, ok))
    # compile everything up front, in parallel (the launcher then finds the cubins in the cache)
    t0 = time.perf_counter()
    jobs = [(family.render(key, cfg), arch, (), cfg.label()) for _, key, cfgs in plan for cfg in cfgs]
    for (kernel, _, _, label), res in zip(jobs, compile_many(jobs)):
        facts = getattr(res, "facts", None)
        log(f"  compiled {kernel.entry} {label}: {facts if facts else res}")
    log(f"compiled {len(jobs)} kernels in {time.perf_counter() - t0:.1f} s")
    results = []
    for name, key, configs in plan:
        log(f"shape {name}: {SHAPES[name]}")
        with_rt = not args.no_retention and name in args.retention_shapes.split(",")
        results.append(bench_shape(name, args.reps, configs, with_rt, log))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
