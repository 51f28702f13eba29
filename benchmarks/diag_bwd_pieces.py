"""Where a backward's error comes from: each backward kernel's output against its float64 emulation.

Runs vidrial.power_retention forward + backward on one problem, records what every backward kernel
returned (by wrapping the kernel entry points that vidrial.autograd calls), and compares each piece
with the float64 emulation of the same algorithm (bwd_emulation), plus the full gradients with float64
autograd through the quadratic formula (reference.attention_reference). GPU only.

    python3 benchmarks/diag_bwd_pieces.py --dtype float16 --d 128 --chunk 64 --t 1500 [--no-gating]
    python3 benchmarks/diag_bwd_pieces.py --sweep      # dtype x gating x chunk x head_dim, full gradients
"""
from __future__ import annotations

import argparse
import math

import torch

from vidrial.reference import backward as em
from vidrial.reference import forward as ref
from vidrial.kernels.power_retention.sympow import default_d_tile

F64 = torch.float64


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def inputs(b, t, h, d, dtype, gating, seed=0, round_bf16=False, layout="bthd", dy_scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "cpu":  # torch.manual_seed(seed) and randn on the CPU, then moved (what a script would do)
        torch.manual_seed(seed)
        Q = (torch.randn(b, t, h, d) / math.sqrt(d) * 2).cuda()
        K = (torch.randn(b, t, h, d) / math.sqrt(d) * 2).cuda()
        V = torch.randn(b, t, h, d).cuda()
        dY = torch.randn(b, t, h, d).cuda() * dy_scale
        return Q.to(dtype), K.to(dtype), V.to(dtype), None, dY.to(dtype)

    def rn(*shape):
        if layout == "bhtd" and len(shape) == 4:  # made as [b,h,t,d], passed as a transposed view
            return torch.randn(shape[0], shape[2], shape[1], shape[3], device="cuda", generator=g).transpose(1, 2)
        return torch.randn(*shape, device="cuda", generator=g)
    Q = rn(b, t, h, d) / math.sqrt(d) * 2
    K = rn(b, t, h, d) / math.sqrt(d) * 2
    V = rn(b, t, h, d)
    dY = rn(b, t, h, d) * dy_scale  # a small scale: what a mean-reduced loss sends back
    lg = torch.nn.functional.logsigmoid(3 + torch.randn(b, t, h, device="cuda", generator=g)) if gating else None
    if round_bf16:  # values exactly representable in bf16 (isolates rounding of fp16 inputs to bf16)
        Q, K, V, dY = (x.bfloat16().float() for x in (Q, K, V, dY))
    return Q.to(dtype), K.to(dtype), V.to(dtype), lg, dY.to(dtype)


def loss_of(Y, dY, loss: str):
    if loss == "dot":
        return (Y.float() * dY.float()).sum() if Y.dtype != F64 else (Y * dY.double()).sum()
    if loss == "mean":
        return Y.mean()
    if loss == "sum":
        return Y.sum()
    if loss == "mse":  # a mean-reduced loss against a fixed target (dY = 2 (Y - T) / numel)
        T = torch.randn(Y.shape, generator=torch.Generator(device=Y.device).manual_seed(7), device=Y.device)
        return ((Y.double() - T.double()) ** 2).mean() if Y.dtype == F64 else ((Y.float() - T) ** 2).mean()
    raise ValueError(loss)


def full_grads(Q, K, V, lg, dY, deg, chunk, loss="dot", rows=False):
    import vidrial

    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (Q, K, V, lg)]
    Y = vidrial.power_retention(*leaves, deg=deg, chunk_size=chunk)
    loss_of(Y, dY, loss).backward()
    r = [x.detach().double().requires_grad_(True) if x is not None else None for x in (Q, K, V, lg)]
    Yr = ref.attention_reference(*r, deg=deg)
    loss_of(Yr, dY, loss).backward()
    out = {"Y": rel(Y, Yr)}
    for name, a, w in zip(("dQ", "dK", "dV", "dlog_G"), leaves, r):
        if a is not None:
            out[name] = rel(a.grad, w.grad)
            out[name + "_floor"] = rel(w.grad.to(a.dtype), w.grad)  # the float64 gradient stored in the input dtype
            if rows and name in ("dQ", "dK"):  # where the error sits: the rows with the largest error
                e = (a.grad.double() - w.grad).norm(dim=-1).flatten()
                top = e.topk(5)
                shp = a.grad.shape[:-1]
                where = [tuple(int(i) for i in torch.unravel_index(j, shp)) for j in top.indices]
                out[name + "_top"] = [(w_, f"{v:.2e}", f"{w.grad.double().norm(dim=-1).flatten()[j]:.2e}")
                                      for w_, v, j in zip(where, top.values.tolist(), top.indices)]
    return out


