"""Benchmark cases as data: name, kind, shape, the callables of vidrial and each peer, FLOPs and bytes.

Work counts (docs/MATH.md section 6), with the exact feature dimension D = C(d+p-1, p) (2080 for d=64,
p=2; what d_tile=1 would store), whatever layout an implementation actually uses:

* power retention forward, chunked (t > chunk c):  b*h * t*d*(4*D + 2*c)
  (update_state 2cDd + query_state 2cDd + causal intra-chunk attention 2c^2 d, per chunk);
  quadratic (t <= c, what vidrial and retention run then): b*h * 2*t^2*d (causal).
* SDPA causal forward: b*h * 2*t^2*d (QK^T and PV, half of each under the causal mask).
* fla GLA forward (chunk 64, state d x d): b*h * t*d*(4*d + 2*64).
* forward+backward: 3.5 x the forward (backward ~ 2.5 x forward) for every implementation.
* decode step (bytes it must read): power retention b*h*D*d*2 (the bf16 state, 17 MB at b=h=8,
  d=64, p=2); SDPA the bf16 KV cache 2*b*h*T*d*2 (T = history length); GLA the fp32 d x d state,
  read and written: 2*b*h*d*d*4.

Fraction of the ceiling: FLOPs / time / (bf16 matmul rate) for fwd and fwd+bwd; bytes / time /
(device copy rate, read+write) for decode. Throughput: tokens (b*t) per second; decode: us/step.

Inputs: bf16, fresh randn per input set (never zeros), log_G = logsigmoid(randn + 4) (gating on,
gates near 1), deg 2, d 64, h 8, chunk 1024; the op's default d_tile.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("fwd", "fwd_bwd", "decode")
FWD_BWD_FACTOR = 3.5
GLA_CHUNK = 64
TOKENS_PER_BATCH = 65536
GATE_SHIFT = 4.0
DEVICE = "cuda"  # the CPU tests run the input and check plumbing with "cpu" and the float64 reference


@dataclass(frozen=True)
class Shape:
    b: int
    t: int  # sequence length (decode: the history length, the KV cache of SDPA)
    h: int = 8
    d: int = 64
    deg: int = 2
    chunk: int = 1024

    @property
    def tokens(self) -> int:
        return self.b * self.t

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def label(self) -> str:
        return f"b{self.b} t{self.t} h{self.h} d{self.d} p{self.deg}"


# the standard shapes (docs/BENCHMARKS.md)
SHAPE_A = Shape(b=1, t=65536)
SHAPE_B = Shape(b=8, t=8192)
DECODE_HISTORY = 65536


@dataclass(frozen=True)
class Preset:
    name: str
    sweep_t: tuple[int, ...]  # context lengths at TOKENS_PER_BATCH tokens per batch (b = tokens / t)
    decode_batches: tuple[int, ...]
    input_sets: int  # several input sets per case; the figure is the median of their medians
    warmup_ms: float
    rep_ms: float
    max_repeats: int
    autotune_configs: int  # Triton autotune configs kept per peer kernel
    tokens_per_batch: int = TOKENS_PER_BATCH
    budget_s: float = 0.0  # soft wall-clock budget: cases past it are reported "skipped: time budget"


PRESETS: dict[str, Preset] = {
    "quick": Preset("quick", sweep_t=(1024, 8192, 65536), decode_batches=(1, 8), input_sets=2,
                    warmup_ms=10.0, rep_ms=40.0, max_repeats=50, autotune_configs=1, budget_s=100.0),
    "standard": Preset("standard", sweep_t=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
                       decode_batches=(1, 8, 64), input_sets=3, warmup_ms=25.0, rep_ms=100.0,
                       max_repeats=100, autotune_configs=2, budget_s=420.0),
}


# docs/BENCHMARKS.md: peers on an NVIDIA H200 (2026-11-28), retention fully autotuned; ms (decode: us/step)
ANCHORS = {
    ("fwd", "A"): {"retention": 5.80, "sdpa": 9.57},
    ("fwd", "B"): {"retention": 5.97, "sdpa": 1.26},
    ("fwd_bwd", "A"): {"retention": 17.05, "sdpa": 34.40},
    ("fwd_bwd", "B"): {"retention": 17.19, "sdpa": 4.61},
    ("decode", "b8"): {"retention": 0.326, "sdpa": 0.254},
}
ANCHORS_GPU = "NVIDIA H200"


# ---------------------------------------------------------------- work counts (docs/MATH.md section 6)

def exact_feature_dim(d: int, deg: int) -> int:
    """D = C(d + p - 1, p): the symmetric power's distinct monomials (2080 for d=64, p=2)."""
    return math.comb(d + deg - 1, deg)


