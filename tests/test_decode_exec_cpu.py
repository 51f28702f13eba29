"""The decode_step kernel's real CUDA source, executed on the CPU (tests/decode_cpu_exec.py), against
the float64 reference: proves the index math, the split-D partials, the cache tiles, the gate
prefix sums, the last-CTA merge, the workspace layout, the counter reset and the launch arguments
(DecodeFamily.plan: the GPU launcher's prepare, key, grid and arguments) without a GPU."""
from __future__ import annotations

import pytest
import torch

from vidrial.core.launch import set_host_launcher
from vidrial.core.tensors import pow2_bucket
from vidrial.kernels.power_retention.decode import DecodeConfig, family, workspace
from vidrial.reference.forward import power_retention_inference_reference, update_state_reference
from vidrial.kernels.power_retention.sympow import default_d_tile

decode_cpu_exec = pytest.importorskip("decode_cpu_exec", reason="tests/ not on sys.path")
if not decode_cpu_exec.available():  # pragma: no cover
    pytest.skip("no g++ with C++20 <barrier>", allow_module_level=True)

_KERNELS: dict = {}


def _kernel(key, config):
    memo = (key, config)
    if memo not in _KERNELS:
        _KERNELS[memo] = decode_cpu_exec.CpuKernel(family.render(key, config), family.signature)
    return _KERNELS[memo]


def _plan(Q, K, V, G, S, z, deg, d_tile, config, scale=None):
    """The GPU launcher's plan (prepare, key, outputs, grid and arguments), run here on the CPU: CPU tensors
    pass the core's device rule while a host launcher is installed."""
    previous = set_host_launcher(lambda fam, key, cfg: None)  # the plan only; _run executes it
    try:
        return family.plan(config, Q=Q, K=K, V=V, log_G=G, state=S, sum_of_keys=z, deg=deg, d_tile=d_tile,
                           scale=scale)
    finally:
        set_host_launcher(previous)