def pieces(Q, K, V, lg, dY, deg, chunk):
    """Each backward kernel's outputs vs the float64 emulation (t padded to a multiple of chunk)."""
    import vidrial
    from vidrial.kernels.power_retention import discumsum_bwd as dmod
    from vidrial.kernels.power_retention import intra_chunk_attention_bwd as imod
    from vidrial.kernels.power_retention import query_state_bwd as qmod
    from vidrial.kernels.power_retention import update_state_bwd as umod

    got: dict[str, object] = {}

    def wrap(mod, name):
        real = getattr(mod, name)

        def f(*a, **k):
            out = real(*a, **k)
            got[name] = out
            return out
        setattr(mod, name, f)
        return real

    reals = [(m, n, wrap(m, n)) for m, n in ((qmod, "query_state_bwd"), (dmod, "discumsum_bwd"),
                                              (umod, "update_state_bwd"), (imod, "intra_chunk_attention_bwd"))]
    b, t, h, d = Q.shape
    c = chunk
    tp = -(-t // c) * c
    pad = lambda x: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, tp - t)) if x is not None else None  # noqa
    try:
        leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (Q, K, V, lg)]
        Y = vidrial.power_retention(*leaves, deg=deg, chunk_size=c)
        (Y.float() * dY.float()).sum().backward()
    finally:
        for m, n, r in reals:
            setattr(m, n, r)
    Qp, Kp, Vp, dYp = (pad(x).double().cpu() for x in (Q, K, V, dY))
    lgp = pad(lg).double().cpu() if lg is not None else None
    dt = default_d_tile(d, deg)
    scale = 1 / math.sqrt(d)
    f = em.forward_pieces(Qp, Kp, Vp, lgp, deg, scale, c, dt)
    n = tp // c
    gz = f["g"] if f["g"] is not None else torch.zeros(b, tp, h, dtype=F64)
    dq_s, dO, dl, dAh, dBh, qscale, dg_row = em.qs_bwd_rows(Qp, gz, f["Sbar"][:, :n], f["sbar"][:, :n], f["O"],
                                                              f["l"], f["m"], f["Y"], dYp, deg, dt, scale, c)
    dSbar, dsbar = em.qs_bwd_state(Qp, qscale, dAh, dBh, h, deg, dt, scale, c)
    dS, ds, dL, _, _ = em.discumsum_bwd(dSbar, dsbar, f["Sbar"], f["sbar"], f["L"])
    dK_u, dV_u, e = em.update_state_bwd(Kp, Vp, f["g"], dS, ds, deg, dt, c)
    dQ_i, dK_i, dV_i, dg_col = em.intra_bwd(Qp, Kp, Vp, f["g"], f["m"], dO, dl, deg, scale, c)
    got = {k: tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in v) if isinstance(v, tuple)
           else {kk: vv.cpu() if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()} for k, v in got.items()}
    qs = got["query_state_bwd"]
    dsum = got["discumsum_bwd"]
    us = got["update_state_bwd"]
    ia = got["intra_chunk_attention_bwd"]
    rows = {
        "qs.dQ (inter dq)": rel(qs["dQ"], dq_s), "qs.dO": rel(qs["alpha"].unsqueeze(-1) * dYp, dO), "qs.dl": rel(qs["dl"], dl),
        "qs.dSbar": rel(qs["dSbar"], dSbar), "qs.dsbar": rel(qs["dsbar"], dsbar),
        "discumsum.dS": rel(dsum[0], dS), "discumsum.ds": rel(dsum[1], ds),
        "us.dK (inter dk)": rel(us[0], dK_u), "us.dV": rel(us[1], dV_u),
        "intra.dQ": rel(ia[0], dQ_i), "intra.dK": rel(ia[1], dK_i), "intra.dV": rel(ia[2], dV_i),
        "sum dQ": rel(qs["dQ"] + ia[0], dq_s + dQ_i), "sum dK": rel(us[0] + ia[1], dK_u + dK_i),
        "|inter dQ|/|dQ|": (dq_s.norm() / (dq_s + dQ_i).norm()).item(),
        "|intra dQ|/|dQ|": (dQ_i.norm() / (dq_s + dQ_i).norm()).item(),
    }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--t", type=int, default=1500)
    ap.add_argument("--b", type=int, default=2)
    ap.add_argument("--h", type=int, default=2)
    ap.add_argument("--deg", type=int, default=2)
    ap.add_argument("--no-gating", action="store_true")
    ap.add_argument("--round-bf16", action="store_true", help="inputs exactly representable in bf16")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--seeds", type=int, default=0, help="full gradients over this many seeds (no pieces)")
    ap.add_argument("--loss", default="dot", choices=("dot", "mean", "sum", "mse"))
    ap.add_argument("--impl", default="", help="module.ATTR=value implementation switches, comma separated "
                                               "(e.g. update_state_bwd.IMPL_DEFAULT=rowloop)")
    ap.add_argument("--layout", default="bthd", choices=("bthd", "bhtd", "cpu"))
    ap.add_argument("--dy-scale", type=float, default=1.0, help="dY = randn * this (1e-6: a mean-reduced loss)")
    a = ap.parse_args()
    for item in filter(None, a.impl.split(",")):
        import importlib

        from vidrial import dispatch
        target, value = item.split("=")
        mod, attr = target.rsplit(".", 1)
        setattr(importlib.import_module(f"vidrial.kernels.power_retention.{mod}"), attr, value)
        dispatch.reload()
    if a.sweep:
        print(f"{'dtype':9} {'gate':4} {'chunk':5} {'d':4} {'Y':>9} {'dQ':>9} {'dK':>9} {'dV':>9} {'dlog_G':>9}")
        for dtype in ("float16", "bfloat16"):
            for gating in (False, True):
                for chunk in (64, 256):
                    for d in (32, 64, 128):
                        x = inputs(a.b, a.t, a.h, d, getattr(torch, dtype), gating)
                        r = full_grads(*x, a.deg, chunk)
                        print(f"{dtype:9} {int(gating):4} {chunk:5} {d:4} " +
                              " ".join(f"{r.get(k, float('nan')):9.2e}" for k in ("Y", "dQ", "dK", "dV", "dlog_G")),
                              flush=True)
        return
    if a.seeds:
        for seed in range(a.seeds):
            x = inputs(a.b, a.t, a.h, a.d, getattr(torch, a.dtype), not a.no_gating, seed=seed, layout=a.layout,
                       dy_scale=a.dy_scale)
            r = full_grads(*x, a.deg, a.chunk, a.loss, rows=True)
            print(f"seed {seed}: " + " ".join(f"{k} {v:.2e}" for k, v in r.items() if isinstance(v, float)),
                  r.get("dQ_top")[:3] if r.get("dQ", 0) > 1e-2 else "", r.get("dK_top")[:3] if r.get("dK", 0) > 1e-2
                  else "", flush=True)
        return
    x = inputs(a.b, a.t, a.h, a.d, getattr(torch, a.dtype), not a.no_gating, round_bf16=a.round_bf16,
               layout=a.layout, dy_scale=a.dy_scale)
    print("full:", {k: (f"{v:.2e}" if isinstance(v, float) else v)
                    for k, v in full_grads(*x, a.deg, a.chunk, a.loss, rows=True).items()})
    for k, v in pieces(*x, a.deg, a.chunk).items():
        print(f"  {k:20} {v:.2e}")


if __name__ == "__main__":
    main()