def retention_fwd_flops(s: Shape) -> float:
    if s.t <= s.chunk:  # one chunk: the quadratic formula runs
        return float(s.b * s.h * 2 * s.t * s.t * s.d)
    D = exact_feature_dim(s.d, s.deg)
    return float(s.b * s.h * s.t * s.d * (4 * D + 2 * s.chunk))


def sdpa_fwd_flops(s: Shape) -> float:
    return float(s.b * s.h * 2 * s.t * s.t * s.d)


def gla_fwd_flops(s: Shape) -> float:
    return float(s.b * s.h * s.t * s.d * (4 * s.d + 2 * GLA_CHUNK))


FWD_FLOPS: dict[str, Callable[[Shape], float]] = {
    "vidrial": retention_fwd_flops, "retention": retention_fwd_flops,
    "sdpa": sdpa_fwd_flops, "gla": gla_fwd_flops,
}


def flops(impl: str, kind: str, s: Shape) -> float | None:
    if kind == "decode":
        return None
    f = FWD_FLOPS[impl](s)
    return f * FWD_BWD_FACTOR if kind == "fwd_bwd" else f


def decode_state_bytes(s: Shape) -> float:
    """b*h*D*d*2: the bf16 state a power-retention decode step must read (exact D)."""
    return float(s.b * s.h * exact_feature_dim(s.d, s.deg) * s.d * 2)


def bytes_moved(impl: str, kind: str, s: Shape) -> float | None:
    """Fewest bytes the step must move (decode only; training kinds are compute-bound)."""
    if kind != "decode":
        return None
    if impl in ("vidrial", "retention"):
        return decode_state_bytes(s)
    if impl == "sdpa":
        return float(2 * s.b * s.h * s.t * s.d * 2)
    if impl == "gla":
        return float(2 * s.b * s.h * s.d * s.d * 4)
    raise KeyError(impl)


# ---------------------------------------------------------------- cases

@dataclass
class Impl:
    """One implementation of a case. `make(seed)` draws a fresh input set and returns the timed
    closure (launches on the current stream, no sync); `check(seed)` (vidrial only) runs the op
    once and returns {"rel_err", "tol", "what"} against the float64 reference."""

    name: str
    make: Callable[[int], Callable[[], Any]] | None
    flops: float | None = None
    bytes: float | None = None
    check: Callable[[int], dict[str, Any]] | None = None
    skipped: str | None = None  # "skipped: ..." / "not available: ..." -> reported, not run
    note: str = ""


@dataclass
class Case:
    name: str
    kind: str
    shape: Shape
    tags: tuple[str, ...] = ()
    impls: dict[str, Impl] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"case": self.name, "kind": self.kind, "shape": self.shape.as_dict(), "tags": list(self.tags)}


def _tags(s: Shape, sweep: bool) -> tuple[str, ...]:
    tags = []
    if s == SHAPE_A:
        tags.append("A")
    if s == SHAPE_B:
        tags.append("B")
    if sweep:
        tags.append("sweep")
    return tuple(tags)


