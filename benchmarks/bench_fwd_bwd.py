"""Forward+backward benchmark: vidrial.power_retention (autograd, backward kernels) vs retention 1.0.7
(Triton) vs PyTorch SDPA (flash), in one run.

Shapes (docs/BENCHMARKS.md): A = b1 t65536 h8 d64 p2 chunk1024 bf16 gating; B = b8 t8192, same otherwise.
Times: CUDA events around forward+backward (Y = f(...); Y.backward(dY)) after an L2 flush, median of
--reps. TFLOP/s: docs/MATH.md section 6 useful FLOPs of the forward with the exact D = C(d+p-1, p) times
3.5 (backward ~ 2.5x forward). Peak memory: torch.cuda.max_memory_allocated during one fwd+bwd minus
what was allocated before it (inputs and dY excluded, gradients included). Per-kernel split: each backward kernel
(and each forward kernel) timed alone on the same data.

    python benchmarks/bench_fwd_bwd.py [--shapes A,B] [--reps 10] [--retention-configs 2]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch

from vidrial.tuning.measure import time_cuda

SHAPES = {
    "A": dict(b=1, t=65536, h=8, d=64, p=2, chunk=1024),
    "B": dict(b=8, t=8192, h=8, d=64, p=2, chunk=1024),
    # degree 4 at shape A's token count (d=32: a d=64 p=4 state is 254 MB per head); no peer anchor
    "A4": dict(b=1, t=65536, h=8, d=32, p=4, chunk=1024),
}
ANCHOR_MS = {"A": dict(retention=17.05, sdpa=34.40), "B": dict(retention=17.19, sdpa=4.61)}
def bench(fn, reps: int, warmup: int = 1) -> float:
    """Median ms of fn() over `reps` runs: CUDA events, L2 flushed before each (vidrial.tuning.measure)."""
    return time_cuda(fn, warmup=warmup, repeats=reps).median_ms


def peak_mb(fn, leaves=()) -> float:
    for x in leaves:
        if x is not None:
            x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def useful_flops(b, t, h, d, p, c) -> float:
    D = math.comb(d + p - 1, p)
    return b * h * t * d * (4 * D + 2 * c)


def limit_triton_autotune(max_configs: int) -> None:
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # pragma: no cover
        return
    for name, mod in list(sys.modules.items()):
        if not name.startswith("retention"):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > max_configs:
                k = len(obj.configs)
                idx = sorted({(i * k) // max_configs + k // (2 * max_configs) for i in range(max_configs)})
                obj.configs = [obj.configs[i] for i in idx if i < k]


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]


def _fwd_bwd(f, leaves, dY):
    def run():
        for x in leaves:
            if x is not None:
                x.grad = None
        Y = f(*leaves)
        Y.backward(dY)
    return run


@contextlib.contextmanager
def _patched(obj, attr: str, value):
    """obj.attr = value inside the block (the dispatcher reloaded around it: defaults may depend on it)."""
    from vidrial import dispatch

    prev = getattr(obj, attr)
    setattr(obj, attr, value)
    dispatch.reload()
    try:
        yield
    finally:
        setattr(obj, attr, prev)
        dispatch.reload()


@contextlib.contextmanager
def _all_patched(*patches):
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _variant(label, patch, fv, inputs, dY, reps, ms_vf, grads_ref, rows, shape_name):
    """fwd+bwd of vidrial with `patch` active: appends (label, ms, peak MB, fwd ms) to rows and returns the
    gradients' relative differences to grads_ref, or None (printed) when it fails."""
    try:
        with patch:
            lv = _leaves(*inputs)
            run = _fwd_bwd(fv, lv, dY)
            run()
            ms = bench(run, reps)
            mem = peak_mb(run, lv)
            rows.append((label, ms, mem, ms_vf))
            return [((x.grad.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(lv, grads_ref)]
    except Exception as exc:
        print(f"[{shape_name}] {label} failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def run_shape(name, shp, reps, retention_configs, split=True, variants=True):
    import vidrial
    from vidrial.autograd import power_retention_fwd
    from vidrial.kernels.power_retention.discumsum_bwd import discumsum_bwd
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import intra_chunk_attention_bwd
    from vidrial.kernels.power_retention.query_state_bwd import query_state_bwd
    from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim
    from vidrial.kernels.power_retention.update_state_bwd import update_state_bwd

    b, t, h, d, p, c = (shp[k] for k in ("b", "t", "h", "d", "p", "chunk"))
    dt = default_d_tile(d, p)
    g = torch.Generator(device="cuda").manual_seed(0)
    Q = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    K = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    V = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    log_G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device="cuda", generator=g) + 4)
    dY = torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    flops = useful_flops(b, t, h, d, p, c) * 3.5
    rows = []  # (impl, ms fwd+bwd, peak MB, ms fwd)

    leaves = _leaves(Q, K, V, log_G)
    fv = lambda *a: vidrial.power_retention(*a, deg=p, chunk_size=c)  # noqa: E731
    run_v = _fwd_bwd(fv, leaves, dY)
    t0 = time.perf_counter()
    run_v()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms_v = bench(run_v, reps)
    mem_v = peak_mb(run_v, leaves)
    ms_vf = bench(lambda: vidrial.power_retention(Q, K, V, log_G, deg=p, chunk_size=c), reps)
    grads_v = [x.grad.clone() for x in leaves]
    rows.append(("vidrial", ms_v, mem_v, ms_vf))
    del leaves

    # (the row-loop alternatives to the backward defaults were deleted 2026-12-02: docs/PERF_NOTES.md)
    from vidrial.kernels.power_retention import intra_chunk_attention_bwd as icb
    from vidrial.kernels.power_retention import update_state_bwd as usb_mod

    diffs_v = {}

    # retention (Triton)
    grads_r = None
    try:
        os.environ.setdefault("TRITON_NO_AUTOTUNE", "1")
        import retention.triton as rt

        limit_triton_autotune(retention_configs)
        lr = _leaves(Q, K, V, log_G)
        fr = lambda *a: rt.power_retention(*a, deg=p, chunk_size=c)  # noqa: E731
        run_r = _fwd_bwd(fr, lr, dY)
        run_r()
        ms_r = bench(run_r, reps)
        mem_r = peak_mb(run_r, lr)
        ms_rf = bench(lambda: rt.power_retention(Q, K, V, log_G, deg=p, chunk_size=c), reps)
        grads_r = [x.grad.clone() for x in lr]
        rows.append(("retention_triton", ms_r, mem_r, ms_rf))
        del lr
    except Exception as exc:  # keep the other numbers
        print(f"[{name}] retention failed: {type(exc).__name__}: {exc}", flush=True)

    # SDPA flash (causal), [b, h, t, d]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    except ImportError:  # pragma: no cover
        def sdpa(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (Q, K, V))
    dYh = dY.transpose(1, 2).contiguous()
    ls = _leaves(qh, kh, vh)
    run_s = _fwd_bwd(sdpa, ls, dYh)
    ms_s = bench(run_s, reps)
    mem_s = peak_mb(run_s, ls)
    with torch.no_grad():
        ms_sf = bench(lambda: sdpa(qh, kh, vh), reps)
    rows.append(("sdpa_flash", ms_s, mem_s, ms_sf))
    del ls, qh, kh, vh, dYh

    D = feature_dim(d, p, dt)
    print(f"\n=== shape {name}: b={b} t={t} h={h} d={d} p={p} chunk={c} bf16 gating (vidrial D={D}, d_tile={dt}; "
          f"FLOPs: 3.5 x forward with exact D={math.comb(d + p - 1, p)}: {flops / 1e9:.1f} GFLOP)")
    print(f"{'impl':<18}{'fwd+bwd ms':>12}{'TFLOP/s':>10}{'vidrial/impl':>14}{'peak MB':>10}{'fwd ms':>9}")
    for impl, ms, mem, msf in rows:
        print(f"{impl:<18}{ms:>12.3f}{flops / ms / 1e9:>10.1f}{ms_v / ms:>14.2f}{mem:>10.0f}{msf:>9.3f}")
    a = ANCHOR_MS.get(name)
    if a is not None:
        print(f"anchors (tuned, docs/BENCHMARKS.md): retention fwd+bwd {a['retention']} ms, sdpa {a['sdpa']} ms; "
              f"vidrial/retention_tuned = {ms_v / a['retention']:.2f}")
    if grads_r is not None:
        diffs = [((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(grads_v, grads_r)]
        print("rel diff of gradients vidrial vs retention (Q, K, V, log_G): " + ", ".join(f"{x:.2e}" for x in diffs))
    for label, diff in diffs_v.items():
        if diff is not None:
            print(f"rel diff of gradients {label} vs vidrial (Q, K, V, log_G): " + ", ".join(f"{x:.2e}" for x in diff))
    print(f"first call (compile/load) vidrial {first:.2f} s", flush=True)

    if not split:
        return
    # per-kernel split, each alone on the data of this shape
    n = t // c
    scale = 1.0 / math.sqrt(d)
    Y, O, l, m, Sb16, sb, _, _ = power_retention_fwd(Q, K, V, log_G, None, None, p, scale, c, dt, False)
    gc = log_G.float().view(b, n, c, h).cumsum(2).view(b, t, h)
    L = log_G.float().view(b, n, c, h).sum(2)
    qs = query_state_bwd(Q, gc, Sb16, sb, O, l, m, Y, dY, deg=p, d_tile=dt, scale=scale, chunk_size=c)
    dS, ds = qs["dSbar"].clone(), qs["dsbar"].clone()
    from vidrial.kernels.power_retention.qs_bwd_state_update import state_pass_update_state
    from vidrial.kernels.power_retention.intra_chunk_attention_bwd import IntraBwdKey
    from vidrial.kernels.power_retention.query_state_bwd import QueryStateBwdKey, mma16_config
    from vidrial.kernels.power_retention.update_state_bwd import UpdateStateBwdKey

    # each backward kernel with explicit configs (the defaults are whatever dispatch picks)
    ucfg_mma16 = usb_mod.mma16_config(UpdateStateBwdKey(head_dim=d, deg=p, d_tile=dt))
    ikey = IntraBwdKey(head_dim=d, deg=p)
    icfg_flash = (icb.flash_default(ikey), icb.flash_default(ikey.model_copy(update={"stage": "dq"})))
    intra_args = (Q, K, V, gc, m, None, qs["dl"])  # dO = alpha dY: the backward's operands
    qcfg_mma16 = mma16_config(QueryStateBwdKey(head_dim=d, deg=p, d_tile=dt))
    qs_rows = lambda cfg: query_state_bwd(Q, gc, Sb16, sb, O, l, m, Y, dY, deg=p, d_tile=dt, scale=scale,  # noqa: E731
                                          chunk_size=c, config=cfg, state=False)
    us_call = lambda cfg: update_state_bwd(K, V, gc, dS, ds, deg=p, d_tile=dt, chunk_size=c, config=cfg)  # noqa: E731
    intra_call = lambda cfg, qcfg: intra_chunk_attention_bwd(*intra_args, deg=p, scale=scale,  # noqa: E731
                                                             chunk_size=c, config=cfg, dq_config=qcfg,
                                                             want_dgrow=True, dY=dY, alpha=qs["alpha"])
    ksplit = {
        "query_state_bwd (rows+state)": bench(
            lambda: query_state_bwd(Q, gc, Sb16, sb, O, l, m, Y, dY, deg=p, d_tile=dt, scale=scale, chunk_size=c),
            reps),
        "  query_state_bwd rows pass (mma16)": bench(lambda: qs_rows(qcfg_mma16), reps),
        "  query_state_bwd state pass alone (update_state)": bench(
            lambda: state_pass_update_state(Q, qs["qscale"], qs["dAh"], qs["dBh"], h, deg=p, d_tile=dt, scale=scale,
                                            chunk_size=c), reps),
        "discumsum_bwd": bench(lambda: discumsum_bwd(qs["dSbar"], qs["dsbar"], Sb16, sb, L), reps),
        "update_state_bwd": bench(lambda: update_state_bwd(K, V, gc, dS, ds, deg=p, d_tile=dt, chunk_size=c), reps),
        "  update_state_bwd (mma16)": bench(lambda: us_call(ucfg_mma16), reps),
        "intra_chunk_attention_bwd (dkv+dq)": bench(
            lambda: intra_chunk_attention_bwd(*intra_args, deg=p, scale=scale, chunk_size=c, want_dgrow=True, dY=dY,
                                              alpha=qs["alpha"]), reps),
        "  intra_chunk_attention_bwd (flash)": bench(lambda: intra_call(*icfg_flash), reps),
        "forward op (all 4 fwd kernels)": bench(
            lambda: power_retention_fwd(Q, K, V, log_G, None, None, p, scale, c, dt, False), reps),
    }
    print("vidrial per-kernel split (each alone, with the default configs; indented lines: each implementation "
          "with an explicit config, not in the sum):")
    tot = sum(v for k, v in ksplit.items() if not k.startswith(" "))
    for k, v in ksplit.items():
        print(f"  {k:<50}{v:>8.3f} ms  ({100 * v / tot:4.1f}%)")
    print(f"  {'sum':<50}{tot:>8.3f} ms; fwd+bwd total {ms_v:.3f} ms (rest: glue, casts, gate sums)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="A,B")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--retention-configs", type=int, default=2)
    ap.add_argument("--no-split", action="store_true")
    ap.add_argument("--no-variants", action="store_true", help="skip the row-loop / state-kernel alternatives")
    args = ap.parse_args(argv)
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"--shapes: got {','.join(unknown)}; allowed: {', '.join(SHAPES)}")
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    for name in names:
        run_shape(name, SHAPES[name], args.reps, args.retention_configs, split=not args.no_split,
                  variants=not args.no_variants)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
