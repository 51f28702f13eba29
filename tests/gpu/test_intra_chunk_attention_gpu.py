"""Intra-chunk power attention on a GPU against the float64 references.

Merge mode vs reference.intra_chunk_attention_reference (same (O, l, m) definition), normalised
(quadratic) mode vs reference.attention_reference. Outputs are poisoned with NaN first, so an
unwritten element fails the test."""
import math

import pytest
import torch
import torch.nn.functional as F

from vidrial.kernels.power_retention.intra_chunk_attention import (
    IntraChunkAttentionConfig as Config,
    intra_chunk_attention,
)
from vidrial.reference.forward import attention_reference, intra_chunk_attention_reference

pytestmark = pytest.mark.gpu

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"bf16": 1.2e-2, "fp16": 4e-3}


def _inputs(b, t, h, r, d, dtype, gating, seed=0, qscale=1.0, gate_lo=-1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Q = (torch.randn(b, t, h * r, d, device="cuda", generator=g) * qscale).to(DT[dtype])
    K = torch.randn(b, t, h, d, device="cuda", generator=g).to(DT[dtype])
    V = torch.randn(b, t, h, d, device="cuda", generator=g).to(DT[dtype])
    log_G = None
    if gating:  # logsigmoid of values spread so that some steps decay hard, most lightly
        x = torch.rand(b, t, h, device="cuda", generator=g) * (6.0 - gate_lo) + gate_lo
        log_G = F.logsigmoid(x).float()
    return Q, K, V, log_G


def _poisoned_merge(b, t, hq, d):
    return (torch.full((b, t, hq, d), float("nan"), device="cuda"),
            torch.full((b, t, hq), float("nan"), device="cuda"),
            torch.full((b, t, hq), float("nan"), device="cuda"))


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _check_merge(Q, K, V, log_G, deg, chunk, dtype, scale=None, config=None, m_tol=1e-3):
    b, t, hq, d = Q.shape
    out = _poisoned_merge(b, t, hq, d)
    O, l, m = intra_chunk_attention(Q, K, V, log_G, deg=deg, scale=scale, chunk_size=chunk, config=config, out=out)
    assert O.data_ptr() == out[0].data_ptr()
    torch.cuda.synchronize()
    assert torch.isfinite(O).all() and torch.isfinite(l).all() and torch.isfinite(m).all()
    Or, lr, mr = intra_chunk_attention_reference(Q, K, V, log_G, deg, scale, chunk)
    tol = TOL[dtype]
    # m is the log of the row max weight: absolute error in log space = relative error of e^m
    assert (m.double() - mr).abs().max().item() < m_tol
    assert _rel(l, lr) < 1e-3
    # the chunk-local outputs O/l, row by row relative to the row's scale
    Y, Yr = O / l[..., None], Or / lr[..., None]
    err = ((Y.double() - Yr).abs().amax(-1) / Yr.abs().amax(-1).clamp_min(1e-3)).max().item()
    assert err < 4 * tol, err
    assert _rel(O, Or) < tol


CASES = []
for d in (32, 64, 128):
    for deg in (2, 4):
        for dtype in ("bf16", "fp16"):
            CASES.append((1, 1000, 2, 1, d, deg, dtype, 256, True))
for chunk in (64, 128, 512, 1024):
    for gating in (True, False):
        for r in (1, 4):
            CASES.append((2, 1000, 2, r, 64, 2, "bf16", chunk, gating))
for t in (1, 15, 128, 4096):
    for chunk in (64, 1024):
        CASES.append((1, t, 2, 4, 64, 2, "bf16", chunk, True))
CASES.append((2, 4096, 1, 1, 128, 4, "fp16", 1024, False))
CASES.append((1, 777, 3, 2, 32, 4, "bf16", 128, False))


NORM_CASES = []
for d in (32, 64, 128):
    for deg in (2, 4):
        NORM_CASES.append((1, 1000, 2, 2, d, deg, "bf16", True))
for t in (1, 15, 128, 4096):
    NORM_CASES.append((1, t, 2, 4, 64, 2, "bf16", True))
NORM_CASES.append((2, 3000, 2, 1, 64, 2, "fp16", False))
NORM_CASES.append((1, 4096, 1, 1, 128, 4, "fp16", True))


@pytest.fixture(scope="module", autouse=True)
def _precompile():
    """Compiles the default configs of every key used here in parallel (the tests then hit the cache)."""
    from vidrial.core.arch import device_arch
    from vidrial.core.compile import compile_many
    from vidrial.kernels.power_retention.intra_chunk_attention import family

    arch = device_arch()
    keys = set()
    for (_, _, _, _, d, deg, dtype, chunk, gating) in CASES:
        keys.add(family.Key(head_dim=d, deg=deg, dtype=str(DT[dtype]).removeprefix("torch."), chunk_size=chunk, gating=gating))
    for (_, _, _, _, d, deg, dtype, gating) in NORM_CASES:
        keys.add(family.Key(head_dim=d, deg=deg, dtype=str(DT[dtype]).removeprefix("torch."), chunk_size=0, gating=gating, normalize=True))
        keys.add(family.Key(head_dim=d, deg=deg, dtype=str(DT[dtype]).removeprefix("torch."), chunk_size=128, gating=gating, normalize=True))
        keys.add(family.Key(head_dim=d, deg=deg, dtype=str(DT[dtype]).removeprefix("torch."), chunk_size=128, gating=gating))
    jobs = [(family.render(family.compile_key(k), family.default_config(k)), arch, (), k.label()) for k in sorted(
        keys, key=lambda k: k.key_string())]
    compile_many(jobs)
    yield


@pytest.mark.parametrize("b,t,h,r,d,deg,dtype,chunk,gating", CASES)
def test_merge_mode_vs_reference(b, t, h, r, d, deg, dtype, chunk, gating):
    Q, K, V, log_G = _inputs(b, t, h, r, d, dtype, gating, seed=t + d + chunk)
    _check_merge(Q, K, V, log_G, deg, chunk, dtype)


@pytest.mark.parametrize("cfg", [
    Config(tile_m=16, tile_n=16, warps=1, stages=2),
    Config(tile_m=64, tile_n=32, warps=2, stages=3),
    Config(tile_m=128, tile_n=64, warps=8, stages=2),
    Config(tile_m=128, tile_n=32, warps=4, stages=4, rescale_log2=0),
    Config(tile_m=256, tile_n=64, warps=8, stages=3),
    Config(tile_m=64, tile_n=64, warps=4, stages=2, min_ctas=3, q_in_regs=False),
    Config(tile_m=128, tile_n=64, warps=8, stages=3, q_in_regs=False),
    Config(tile_m=128, tile_n=128, warps=8, stages=2),
])
def test_merge_mode_configs(cfg):
    Q, K, V, log_G = _inputs(2, 1100, 2, 2, 64, "bf16", True, seed=7)
    _check_merge(Q, K, V, log_G, 2, 256, "bf16", config=cfg)


def test_scale_and_strided_inputs():
    b, t, h, r, d = 2, 600, 2, 2, 64
    big = torch.randn(b, t, h * r + 3, d + 8, device="cuda").to(torch.bfloat16)
    Q = big[:, :, 1:1 + h * r, 8:]  # head and time strides are not those of a contiguous tensor
    _, K, V, log_G = _inputs(b, t, h, r, d, "bf16", True, seed=3)
    _check_merge(Q, K, V, log_G, 2, 128, "bf16", scale=0.05)
    _check_merge(Q, K, V, log_G, 4, 128, "bf16", scale=0.0)


def test_range_extremes():
    """Large |q.k| (fp16, p=4), hard gates, zero queries: finite and equal to the reference."""
    b, t, h, d = 1, 2048, 2, 64
    Q, K, V, log_G = _inputs(b, t, h, 1, d, "fp16", True, seed=11, qscale=8.0, gate_lo=-30.0)
    # G reaches -3e4 inside a chunk here: float32 cumulative gates carry ~1e-3 absolute error,
    # which moves m (a log) by as much (0.1% relative on e^m; O/l is unaffected at this level)
    _check_merge(Q, K, V, log_G, 4, 1024, "fp16", m_tol=5e-3)
    Q[:, 100:300] = 0  # all-zero rows: every weight is the guard eps^p
    _check_merge(Q, K, V, log_G, 2, 1024, "fp16", m_tol=5e-3)
    _check_merge(Q, K, V, None, 4, 1024, "fp16")


@pytest.mark.parametrize("b,t,h,r,d,deg,dtype,gating", NORM_CASES)
def test_normalized_quadratic_vs_attention_reference(b, t, h, r, d, deg, dtype, gating):
    Q, K, V, log_G = _inputs(b, t, h, r, d, dtype, gating, seed=t + d)
    out = torch.full((b, t, h * r, d), float("nan"), device="cuda", dtype=DT[dtype])
    Y = intra_chunk_attention(Q, K, V, log_G, deg=deg, chunk_size=None, normalize=True, out=out)
    torch.cuda.synchronize()
    assert Y.dtype == DT[dtype] and torch.isfinite(Y).all()
    Yr = attention_reference(Q, K, V, log_G, deg)
    err = ((Y.double() - Yr).abs().amax(-1) / Yr.abs().amax(-1).clamp_min(1e-3)).max().item()
    assert err < 4 * TOL[dtype], err
    # normalised chunked mode = merge mode's O / l
    if t >= 128:
        Yc = intra_chunk_attention(Q, K, V, log_G, deg=deg, chunk_size=128, normalize=True)
        O, l, _ = intra_chunk_attention(Q, K, V, log_G, deg=deg, chunk_size=128)
        assert _rel(Yc, O / l[..., None]) < 2 * TOL[dtype]


def test_long_sequence_no_gating_is_finite():
    """t = 65536, no gating, quadratic: no inf/NaN; the last queries match the reference."""
    b, t, h, d = 1, 65536, 1, 64
    Q, K, V, _ = _inputs(b, t, h, 1, d, "bf16", False, seed=5, qscale=2.0)
    Y = intra_chunk_attention(Q, K, V, None, deg=4, chunk_size=0, normalize=True)
    torch.cuda.synchronize()
    assert torch.isfinite(Y).all()
    Yr = attention_reference(Q[:, -64:], K, V, None, 4)  # queries = the last 64 positions
    err = ((Y[:, -64:].double() - Yr).abs().amax(-1) / Yr.abs().amax(-1)).max().item()
    assert err < 4 * TOL["bf16"], err
    O, l, m = intra_chunk_attention(Q, K, V, None, deg=4, chunk_size=65536)
    assert torch.isfinite(O).all() and torch.isfinite(l).all() and torch.isfinite(m).all()


def test_gated_early_exit_long_rows():
    """Quadratic path with decaying gates: CTAs stop once every remaining key's gate factor
    underflows; the result must still equal the reference (the skipped weights are exactly 0)."""
    Q, K, V, log_G = _inputs(1, 8192, 2, 2, 64, "bf16", True, seed=21)
    Y = intra_chunk_attention(Q, K, V, log_G, deg=2, chunk_size=None, normalize=True)
    Yr = attention_reference(Q[:, -512:], K, V, log_G, 2)
    err = ((Y[:, -512:].double() - Yr).abs().amax(-1) / Yr.abs().amax(-1)).max().item()
    assert err < 4 * TOL["bf16"], err
    # weak gates (no early exit possible): same check
    weak = log_G * 1e-3
    Y = intra_chunk_attention(Q, K, V, weak, deg=2, chunk_size=None, normalize=True)
    Yr = attention_reference(Q[:, -512:], K, V, weak, 2)
    err = ((Y[:, -512:].double() - Yr).abs().amax(-1) / Yr.abs().amax(-1)).max().item()
    assert err < 4 * TOL["bf16"], err


def test_current_stream_and_graph():
    Q, K, V, log_G = _inputs(1, 512, 2, 1, 64, "bf16", True, seed=9)
    ref = intra_chunk_attention(Q, K, V, log_G, deg=2, chunk_size=128, normalize=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = intra_chunk_attention(Q, K, V, log_G, deg=2, chunk_size=128, normalize=True)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    out = torch.full_like(ref, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        intra_chunk_attention(Q, K, V, log_G, deg=2, chunk_size=128, normalize=True, out=out)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_matches_retention_triton_attention():
    """Same (O, l, m) triple as retention 1.0.7's intra-chunk call (norm=False on chunk views)."""
    rt = pytest.importorskip("retention._attention.triton")
    b, t, h, r, d, c = 1, 2048, 2, 1, 64, 512  # r=1: the autotune key of the benchmark (its cache is reused)
    Q, K, V, log_G = _inputs(b, t, h, r, d, "bf16", True, seed=13)
    n = t // c
    g = log_G.view(b, n, c, h).cumsum(2)
    Yt, lt, mt = rt.attention(Q.view(b * n, c, h * r, d), K.view(b * n, c, h, d), V.view(b * n, c, h, d),
                              g.view(b * n, c, h), 2, scale=1 / math.sqrt(d), norm=False)
    O, l, m = intra_chunk_attention(Q, K, V, log_G, deg=2, chunk_size=c)
    Yt, lt, mt = Yt.view(b, t, h * r, d).float(), lt.view(b, t, h * r), mt.view(b, t, h * r)
    # retention's l starts at 1 before the first max (a different guard), so compare O/l
    assert _rel(O / l[..., None], Yt / lt[..., None]) < 3e-2
