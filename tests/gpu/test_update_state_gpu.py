"""update_state on a GPU against the float64 reference: d, p, d_tile, dtype, chunk, gating, tiles,
strided inputs, runtime batch/heads/chunks, side streams and CUDA graphs. Outputs are poisoned
(NaN) before every run; fresh random inputs each case."""
from __future__ import annotations

import pytest
import torch

from vidrial.kernels.power_retention.sympow import feature_dim
from vidrial.kernels.power_retention.update_state import UpdateStateConfig, family, update_state

pytestmark = pytest.mark.gpu

try:
    from vidrial.reference.forward import update_state_reference
except ImportError:  # pragma: no cover - the shared reference is the normal path
    update_state_reference = None


def _local_reference(K, V, log_G, deg, d_tile, chunk_size):
    from vidrial.kernels.power_retention.sympow import layout

    b, t, h, d = K.shape
    n, c = t // chunk_size, chunk_size
    K64, V64 = K.double().reshape(b, n, c, h, d), V.double().reshape(b, n, c, h, d)
    if log_G is not None:
        g = log_G.double().reshape(b, n, c, h).cumsum(2)
        K64 = K64 * torch.exp((g[:, :, -1:] - g) / deg).unsqueeze(-1)
    idx, coef = layout(d, deg, d_tile).feature_indices()
    phi = K64[..., idx.to(K.device)].prod(-1) * coef.to(K.device)  # [b,n,c,h,D]
    return torch.einsum("bnchD,bnche->bnhDe", phi, V64), phi.sum(2)


def reference(*args):
    return (update_state_reference or _local_reference)(*args)


def _inputs(b, t, h, d, dtype, gating, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    K = (torch.randn(b, t, h, d, device="cuda", generator=gen) / d**0.25).to(dtype)
    V = torch.randn(b, t, h, d, device="cuda", generator=gen).to(dtype)
    G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device="cuda", generator=gen) + 3.0) if gating else None
    return K, V, G


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _run_and_check(K, V, G, deg, d_tile, chunk, config=None, tol=None):
    # poison the caching allocator's next blocks of the output sizes with NaN
    b, t, h, d = K.shape
    D = feature_dim(d, deg, d_tile)
    n = t // chunk
    torch.empty(b * n * h * D * d, device="cuda").fill_(float("nan"))
    torch.empty(b * n * h * D, device="cuda").fill_(float("nan"))
    S, s = update_state(K, V, G, deg=deg, d_tile=d_tile, chunk_size=chunk, config=config)
    torch.cuda.synchronize()
    assert S.shape == (b, n, h, D, d) and s.shape == (b, n, h, D)
    assert S.dtype == torch.float32 and s.dtype == torch.float32
    assert torch.isfinite(S).all() and torch.isfinite(s).all(), "NaN/inf left in the output"
    S_ref, s_ref = reference(K, V, G, deg, d_tile, chunk)
    if tol is None:
        tol = (1e-2 if K.dtype == torch.bfloat16 else 3e-3) * (1.5 if deg == 4 else 1.0)
    eS, es = _rel(S, S_ref), _rel(s, s_ref)
    assert eS < tol and es < tol, f"relative error S {eS:.2e}, s {es:.2e} (tol {tol:.1e})"
    return S, s


CASES = [
    # d, deg, d_tile, dtype, chunk, gating
    *[(d, 2, 8, torch.bfloat16, 64, g) for d in (32, 64, 128) for g in (True, False)],
    *[(64, 2, t, torch.bfloat16, 128, True) for t in (1, 2, 4, 16, 32, 64)],
    (128, 2, 1, torch.bfloat16, 64, True),
    (32, 2, 32, torch.float16, 64, False),
    *[(64, 2, 8, torch.float16, 256, g) for g in (True, False)],
    (128, 2, 16, torch.float16, 128, True),
    *[(64, 2, 8, torch.bfloat16, c, True) for c in (16, 48, 1024)],
    *[(32, 4, t, torch.bfloat16, 64, True) for t in (1, 2, 4)],
    (32, 4, 4, torch.float16, 32, False),
    (32, 4, 8, torch.bfloat16, 16, True),
]


