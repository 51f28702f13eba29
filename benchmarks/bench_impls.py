"""Benchmark: a family's implementations side by side (mma.sync vs the Hopper wgmma kernels).
Families: update_state, query_state, discumsum_bwd, update_state_bwd, query_state_bwd (its rows pass).

For each shape (docs/BENCHMARKS.md: A = b1 t65536, B = b8 t8192; h=8, d=64, p=2, chunk 1024, bf16,
gated) and each config: a float64 check on the first head and two chunks (a config that fails it is
reported and not timed), then the median of CUDA-event timings with L2 flushed before every rep
(vidrial.tuning.measure). The dispatched config (what the op runs: tuned entry or default) is the
first row; TFLOP/s count exact-D FLOPs (D = 2080 for d=64, p=2) and are given as a fraction of a
bf16 8192^3 matmul timed in the same run.

    python benchmarks/bench_impls.py --family update_state [--shapes A,B] [--reps 30] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vidrial.kernels.power_retention.sympow import feature_dim  # noqa: E402
from vidrial.tuning.measure import time_cuda  # noqa: E402

SHAPES = {"A": (1, 65536), "B": (8, 8192)}
H, D_HEAD, DEG, CHUNK, D_TILE = 8, 64, 2, 1024, 8

UPDATE_STATE_CONFIGS = [  # (impl, tile_m, tile_k, warps, stages, min_ctas)
    ("wgmma", 128, 64, 4, 4, 1), ("wgmma", 128, 64, 4, 5, 1), ("wgmma", 128, 64, 4, 6, 1),
    ("wgmma", 128, 32, 4, 6, 1), ("wgmma", 128, 128, 4, 4, 1), ("wgmma", 256, 64, 8, 4, 1),
    ("wgmma", 256, 64, 8, 5, 1), ("wgmma", 256, 128, 8, 4, 1), ("wgmma", 128, 64, 8, 5, 1),
    ("wgmma", 64, 64, 4, 5, 2), ("wgmma", 128, 64, 4, 5, 2), ("wgmma", 256, 32, 8, 6, 1),
    ("wgmma", 192, 64, 4, 4, 1), ("wgmma", 192, 128, 4, 4, 1), ("wgmma", 256, 128, 8, 5, 1),
]


def _inputs(b: int, t: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    K = (torch.randn(b, t, H, D_HEAD, device="cuda", generator=gen) / D_HEAD**0.25).to(torch.bfloat16)
    V = torch.randn(b, t, H, D_HEAD, device="cuda", generator=gen).to(torch.bfloat16)
    G = torch.nn.functional.logsigmoid(torch.randn(b, t, H, device="cuda", generator=gen) + 3.0)
    return K, V, G


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _sweep(shape: str, configs, check, runner, error_of, work: float, reps: int, tol: float = 1e-2) -> list[dict]:
    """One row per (origin, config): check(cfg) (the family's rules), runner(cfg) -> a zero-argument call of the
    config, its first result checked by error_of(out) < tol (a config that fails is reported, not timed), then
    the median time; `work` FLOPs (or bytes) per call for the throughput column. A config that raises is
    reported and the sweep goes on (one bad config must not hide the others)."""
    rows = []
    for origin, cfg in configs:
        row = {"shape": shape, "origin": origin, "config": cfg.label()}
        try:
            check(cfg)
            fn = runner(cfg)
            out = fn()
            torch.cuda.synchronize()
            err = error_of(out)
            row["rel_err"] = err
            if not err < tol:
                row["error"] = f"relative error {err:.2e}"
            else:
                ms = time_cuda(fn, warmup=3, repeats=reps).median_ms
                row.update(ms=ms, tflops=work / (ms * 1e-3) / 1e12)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    return rows


def update_state_rows(shape: str, reps: int) -> list[dict]:
    from vidrial.kernels.power_retention.update_state import UpdateStateConfig, family, update_state
    from vidrial.reference.forward import update_state_reference

    b, t = SHAPES[shape]
    K, V, G = _inputs(b, t)
    S_ref, s_ref = update_state_reference(K[:1, :2 * CHUNK, :1], V[:1, :2 * CHUNK, :1], G[:1, :2 * CHUNK, :1],
                                          DEG, D_TILE, CHUNK)
    flops = 2.0 * CHUNK * feature_dim(D_HEAD, DEG, 1) * D_HEAD * (t // CHUNK) * H * b
    key = family.problem_key(family.prepare(dict(K=K, V=V, log_G=G, deg=DEG, d_tile=D_TILE, chunk_size=CHUNK)))
    dispatched = family.config_for(key, K.device)
    configs = [("dispatched", dispatched)] + [
        ("sweep", UpdateStateConfig(impl=i, tile_m=m, tile_k=k, warps=w, stages=s, min_ctas=c))
        for i, m, k, w, s, c in UPDATE_STATE_CONFIGS]
    return _sweep(shape, configs, lambda cfg: family.check(key, cfg, "sm_90"),
                  lambda cfg: lambda: update_state(K, V, G, deg=DEG, d_tile=D_TILE, chunk_size=CHUNK, config=cfg),
                  lambda out: max(_rel(out[0][:1, :2, :1], S_ref), _rel(out[1][:1, :2, :1], s_ref)), flops, reps)


QUERY_STATE_CONFIGS = [  # (impl, tile_m, warps, stages, min_ctas); tile_k = 64
    ("wgmma", 128, 4, 4, 1), ("wgmma", 128, 4, 3, 1), ("wgmma", 128, 4, 5, 1), ("wgmma", 128, 4, 4, 2),
    ("wgmma", 256, 8, 4, 1), ("wgmma", 256, 8, 3, 1), ("wgmma", 128, 8, 4, 1), ("wgmma", 64, 4, 4, 2),
    ("wgmma", 128, 4, 6, 1),
]


def query_state_rows(shape: str, reps: int) -> list[dict]:
    """query_state in merge mode, as the forward calls it: bf16 state copy, fp32 O, gated, chunk 0 skipped."""
    from vidrial.kernels.power_retention.query_state import FAMILY, QueryStateConfig, QueryStateKey, \
        make_test_inputs, query_state
    from vidrial.reference.forward import query_state_reference

    b, t = SHAPES[shape]
    key = QueryStateKey(head_dim=D_HEAD, deg=DEG, d_tile=D_TILE)
    x = make_test_inputs(key, b=b, t=t, hq=H, h=H, chunk_size=CHUNK, gating=True, device="cuda", seed=0)
    x["Sbar"] = x["Sbar"].to(torch.bfloat16)
    x["Sbar"][:, 0] = 0
    x["sbar"][:, 0] = 0
    m2 = 2 * CHUNK
    E = query_state_reference(x["Q"][:1, :m2, :1], x["Sbar"][:1, :2, :1], x["sbar"][:1, :2, :1], x["O"][:1, :m2, :1],
                              x["l"][:1, :m2, :1], x["m"][:1, :m2, :1], x["log_G"][:1, :m2, :1], deg=DEG,
                              d_tile=D_TILE, scale=x["scale"], chunk_size=CHUNK)
    flops = 2.0 * feature_dim(D_HEAD, DEG, 1) * D_HEAD * t * H * b

    def call(cfg):
        return query_state(x["Q"], x["Sbar"], x["sbar"], x["O"], x["l"], x["m"], x["log_G"], deg=DEG, d_tile=D_TILE,
                           scale=x["scale"], chunk_size=CHUNK, config=cfg, zero_first_state=True)

    plan_key = FAMILY.problem_key(FAMILY.prepare(dict(x, deg=DEG, d_tile=D_TILE)))
    configs = [("dispatched", FAMILY.config_for(plan_key, x["Q"].device))] + [
        ("sweep", QueryStateConfig(impl=i, tile_m=m, tile_k=64, warps=w, stages=st, min_ctas=mc))
        for i, m, w, st, mc in QUERY_STATE_CONFIGS]
    return _sweep(shape, configs, lambda cfg: FAMILY.check(plan_key, cfg, "sm_90"), lambda cfg: lambda: call(cfg),
                  lambda Y: _rel(Y[:1, :m2, :1], E), flops, reps)


DISCUMSUM_BWD_CONFIGS = [  # (threads, per_thread)
    (64, 4), (128, 4), (128, 8), (256, 4), (256, 8), (256, 16), (512, 8), (512, 16), (1024, 4),
]


def discumsum_bwd_rows(shape: str, reps: int) -> list[dict]:
    """The backward's reverse scan at the shape's state size (gated, with a final-state gradient); bytes
    moved: dSbar read + dS written (fp32), Sbar16 read (bf16), per chunk and head."""
    from vidrial.kernels.power_retention.discumsum_bwd import FAMILY, DiscumsumBwdConfig, discumsum_bwd
    from vidrial.reference import backward as em

    b, t = SHAPES[shape]
    n, D = t // CHUNK, feature_dim(D_HEAD, DEG, D_TILE)
    g = torch.Generator(device="cuda").manual_seed(0)
    dSbar = torch.randn(b, n, H, D, D_HEAD, device="cuda", generator=g)
    dsbar = torch.randn(b, n, H, D, device="cuda", generator=g)
    Sb16 = torch.randn(b, n, H, D, D_HEAD, device="cuda", generator=g).bfloat16()
    sb = torch.randn(b, n + 1, H, D, device="cuda", generator=g)
    L = -torch.rand(b, n, H, device="cuda", generator=g) * 0.1
    dSf = torch.randn(b, H, D, D_HEAD, device="cuda", generator=g)
    dsf = torch.randn(b, H, D, device="cuda", generator=g)
    want = em.discumsum_bwd(dSbar[:1, :, :1].double(), dsbar[:1, :, :1].double(), Sb16[:1, :, :1].double(),
                            sb[:1, :n, :1].double(), L[:1, :, :1].double(), dSf[:1, :1].double(), dsf[:1, :1].double())
    bytes_moved = b * n * H * D * (D_HEAD * 10 + 12)
    key = FAMILY.problem_key(FAMILY.prepare(dict(dSbar=dSbar, dsbar=dsbar, Sbar16=Sb16, sbar=sb, chunk_gates=L)))
    configs = [("dispatched", FAMILY.config_for(key, dSbar.device))] + [
        ("sweep", DiscumsumBwdConfig(threads=th, per_thread=pt)) for th, pt in DISCUMSUM_BWD_CONFIGS]

    def runner(cfg):  # in place: each config on its own copies (values do not change the time)
        X, x = dSbar.clone(), dsbar.clone()
        return lambda: discumsum_bwd(X, x, Sb16, sb, L, dSf, dsf, config=cfg)

    return _sweep(shape, configs, lambda cfg: FAMILY.check(key, cfg, "sm_90"), runner,
                  lambda out: max(_rel(out[0][:1, :, :1], want[0]), _rel(out[1][:1, :, :1], want[1]),
                                  _rel(out[2][:1, :, :1], want[2])),
                  bytes_moved, reps, tol=1e-4)  # the "TFLOP/s" column is TB/s here


UPDATE_STATE_BWD_CONFIGS = [  # (impl, warps, tile_f, stages)
    ("mma_sync", 4, 64, 2), ("mma_sync", 4, 64, 3), ("mma_sync", 8, 64, 2), ("wgmma", 8, 64, 3), ("wgmma", 8, 64, 4),
    ("wgmma", 8, 64, 6), ("wgmma", 4, 64, 3), ("wgmma", 4, 64, 4), ("wgmma", 4, 64, 6),
]


def update_state_bwd_rows(shape: str, reps: int) -> list[dict]:
    """dK, dV, E from the chunk-state gradients (gated); FLOPs: both GEMMs with exact D."""
    from vidrial.kernels.power_retention.update_state_bwd import FAMILY, UpdateStateBwdConfig, update_state_bwd
    from vidrial.reference import backward as em

    b, t = SHAPES[shape]
    n, D = t // CHUNK, feature_dim(D_HEAD, DEG, D_TILE)
    K, V, G = _inputs(b, t)
    g = torch.Generator(device="cuda").manual_seed(1)
    dS = torch.randn(b, n, H, D, D_HEAD, device="cuda", generator=g) * 0.1
    ds = torch.randn(b, n, H, D, device="cuda", generator=g) * 0.1
    gc = G.view(b, n, CHUNK, H).cumsum(2).view(b, t, H)
    want = em.update_state_bwd(K[:1, :CHUNK, :1].double(), V[:1, :CHUNK, :1].double(), gc[:1, :CHUNK, :1].double(),
                               dS[:1, :1, :1].double(), ds[:1, :1, :1].double(), DEG, D_TILE, CHUNK)
    flops = 2 * 2.0 * t * b * H * feature_dim(D_HEAD, DEG, 1) * D_HEAD
    run = lambda cfg: update_state_bwd(K, V, gc, dS, ds, deg=DEG, d_tile=D_TILE, chunk_size=CHUNK,  # noqa: E731
                                       config=cfg)
    key = FAMILY.problem_key(FAMILY.prepare(dict(K=K, V=V, G=gc, dS=dS, ds=ds, deg=DEG, d_tile=D_TILE,
                                                 chunk_size=CHUNK)))
    configs = [("dispatched", FAMILY.config_for(key, K.device))] + [
        ("sweep", UpdateStateBwdConfig(impl=i, warps=w, tile_f=f, stages=st)) for i, w, f, st in UPDATE_STATE_BWD_CONFIGS]
    return _sweep(shape, configs, lambda cfg: FAMILY.check(key, cfg, "sm_90"), lambda cfg: lambda: run(cfg),
                  lambda out: max(_rel(x[:1, :CHUNK, :1], w) for x, w in zip(out, want)), flops, reps)


QUERY_STATE_BWD_CONFIGS = [  # (impl, warps, tile_f, stages)
    ("mma_sync", 4, 64, 2), ("mma_sync", 8, 64, 2), ("wgmma", 4, 64, 3), ("wgmma", 4, 64, 4), ("wgmma", 4, 64, 6),
    ("wgmma", 8, 64, 3), ("wgmma", 8, 64, 4),
]


def query_state_bwd_rows(shape: str, reps: int) -> list[dict]:
    """The rows pass (dQ and the row factors) on the tuner's problem for the shape's tokens (the family's
    make_inputs: states, (O, l, m) and Y as the forward leaves them; b = 1, 8 heads, chunk 1024), checked
    against its float64 reference as the tuner checks it; FLOPs: its GEMM with exact D."""
    from vidrial.kernels.power_retention.query_state_bwd import FAMILY, QueryStateBwdConfig

    b, t = SHAPES[shape]
    key = FAMILY.Key(head_dim=D_HEAD, deg=DEG, d_tile=D_TILE, dtype="bfloat16", tokens=b * t * H)
    inputs = FAMILY.make_inputs(key, torch.device("cuda"), seed=0)
    expected = FAMILY.reference(key, inputs)
    flops = 2.0 * t * b * H * feature_dim(D_HEAD, DEG, 1) * D_HEAD
    configs = [("dispatched", FAMILY.config_for(key, torch.device("cuda")))] + [
        ("sweep", QueryStateBwdConfig(impl=i, warps=w, tile_f=f, stages=st)) for i, w, f, st in QUERY_STATE_BWD_CONFIGS]
    return _sweep(shape, configs, lambda cfg: FAMILY.check(key, cfg, "sm_90"),
                  lambda cfg: lambda: FAMILY.run(key, cfg, inputs),
                  lambda out: FAMILY.check_outputs(key, inputs, out, expected), flops, reps, tol=FAMILY.tolerance(key))


FAMILIES = {"update_state": update_state_rows, "update_state_bwd": update_state_bwd_rows,
            "query_state_bwd": query_state_bwd_rows, "query_state": query_state_rows, "discumsum_bwd": discumsum_bwd_rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="update_state", help=f"comma-separated, of {sorted(FAMILIES)}")
    ap.add_argument("--shapes", default="A,B")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = time_cuda(lambda: torch.matmul(a, bm), warmup=3, repeats=args.reps).median_ms
    ceiling = 2 * 8192**3 / (mm * 1e-3) / 1e12
    del a, bm
    print(f"{torch.cuda.get_device_name()}: bf16 8192^3 matmul {mm:.3f} ms = {ceiling:.0f} TFLOP/s")
    rows = []
    for fam in args.family.split(","):
        for shape in args.shapes.split(","):
            rows += [dict(r, shape=f"{fam[:6]}.{r['shape']}") for r in FAMILIES[fam](shape, args.reps)]
    base = {r["shape"]: r.get("ms") for r in rows if r["origin"] == "dispatched"}
    print(f"{'shape':<8} {'origin':<10} {'ms':>8} {'TFLOP/s':>8} {'ceil%':>6} {'vs disp':>7}  config")
    for r in rows:
        if "ms" not in r:
            print(f"{r['shape']:<8} {r['origin']:<10} {'-':>8} {'-':>8} {'-':>6} {'-':>7}  {r['config']}  [{r['error']}]")
            continue
        ratio = base[r["shape"]] / r["ms"] if base.get(r["shape"]) else float("nan")
        print(f"{r['shape']:<8} {r['origin']:<10} {r['ms']:>8.3f} {r['tflops']:>8.0f} {100 * r['tflops'] / ceiling:>5.0f}% "
              f"{ratio:>6.2f}x  {r['config']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "matmul_tflops": ceiling,
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