def _run(Q, K, V, G, S, z, deg, d_tile, config, scale=None):
    plan = _plan(Q, K, V, G, S, z, deg, d_tile, config, scale)
    key, Y = plan.key, plan.outputs["Y"]
    nc_cap = pow2_bucket(-(-(0 if K is None else K.shape[1]) // config.cache_tile))
    ws, counters = workspace(key, config, Q.shape[0] * (S.shape[1] if S is not None else K.shape[2]), nc_cap,
                             Q.device)  # the buffers the plan's launch writes
    ws.fill_(float("nan"))  # partials must be written before they are read
    Y.fill_(float("nan"))
    for launch in plan.launches:
        _kernel(key, config).run(launch.grid, (family.threads_per_block(config), 1, 1), launch.args)
    assert int(counters.abs().sum()) == 0, "the last CTA must reset the counters"
    return Y


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [
    # b, tq, h, r, d, deg, d_tile, L, gating, state, state dtype, q dtype, config
    (2, 1, 2, 1, 64, 2, 8, 100, True, True, torch.float32, torch.bfloat16,
     DecodeConfig(tile_f=256, warps=8, cache_tile=64, unroll=8, load_bytes=16)),
    (1, 2, 2, 2, 64, 2, 8, 70, True, True, torch.bfloat16, torch.bfloat16,
     DecodeConfig(tile_f=512, warps=4, cache_tile=32, unroll=4, load_bytes=8)),
    (2, 1, 1, 4, 32, 2, 4, 0, False, True, torch.float32, torch.float16,
     DecodeConfig(tile_f=128, warps=2, cache_tile=32, unroll=2, load_bytes=8)),
    (1, 1, 2, 1, 128, 2, 8, 150, False, False, torch.float32, torch.bfloat16,
     DecodeConfig(tile_f=1024, warps=8, cache_tile=128, unroll=8, load_bytes=16)),
    (1, 3, 1, 2, 32, 4, 4, 45, True, True, torch.float32, torch.bfloat16,
     DecodeConfig(tile_f=1024, warps=2, cache_tile=32, unroll=16, load_bytes=16)),
    (1, 1, 2, 1, 128, 2, 8, 7, True, True, torch.bfloat16, torch.float16,
     DecodeConfig(tile_f=1024, warps=8, cache_tile=64, unroll=8, load_bytes=16)),
    # cross-warp reduction through one shared buffer (8 warps x 8 rows x 129 floats > 16 KB)
    (1, 2, 1, 4, 128, 2, 8, 20, True, True, torch.float32, torch.bfloat16,
     DecodeConfig(tile_f=1024, warps=8, cache_tile=32, unroll=8, load_bytes=16)),
    # a state row wider than a warp (fp32, 8-byte loads, d=128: 64 loads per row)
    (1, 1, 2, 1, 128, 2, 8, 5, False, True, torch.float32, torch.bfloat16,
     DecodeConfig(tile_f=256, warps=4, cache_tile=32, unroll=4, load_bytes=8)),
    # the benchmark's defaults (b*h = 8 and 64 buckets): one new token, and a 256-token cache
    (1, 1, 2, 1, 64, 2, 8, 1, True, True, torch.float32, torch.bfloat16,
     DecodeConfig(tile_f=64, warps=8, cache_tile=64, unroll=8, load_bytes=16)),
    (1, 1, 2, 1, 64, 2, 8, 256, True, True, torch.bfloat16, torch.bfloat16,
     DecodeConfig(tile_f=128, warps=8, cache_tile=64, unroll=8, load_bytes=16)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_source_on_cpu_matches_reference(case):
    b, tq, h, r, d, deg, dt, L, gating, with_state, sdt, qdt, cfg = CASES[case]
    g = torch.Generator().manual_seed(case)
    Q = torch.randn(b, tq, h * r, d, generator=g).to(qdt)
    K = torch.randn(b, L, h, d, generator=g).to(qdt) if L else None
    V = torch.randn(b, L, h, d, generator=g).to(qdt) if L else None
    G = torch.nn.functional.logsigmoid(3 + torch.randn(b, L, h, generator=g)) if gating and L else None
    if with_state:
        K0, V0 = torch.randn(b, 32, h, d, generator=g), torch.randn(b, 32, h, d, generator=g)
        S, z = update_state_reference(K0, V0, None, deg, dt, 32)
        S, z = S[:, 0].to(sdt).contiguous(), z[:, 0].float().contiguous()
    else:
        S = z = None
    family.check(_plan(Q, K, V, G, S, z, deg, dt, cfg).key, cfg, "sm_90")
    Y = _run(Q, K, V, G, S, z, deg, dt, cfg)
    Yr, _, _ = power_retention_inference_reference(Q, K, V, G, S.double() if S is not None else None,
                                                   z.double() if z is not None else None, deg=deg,
                                                   switch_over_seq_len=None, d_tile=dt)
    assert Y.shape == Q.shape and Y.dtype == Q.dtype
    assert _rel(Y, Yr) < 1e-2
    if deg == 2:  # a second launch reuses the workspace and the counters: bitwise the same
        Y2 = _run(Q, K, V, G, S, z, deg, dt, cfg)
        assert torch.equal(Y, Y2)


def test_strided_cache_and_scale():
    """A cache that is a slice of a longer preallocated buffer, a head-major Q view, an explicit scale."""
    b, h, r, d, deg = 2, 2, 2, 64, 2
    dt = default_d_tile(d, deg)
    g = torch.Generator().manual_seed(11)
    Kbuf = torch.randn(b, 200, h, d, generator=g).bfloat16()
    Vbuf = torch.randn(b, 200, h, d, generator=g).bfloat16()
    Gbuf = torch.nn.functional.logsigmoid(3 + torch.randn(b, 200, h, generator=g))
    K, V, G = Kbuf[:, 30:95], Vbuf[:, 30:95], Gbuf[:, 30:95]
    Q = torch.randn(b, h * r, 1, d, generator=g).bfloat16().transpose(1, 2)  # non-contiguous [b, 1, hq, d]
    cfg = DecodeConfig(tile_f=256, warps=8, cache_tile=64, unroll=8, load_bytes=16)
    Y = _run(Q, K, V, G, None, None, deg, dt, cfg, scale=0.3)
    Yr, _, _ = power_retention_inference_reference(Q, K, V, G, deg=deg, scale=0.3, switch_over_seq_len=None)
    assert _rel(Y, Yr) < 1e-2


def test_token_by_token_loop_with_the_kernel_source():
    """vidrial.pipeline.decoding.step (the API's step logic) with the CPU-executed kernel as the decoder and
    the float64 update for absorption: every token equals the training forward (float64 reference)."""
    from vidrial.pipeline.decoding import step as _step, update_reference as _update_reference
    from vidrial.reference.forward import power_retention_reference

    b, t, h, r, d, deg, switch = 1, 40, 2, 2, 32, 2, 16
    dt = default_d_tile(d, deg)
    g = torch.Generator().manual_seed(5)
    Q = torch.randn(b, t, h * r, d, generator=g).bfloat16()
    K = torch.randn(b, t, h, d, generator=g).bfloat16()
    V = torch.randn(b, t, h, d, generator=g).bfloat16()
    G = torch.nn.functional.logsigmoid(2 + torch.randn(b, t, h, generator=g))
    Y_ref = power_retention_reference(Q, K, V, G, deg=deg)
    cfg = DecodeConfig(tile_f=128, warps=4, cache_tile=32, unroll=4, load_bytes=16)

    def decode(Qs, Ks, Vs, Gs, S, z):
        return _run(Qs, Ks, Vs, Gs, S, z, deg, dt, cfg)

    S = z = None
    c0 = 0
    for i in range(t):
        sl = slice(c0, i + 1)
        Y, S2, z2 = _step(Q[:, i:i + 1], K[:, sl], V[:, sl], G[:, sl], S, z, deg=deg, scale=None,
                          switch_over_seq_len=switch, d_tile=dt, new_dtype=torch.float32, decode=decode,
                          update=lambda *a: _update_reference(*a, dtype=torch.float32))
        assert _rel(Y[:, 0], Y_ref[:, i]) < 1e-2, i
        if S2 is not S:
            S, z, c0 = S2.contiguous(), z2.contiguous(), i + 1
    assert c0 == t // switch * switch


@pytest.mark.parametrize("tq,L", [(1, 40), (2, 0)])
def test_gqa_group_32_in_row_groups_with_the_kernel_source(tq, L):
    """Issue 17 item 9b: GQA group 32 (> MAX_ROWS = 16 rows per KV head) through
    vidrial.pipeline.decoding.decode_rows (what power_retention_inference runs) with the CPU-executed
    kernel: launches of <= 16 rows (query-head groups of 16, then token groups), equal to the reference."""
    from vidrial.kernels.power_retention.decode import MAX_ROWS
    from vidrial.pipeline.decoding import decode_rows

    b, h, r, d, deg = 1, 2, 32, 32, 2
    dt = default_d_tile(d, deg)
    g = torch.Generator().manual_seed(32 + tq)
    Q = torch.randn(b, tq, h * r, d, generator=g).bfloat16()
    K = torch.randn(b, L, h, d, generator=g).bfloat16() if L else None
    V = torch.randn(b, L, h, d, generator=g).bfloat16() if L else None
    G = torch.nn.functional.logsigmoid(3 + torch.randn(b, L, h, generator=g)) if L else None
    K0, V0 = torch.randn(b, 32, h, d, generator=g), torch.randn(b, 32, h, d, generator=g)
    S, z = update_state_reference(K0, V0, None, deg, dt, 32)
    S, z = S[:, 0].float().contiguous(), z[:, 0].float().contiguous()
    cfg = DecodeConfig(tile_f=256, warps=4, cache_tile=32, unroll=4, load_bytes=16)
    rows = []

    def kernel(Qs, Ks, Vs, Gs, S_, z_):
        rows.append(Qs.shape[2] // h * Qs.shape[1])
        return _run(Qs, Ks, Vs, Gs, S_, z_, deg, dt, cfg)

    Y = decode_rows(kernel, Q, K, V, G, S, z, h, MAX_ROWS)
    Yr, _, _ = power_retention_inference_reference(Q, K, V, G, S.double(), z.double(), deg=deg,
                                                   switch_over_seq_len=None, d_tile=dt)
    assert rows == [16] * (2 * tq) and max(rows) <= MAX_ROWS
    assert Y.shape == Q.shape and Y.dtype == Q.dtype
    assert _rel(Y, Yr) < 1e-2