@pytest.mark.parametrize("d,deg,d_tile,dtype,chunk,gating", CASES,
                         ids=[f"d{c[0]}-p{c[1]}-T{c[2]}-{str(c[3])[6:]}-c{c[4]}-g{int(c[5])}" for c in CASES])
def test_matches_reference(d, deg, d_tile, dtype, chunk, gating):
    K, V, G = _inputs(1, 2 * chunk, 2, d, dtype, gating, seed=d * 31 + deg * 7 + d_tile + chunk)
    _run_and_check(K, V, G, deg, d_tile, chunk)


TILE_CONFIGS = [
    dict(tile_m=16, tile_k=16, warps=1, stages=2),
    dict(tile_m=64, tile_k=32, warps=4, stages=2),
    dict(tile_m=128, tile_k=64, warps=2, stages=4),
    dict(tile_m=256, tile_k=64, warps=4, stages=3, min_ctas=2),
    dict(tile_m=256, tile_k=128, warps=8, stages=2),
    dict(tile_m=512, tile_k=32, warps=8, stages=3),
]


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("d,d_tile", [(64, 8), (64, 1), (32, 4), (128, 8)])
def test_tile_configs(cfg, d, d_tile):
    config = UpdateStateConfig(**cfg)
    from vidrial.core.errors import ConfigError
    from vidrial.kernels.power_retention.update_state import UpdateStateKey

    key = UpdateStateKey(head_dim=d, d_tile=d_tile, chunk_size=256)
    try:
        family.check(key, config, "sm_90")
    except ConfigError as exc:
        pytest.skip(f"invalid for this key: {exc}")
    K, V, G = _inputs(2, 512, 3, d, torch.bfloat16, True, seed=7)
    _run_and_check(K, V, G, 2, d_tile, 256, config=config)


def test_runtime_sizes_share_one_kernel():
    """batch, heads and chunk counts are runtime: one compiled kernel serves all of them."""
    before = len(family._launchables)
    for b, h, n in [(1, 1, 1), (3, 5, 2), (2, 8, 7)]:
        K, V, G = _inputs(b, 64 * n, h, 64, torch.bfloat16, True, seed=b * 100 + h * 10 + n)
        _run_and_check(K, V, G, 2, 8, 64)
    # the runtime bucket is not part of the kernel: at most one new launchable for all three
    assert len(family._launchables) - before <= 1


def test_strided_inputs():
    """K and V as views into one packed [b, t, h, 2d] tensor; log_G as a view too."""
    b, t, h, d = 2, 256, 4, 64
    kv = torch.randn(b, t, h, 2 * d, device="cuda").to(torch.bfloat16)
    K, V = kv[..., :d], kv[..., d:]
    g_full = torch.nn.functional.logsigmoid(torch.randn(b, t, 2 * h, device="cuda") + 3)
    G = g_full[..., ::2]
    assert not K.is_contiguous() and not G.is_contiguous()
    _run_and_check(K, V, G, 2, 8, 128)


def test_side_stream_and_cuda_graph():
    K, V, G = _inputs(1, 256, 2, 64, torch.bfloat16, True, seed=3)
    S_ref, s_ref = reference(K, V, G, 2, 8, 128)
    S, s = update_state(K, V, G, chunk_size=128)  # warm-up: compiles, loads, builds the table
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        S2, s2 = update_state(K, V, G, chunk_size=128)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert _rel(S2, S_ref) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        Sg, sg = update_state(K, V, G, chunk_size=128)
    Sg.fill_(float("nan"))
    K.copy_((torch.randn_like(K.float()) / 8).to(K.dtype))
    graph.replay()
    torch.cuda.synchronize()
    S_ref2, s_ref2 = reference(K, V, G, 2, 8, 128)
    assert _rel(Sg, S_ref2) < 1e-2 and _rel(sg, s_ref2) < 1e-2


# ---- the Hopper implementation (impl="wgmma", sm_90a) ----------------------------------------------
def _hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