def training_shapes(preset: Preset) -> list[Shape]:
    """The context sweep at fixed tokens per batch, plus shapes A and B if the sweep misses them."""
    shapes = [Shape(b=max(1, preset.tokens_per_batch // t), t=t) for t in preset.sweep_t]
    for s in (SHAPE_A, SHAPE_B):
        if s not in shapes:
            shapes.append(s)
    return shapes


def decode_shapes(preset: Preset) -> list[Shape]:
    return [Shape(b=b, t=DECODE_HISTORY) for b in preset.decode_batches]


def case_name(kind: str, s: Shape) -> str:
    return f"{kind} {s.label()}"


def build_cases(preset: Preset, kinds: tuple[str, ...] | list[str], peers: dict[str, Any]) -> list[Case]:
    """Cases for `kinds` (fwd, fwd_bwd, decode). `peers`: name -> peers.Peer (available, funcs)."""
    from vidrial.bench.peers import IMPL_NAMES

    sweep = set(preset.sweep_t)
    cases: list[Case] = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        shapes = decode_shapes(preset) if kind == "decode" else training_shapes(preset)
        for s in shapes:
            tags = ("decode",) if kind == "decode" else _tags(s, s.t in sweep and s.b * s.t == preset.tokens_per_batch)
            case = Case(case_name(kind, s), kind, s, tags)
            for name in IMPL_NAMES:
                case.impls[name] = _impl(name, kind, s, peers.get(name))
            cases.append(case)
    return cases


def _impl(name: str, kind: str, s: Shape, peer: Any) -> Impl:
    impl = Impl(name, None, flops=flops(name, kind, s), bytes=bytes_moved(name, kind, s))
    if peer is None:
        impl.skipped = "skipped: not loaded"
        return impl
    if not peer.available:
        impl.skipped = peer.note or "skipped"
        return impl
    fn = peer.funcs.get(kind)
    if fn is None:
        impl.skipped = peer.missing.get(kind, f"not available: no {kind} in {name}")
        return impl
    impl.note = peer.note
    factory = MAKERS[(name, kind)]
    impl.make = lambda seed, _f=factory, _fn=fn: _f(_fn, s, seed)
    chk = CHECKS.get((name, kind))
    if chk is not None:
        impl.check = lambda seed, _c=chk, _fn=fn: _c(_fn, s, seed)
    return impl


# ---------------------------------------------------------------- inputs and callables (torch, lazily)

def _gen(seed: int):
    import torch

    return torch.Generator(device=DEVICE).manual_seed(int(seed))


def training_inputs(s: Shape, seed: int) -> dict[str, Any]:
    """Q, K, V [b,t,h,d] bf16 randn, log_G [b,t,h] float32 = logsigmoid(randn + 4), dY bf16 randn."""
    import torch

    g = _gen(seed)
    mk = lambda: torch.randn(s.b, s.t, s.h, s.d, device=DEVICE, generator=g, dtype=torch.bfloat16)  # noqa: E731
    Q, K, V = mk(), mk(), mk()
    log_G = torch.nn.functional.logsigmoid(torch.randn(s.b, s.t, s.h, device=DEVICE, generator=g) + GATE_SHIFT)
    dY = mk()
    return {"Q": Q, "K": K, "V": V, "log_G": log_G, "dY": dY}


def _leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def _fwd_bwd(f, leaves, dY):
    def run():
        for x in leaves:
            x.grad = None
        Y = f(*leaves)
        Y.backward(dY)
    return run


def _chunk(s: Shape):
    return s.chunk


def make_vidrial_fwd(fn, s: Shape, seed: int):
    x = training_inputs(s, seed)
    Q, K, V, G = x["Q"], x["K"], x["V"], x["log_G"]
    return lambda: fn(Q, K, V, G, deg=s.deg, chunk_size=_chunk(s))


make_retention_fwd = make_vidrial_fwd  # same signature (retention.triton.power_retention)


def make_vidrial_fwd_bwd(fn, s: Shape, seed: int):
    x = training_inputs(s, seed)
    leaves = _leaves(x["Q"], x["K"], x["V"], x["log_G"])
    return _fwd_bwd(lambda q, k, v, g: fn(q, k, v, g, deg=s.deg, chunk_size=_chunk(s)), leaves, x["dY"])


make_retention_fwd_bwd = make_vidrial_fwd_bwd


def _bhtd(x):
    return x.transpose(1, 2).contiguous()


def make_sdpa_fwd(fn, s: Shape, seed: int):
    x = training_inputs(s, seed)
    q, k, v = (_bhtd(x[n]) for n in ("Q", "K", "V"))
    return lambda: fn(q, k, v)


def make_sdpa_fwd_bwd(fn, s: Shape, seed: int):
    x = training_inputs(s, seed)
    leaves = _leaves(*(_bhtd(x[n]) for n in ("Q", "K", "V")))
    return _fwd_bwd(fn, leaves, _bhtd(x["dY"]))


def _gla_gate(s: Shape, g, t: int | None = None):
    import torch

    t = s.t if t is None else t
    return torch.nn.functional.logsigmoid(torch.randn(s.b, t, s.h, s.d, device=DEVICE, generator=g) + GATE_SHIFT)


def make_gla_fwd(fn, s: Shape, seed: int):
    x = training_inputs(s, seed)
    gk = _gla_gate(s, _gen(seed + 7919))
    Q, K, V = x["Q"], x["K"], x["V"]
    return lambda: fn(Q, K, V, gk)[0]


def make_gla_fwd_bwd(fn, s: Shape, seed: int):
    x = training_inputs(s, seed)
    gk = _gla_gate(s, _gen(seed + 7919))
    leaves = _leaves(x["Q"], x["K"], x["V"], gk)
    return _fwd_bwd(lambda q, k, v, g: fn(q, k, v, g)[0], leaves, x["dY"])


# decode: one new token per step against a state (power retention, GLA) or a T-token KV cache (SDPA)

def vidrial_decode_inputs(s: Shape, seed: int, n_hist: int = 32) -> dict[str, Any]:
    """q, k, v [b,1,h,d] bf16 (the new token is the cache), log_G [b,1,h], a bf16 state S [b,h,D,d]
    and fp32 sum of keys z [b,h,D] built from n_hist random keys (S = sum phi(k) v^T, z = sum phi(k),
    so every normaliser is positive), in vidrial's default layout (d_tile)."""
    import torch

    from vidrial.reference.forward import phi
    from vidrial.kernels.power_retention.sympow import default_d_tile

    g = _gen(seed)
    dt = default_d_tile(s.d, s.deg)
    mk = lambda t: torch.randn(s.b, t, s.h, s.d, device=DEVICE, generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(1), mk(1), mk(1)
    log_G = torch.nn.functional.logsigmoid(torch.randn(s.b, 1, s.h, device=DEVICE, generator=g) + GATE_SHIFT)
    Kh = torch.randn(s.b, n_hist, s.h, s.d, device=DEVICE, generator=g)
    Vh = torch.randn(s.b, n_hist, s.h, s.d, device=DEVICE, generator=g)
    S = torch.zeros(s.b, s.h, phi(Kh[:1, :1, :1], s.deg, dt).shape[-1], s.d, device=DEVICE, dtype=torch.float64)
    z = torch.zeros(S.shape[:3], device=DEVICE, dtype=torch.float64)
    for j in range(n_hist):  # one key at a time keeps the float64 features small at b=64
        f = phi(Kh[:, j], s.deg, dt)  # [b, h, D]
        S += f.unsqueeze(-1) * Vh[:, j].double().unsqueeze(-2)
        z += f
    return {"q": q, "k": k, "v": v, "log_G": log_G, "S": S.to(torch.bfloat16), "z": z.float(), "d_tile": dt}


def make_vidrial_decode(fn, s: Shape, seed: int):
    x = vidrial_decode_inputs(s, seed)
    scale = 1.0 / math.sqrt(s.d)
    return lambda: fn(x["q"], x["k"], x["v"], x["log_G"], x["S"], x["z"], deg=s.deg, scale=scale,
                      switch_over_seq_len=512)[0]


def make_retention_decode(fn, s: Shape, seed: int):
    import torch

    try:
        from retention._utils import compute_expanded_dim

        D = compute_expanded_dim(s.d, s.deg)
    except Exception:
        D = exact_feature_dim(s.d, s.deg)
    g = _gen(seed)
    mk = lambda t: torch.randn(s.b, t, s.h, s.d, device=DEVICE, generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(1), mk(1), mk(1)
    log_G = torch.nn.functional.logsigmoid(torch.randn(s.b, 1, s.h, device=DEVICE, generator=g) + GATE_SHIFT)
    S = (torch.randn(s.b, s.h, D, s.d, device=DEVICE, generator=g) * 0.01).to(torch.bfloat16)
    z = torch.rand(s.b, s.h, D, device=DEVICE, generator=g) * 100 + 1
    scale = 1.0 / math.sqrt(s.d)
    return lambda: fn(q, k, v, log_G, S, z, deg=s.deg, scale=scale, switch_over_seq_len=512)[0]


def make_sdpa_decode(fn, s: Shape, seed: int):
    import torch

    g = _gen(seed)
    q = torch.randn(s.b, s.h, 1, s.d, device=DEVICE, generator=g, dtype=torch.bfloat16)
    K = torch.randn(s.b, s.h, s.t, s.d, device=DEVICE, generator=g, dtype=torch.bfloat16)
    V = torch.randn(s.b, s.h, s.t, s.d, device=DEVICE, generator=g, dtype=torch.bfloat16)
    return lambda: fn(q, K, V)


def make_gla_decode(fn, s: Shape, seed: int):
    import torch

    g = _gen(seed)
    mk = lambda: torch.randn(s.b, 1, s.h, s.d, device=DEVICE, generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    gk = _gla_gate(s, g, t=1)
    h0 = torch.randn(s.b, s.h, s.d, s.d, device=DEVICE, generator=g) * 0.01
    return lambda: fn(q, k, v, gk=gk, initial_state=h0, output_final_state=True)[0]


MAKERS: dict[tuple[str, str], Callable[..., Callable[[], Any]]] = {
    ("vidrial", "fwd"): make_vidrial_fwd, ("vidrial", "fwd_bwd"): make_vidrial_fwd_bwd,
    ("vidrial", "decode"): make_vidrial_decode,
    ("retention", "fwd"): make_retention_fwd, ("retention", "fwd_bwd"): make_retention_fwd_bwd,
    ("retention", "decode"): make_retention_decode,
    ("sdpa", "fwd"): make_sdpa_fwd, ("sdpa", "fwd_bwd"): make_sdpa_fwd_bwd, ("sdpa", "decode"): make_sdpa_decode,
    ("gla", "fwd"): make_gla_fwd, ("gla", "fwd_bwd"): make_gla_fwd_bwd, ("gla", "decode"): make_gla_decode,
}


# ---------------------------------------------------------------- correctness checks (vidrial, before timing)

CHECK_TOKENS = 2048  # the float64 reference runs on batch 0, the first CHECK_TOKENS tokens
FWD_TOL = 2e-2
GRAD_TOL = 5e-2


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf on NaN/inf."""
    import torch

    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    n = r.norm().item()
    return float((o - r).norm().item() / (n if n > 0 else 1.0))


def _prefix(s: Shape) -> int:
    return min(s.t, CHECK_TOKENS)


def _ref_chunk(s: Shape, ts: int):
    return s.chunk if ts > s.chunk else None


def check_vidrial_fwd(fn, s: Shape, seed: int) -> dict[str, Any]:
    """Y of the full case vs the float64 reference on batch 0's first tokens (causal: a prefix of
    the output depends on the same prefix of the inputs only)."""
    from vidrial.reference.forward import power_retention_reference

    x = training_inputs(s, seed)
    Y = fn(x["Q"], x["K"], x["V"], x["log_G"], deg=s.deg, chunk_size=_chunk(s))
    ts = _prefix(s)
    sl = lambda a: a[:1, :ts]  # noqa: E731
    ref = power_retention_reference(sl(x["Q"]), sl(x["K"]), sl(x["V"]), sl(x["log_G"]), deg=s.deg,
                                    chunk_size=_ref_chunk(s, ts))
    return {"rel_err": rel_err(sl(Y), ref), "tol": FWD_TOL,
            "what": f"Y[0, :{ts}] vs float64 reference (||out-ref||/||ref||)"}


def check_vidrial_fwd_bwd(fn, s: Shape, seed: int) -> dict[str, Any]:
    """Gradients of the full case with dY zero outside batch 0's first tokens vs float64 autograd of
    the reference on that prefix (then the prefix's gradients are the prefix problem's)."""
    import torch

    from vidrial.reference.forward import power_retention_reference

    x = training_inputs(s, seed)
    ts = _prefix(s)
    dY = torch.zeros_like(x["dY"])
    dY[:1, :ts] = x["dY"][:1, :ts]
    leaves = _leaves(x["Q"], x["K"], x["V"], x["log_G"])
    _fwd_bwd(lambda q, k, v, g: fn(q, k, v, g, deg=s.deg, chunk_size=_chunk(s)), leaves, dY)()
    ref_leaves = [a[:1, :ts].detach().double().requires_grad_(True) for a in (x["Q"], x["K"], x["V"], x["log_G"])]
    Yr = power_retention_reference(*ref_leaves, deg=s.deg, chunk_size=_ref_chunk(s, ts))
    Yr.backward(dY[:1, :ts].double())
    errs = {n: rel_err(a.grad[:1, :ts], r.grad) for n, a, r in zip(("dQ", "dK", "dV", "dlog_G"), leaves, ref_leaves)}
    return {"rel_err": max(errs.values()), "tol": GRAD_TOL, "per_input": errs,
            "what": f"gradients on batch 0, first {ts} tokens, vs float64 autograd of the reference"}


def check_vidrial_decode(fn, s: Shape, seed: int) -> dict[str, Any]:
    from vidrial.reference.forward import power_retention_inference_reference

    x = vidrial_decode_inputs(s, seed)
    scale = 1.0 / math.sqrt(s.d)
    Y = fn(x["q"], x["k"], x["v"], x["log_G"], x["S"], x["z"], deg=s.deg, scale=scale, switch_over_seq_len=512)[0]
    ref = power_retention_inference_reference(x["q"], x["k"], x["v"], x["log_G"], x["S"], x["z"], deg=s.deg,
                                              scale=scale, switch_over_seq_len=512, d_tile=x["d_tile"])[0]
    return {"rel_err": rel_err(Y, ref), "tol": FWD_TOL, "what": "Y vs float64 inference reference"}


CHECKS: dict[tuple[str, str], Callable[..., dict[str, Any]]] = {
    ("vidrial", "fwd"): check_vidrial_fwd,
    ("vidrial", "fwd_bwd"): check_vidrial_fwd_bwd,
    ("vidrial", "decode"): check_vidrial_decode,
}


__all__ = ["Shape", "Preset", "PRESETS", "Case", "Impl", "KINDS", "SHAPE_A", "SHAPE_B", "build_cases",
           "exact_feature_dim", "retention_fwd_flops", "sdpa_fwd_flops", "gla_fwd_flops", "flops",
           "bytes_moved", "decode_state_bytes", "training_shapes", "decode_shapes", "FWD_BWD_FACTOR"]