WGMMA_CASES = [c for c in CASES if c[0] in (64, 128)]


@pytest.mark.parametrize("d,deg,d_tile,dtype,chunk,gating", WGMMA_CASES,
                         ids=[f"d{c[0]}-p{c[1]}-T{c[2]}-{str(c[3])[6:]}-c{c[4]}-g{int(c[5])}" for c in WGMMA_CASES])
def test_wgmma_matches_reference(d, deg, d_tile, dtype, chunk, gating):
    """The wgmma kernel's best measured tiles for each key against float64."""
    if not _hopper():
        pytest.skip("the wgmma kernel needs a Hopper GPU (sm_90)")
    from vidrial.kernels.power_retention.update_state import UpdateStateKey

    key = UpdateStateKey(head_dim=d, deg=deg, d_tile=d_tile, dtype=str(dtype)[6:], chunk_size=chunk, gating=gating)
    config = family.wgmma_config(key)
    K, V, G = _inputs(2, 3 * chunk, 3, d, dtype, gating, seed=d * 37 + deg * 5 + d_tile + chunk)
    _run_and_check(K, V, G, deg, d_tile, chunk, config=config)


WGMMA_TILES = [
    dict(tile_m=64, tile_k=16, warps=4, stages=4),
    dict(tile_m=64, tile_k=32, warps=4, stages=5),
    dict(tile_m=128, tile_k=64, warps=4, stages=4),
    dict(tile_m=128, tile_k=64, warps=8, stages=6),
    dict(tile_m=256, tile_k=64, warps=8, stages=5),
    dict(tile_m=256, tile_k=128, warps=8, stages=4, min_ctas=1),
    dict(tile_m=128, tile_k=32, warps=4, stages=6, min_ctas=2),
]


@pytest.mark.parametrize("cfg", WGMMA_TILES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("d,d_tile,dtype", [(64, 8, torch.bfloat16), (64, 1, torch.bfloat16), (64, 16, torch.float16),
                                            (128, 8, torch.bfloat16)])
def test_wgmma_tile_configs(cfg, d, d_tile, dtype):
    if not _hopper():
        pytest.skip("the wgmma kernel needs a Hopper GPU (sm_90)")
    from vidrial.core.errors import ConfigError
    from vidrial.kernels.power_retention.update_state import UpdateStateKey

    config = UpdateStateConfig(impl="wgmma", **cfg)
    key = UpdateStateKey(head_dim=d, d_tile=d_tile, dtype=str(dtype)[6:], chunk_size=256)
    try:
        family.check(key, config, "sm_90")
    except ConfigError as exc:
        pytest.skip(f"invalid for this key: {exc}")
    K, V, G = _inputs(2, 512, 3, d, dtype, True, seed=11)
    _run_and_check(K, V, G, 2, d_tile, 256, config=config)


def test_wgmma_strided_inputs_and_graph():
    """Views into a packed [b, t, h, 2d] tensor, and a CUDA-graph replay on new data."""
    if not _hopper():
        pytest.skip("the wgmma kernel needs a Hopper GPU (sm_90)")
    config = UpdateStateConfig(impl="wgmma", tile_m=128, tile_k=64, warps=4, stages=4)
    b, t, h, d = 2, 256, 4, 64
    kv = torch.randn(b, t, h, 2 * d, device="cuda").to(torch.bfloat16)
    K, V = kv[..., :d], kv[..., d:]
    G = torch.nn.functional.logsigmoid(torch.randn(b, t, 2 * h, device="cuda") + 3)[..., ::2]
    _run_and_check(K, V, G, 2, 8, 128, config=config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        Sg, sg = update_state(K, V, G, chunk_size=128, config=config)
    Sg.fill_(float("nan"))
    kv.copy_(torch.randn_like(kv.float()).to(kv.dtype))
    graph.replay()
    torch.cuda.synchronize()
    S_ref, s_ref = reference(K, V, G, 2, 8, 128)
    assert _rel(Sg, S_ref) < 1e-2 and _rel(sg, s_ref) < 1e-2
