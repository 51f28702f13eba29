"""The forward families on a real GPU: discumsum, query_state and vidrial.power_retention against
the float64 references (vidrial/reference/forward.py), and against the `retention`
package (Triton) where it supports the inputs. Outputs are poisoned (NaN) before every run."""
from __future__ import annotations

import math
import os

import pytest
import torch

from vidrial.reference import forward as ref
from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim

pytestmark = pytest.mark.gpu

DEV = "cuda"


def poison():
    """Fill the caching allocator's free blocks with NaN so that unwritten outputs show up."""
    free, _ = torch.cuda.mem_get_info()
    n = min(int(free * 0.25), 2 << 30) // 4
    x = torch.full((n,), float("nan"), device=DEV)
    del x


def rel_err(out, exp) -> float:
    out, exp = out.double(), exp.double()
    assert out.shape == exp.shape, (out.shape, exp.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - exp).norm() / exp.norm().clamp_min(1e-30)).item()


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


# ---- discumsum --------------------------------------------------------------------------------
@pytest.mark.parametrize("b,n,h,d,D,gating,init", [
    (2, 5, 3, 64, 2304, True, False),
    (2, 5, 3, 64, 2304, True, True),
    (1, 7, 2, 32, 640, False, True),
    (1, 3, 1, 128, 8704, True, False),
    (3, 1, 2, 32, 528, True, True),   # d_tile=1 layout, one chunk
])
def test_discumsum_matches_reference(b, n, h, d, D, gating, init):
    from vidrial.kernels.power_retention.discumsum import discumsum, discumsum_forward

    g = gen(0)
    S = torch.randn(b, n, h, D, d, device=DEV, generator=g)
    s = torch.randn(b, n, h, D, device=DEV, generator=g)
    # a gate that varies across chunks (a constant one hides index bugs)
    L = (-torch.rand(b, n, h, device=DEV, generator=g) * 2.0) if gating else None
    S0 = torch.randn(b, h, D, d, device=DEV, generator=g) if init else None
    s0 = torch.randn(b, h, D, device=DEV, generator=g) if init else None
    poison()
    Sbar, sbar, Sbar16 = discumsum(S, s, L, S0, s0, bf16_copy=True)
    eS, es = ref.discumsum_reference(S, s, L, S0, s0)
    assert rel_err(Sbar, eS) < 1e-5
    assert rel_err(sbar, es) < 1e-5
    assert (Sbar[:, 0] == (S0 if init else 0)).all()
    assert torch.equal(Sbar16, Sbar[:, :n].to(torch.bfloat16))
    poison()
    out = discumsum_forward(S, s, L, S0, s0, fp32_states=False, bf16_copy=False, final_state=True)
    assert torch.equal(out["S_final"], Sbar[:, n])
    assert torch.equal(out["sbar"], sbar)


# ---- query_state ------------------------------------------------------------------------------
QS_CASES = [
    # d, p, d_tile, dtype, b, t, hq, h, chunk, gating, merge
    (64, 2, 8, torch.bfloat16, 2, 256, 2, 1, 64, True, True),
    (64, 2, 8, torch.bfloat16, 1, 300, 4, 1, 128, True, True),    # partial last chunk, GQA 4
    (64, 2, 16, torch.float16, 1, 256, 2, 2, 128, False, True),
    (64, 2, 1, torch.bfloat16, 1, 128, 1, 1, 64, True, True),      # exact sympow (generic feature path)
    (128, 2, 32, torch.bfloat16, 1, 128, 2, 1, 64, True, True),    # paired path, d_tile % 16 == 0, e0 % T != 0
    (64, 2, 8, torch.bfloat16, 1, 200, 2, 1, 64, True, True),
    (32, 2, 8, torch.bfloat16, 2, 192, 2, 2, 64, True, False),     # state only: Y = Yq / zq
    (128, 2, 8, torch.bfloat16, 1, 256, 2, 1, 256, True, True),
    (32, 4, 4, torch.bfloat16, 1, 64, 1, 1, 64, True, True),
    (32, 4, 2, torch.float16, 1, 64, 2, 1, 32, False, True),       # p=4 generic path (block 16)
]


@pytest.mark.parametrize("feature_path", ["auto", "generic"])
@pytest.mark.parametrize("case", QS_CASES, ids=[f"qs{i}" for i in range(len(QS_CASES))])
def test_query_state_matches_reference(case, feature_path):
    from vidrial.kernels.power_retention.query_state import (
        FAMILY,
        QueryStateKey,
        make_test_inputs,
        query_state,
    )
    from vidrial.reference.forward import query_state_reference

    d, p, dt, dtype, b, t, hq, h, c, gating, merge = case
    key = QueryStateKey(head_dim=d, deg=p, d_tile=dt, dtype=str(dtype).split(".")[1])
    inp = make_test_inputs(key, b=b, t=t, hq=hq, h=h, chunk_size=c, gating=gating, device=DEV, seed=1,
                           state_scale=50.0)
    if not merge:
        inp.update(O=None, l=None, m=None)
    # a state that is the sum of many phi(k) v^T, so zq > 0 like a real one
    n = -(-t // c)
    Kf = torch.randn(b, n, 16, h, d, device=DEV, dtype=torch.float64)
    pk = ref.phi(Kf, p, dt)  # [b, n, 16, h, D]
    inp["Sbar"] = torch.einsum("bnchD,bnche->bnhDe", pk, torch.randn_like(Kf)).float()
    inp["sbar"] = pk.sum(2).float()
    poison()
    cfg = FAMILY.default_config(key).model_copy(update={"feature_path": feature_path})
    Y = query_state(inp["Q"], inp["Sbar"], inp["sbar"], inp["O"], inp["l"], inp["m"], inp["log_G"], deg=p,
                    d_tile=dt, scale=inp["scale"], chunk_size=c, config=cfg)
    E = query_state_reference(inp["Q"], inp["Sbar"], inp["sbar"], inp["O"], inp["l"], inp["m"], inp["log_G"],
                              deg=p, d_tile=dt, scale=inp["scale"], chunk_size=c)
    assert Y.dtype == dtype
    assert rel_err(Y, E) < 1e-2


QS_WGMMA_CASES = [
    # d, dtype, o_dtype, b, t, hq, h, chunk, gating, merge, skip_first, config (tile_m, warps, stages)
    (64, torch.bfloat16, "float32", 2, 256, 2, 1, 64, True, True, False, (128, 4, 4)),
    (64, torch.bfloat16, "float32", 1, 300, 4, 1, 128, True, True, False, (128, 4, 3)),  # partial chunk, GQA 4
    (64, torch.float16, "float32", 1, 256, 2, 2, 128, False, True, False, (256, 8, 4)),
    (64, torch.bfloat16, "bfloat16", 1, 1100, 2, 1, 1024, True, True, True, (128, 4, 5)),  # chunk 0 skipped
    (64, torch.bfloat16, "float32", 2, 192, 2, 2, 64, True, False, False, (64, 4, 4)),   # state only
    (128, torch.bfloat16, "float32", 1, 256, 2, 1, 256, True, True, False, (64, 4, 4)),
    (128, torch.float16, "float16", 1, 520, 4, 2, 256, False, True, False, (128, 8, 3)),
]


@pytest.mark.parametrize("case", QS_WGMMA_CASES, ids=[f"qsw{i}" for i in range(len(QS_WGMMA_CASES))])
def test_query_state_wgmma_matches_reference(case):
    """The Hopper implementation (impl='wgmma') against float64: layouts it takes (p=2, d_tile=8),
    GQA, partial chunks, merge / state only, a skipped first chunk, bf16/fp16, O in each dtype."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs a Hopper GPU (sm_90)")
    from vidrial.kernels.power_retention.query_state import QueryStateConfig, QueryStateKey, make_test_inputs, query_state
    from vidrial.reference.forward import query_state_reference

    d, dtype, o_dtype, b, t, hq, h, c, gating, merge, skip_first, (tile_m, warps, stages) = case
    key = QueryStateKey(head_dim=d, deg=2, d_tile=8, dtype=str(dtype).split(".")[1], o_dtype=o_dtype)
    inp = make_test_inputs(key, b=b, t=t, hq=hq, h=h, chunk_size=c, gating=gating, device=DEV, seed=3,
                           state_scale=50.0)
    if not merge:
        inp.update(O=None, l=None, m=None)
    n = -(-t // c)
    Kf = torch.randn(b, n, 16, h, d, device=DEV, dtype=torch.float64)
    pk = ref.phi(Kf, 2, 8)
    inp["Sbar"] = torch.einsum("bnchD,bnche->bnhDe", pk, torch.randn_like(Kf)).float()
    inp["sbar"] = pk.sum(2).float()
    if skip_first:
        inp["Sbar"][:, 0] = 0
        inp["sbar"][:, 0] = 0
    poison()
    cfg = QueryStateConfig(impl="wgmma", tile_m=tile_m, tile_k=64, warps=warps, stages=stages)
    Y = query_state(inp["Q"], inp["Sbar"], inp["sbar"], inp["O"], inp["l"], inp["m"], inp["log_G"], deg=2,
                    d_tile=8, scale=inp["scale"], chunk_size=c, config=cfg, zero_first_state=skip_first)
    E = query_state_reference(inp["Q"], inp["Sbar"], inp["sbar"], inp["O"], inp["l"], inp["m"], inp["log_G"],
                              deg=2, d_tile=8, scale=inp["scale"], chunk_size=c)
    assert Y.dtype == dtype and torch.isfinite(Y).all()
    assert rel_err(Y, E) < 1e-2, rel_err(Y, E)


# ---- the full op ------------------------------------------------------------------------------
def make_qkv(b, t, hq, h, d, dtype, gating, seed, gate_bias=4.0):
    g = gen(seed)
    Q = torch.randn(b, t, hq, d, device=DEV, generator=g).to(dtype)
    K = torch.randn(b, t, h, d, device=DEV, generator=g).to(dtype)
    V = torch.randn(b, t, h, d, device=DEV, generator=g).to(dtype)
    log_G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=DEV, generator=g) + gate_bias) if gating else None
    return Q, K, V, log_G


OP_CASES = [
    # t, d, p, r, gating, chunk, init, final, dtype
    (1, 64, 2, 1, True, 64, False, False, torch.bfloat16),       # quadratic (t_pad <= chunk)
    (15, 64, 2, 4, True, 64, False, True, torch.bfloat16),       # quadratic, final state at t_pad == switch
    (128, 64, 2, 1, True, 64, False, True, torch.bfloat16),
    (128, 32, 2, 4, False, 64, True, True, torch.float16),
    (1000, 64, 2, 4, True, 128, True, True, torch.bfloat16),     # padded, GQA, initial state
    (1000, 32, 2, 1, False, 256, False, True, torch.bfloat16),
    (4096, 64, 2, 1, True, 1024, False, True, torch.bfloat16),
    (4096, 128, 2, 2, True, 512, True, True, torch.bfloat16),
    (4096, 32, 2, 4, False, 64, False, False, torch.float16),
    (128, 32, 4, 1, True, 64, False, True, torch.bfloat16),      # p = 4, small D
    (200, 32, 4, 2, False, 64, True, True, torch.bfloat16),
    (1000, 64, 2, 1, True, None, False, True, torch.bfloat16),   # chunk_size None: quadratic
    (300, 64, 2, 2, True, None, True, True, torch.bfloat16),     # chunk_size None + state: one chunk
]


@pytest.mark.parametrize("case", OP_CASES, ids=[f"t{c[0]}-d{c[1]}-p{c[2]}-r{c[3]}-g{int(c[4])}-c{c[5]}-i{int(c[6])}"
                                                f"-f{int(c[7])}-{str(c[8])[6:]}" for c in OP_CASES])
def test_power_retention_matches_reference(case):
    import vidrial

    t, d, p, r, gating, c, init, final, dtype = case
    b, h = 1 if t >= 4096 else 2, 2 if r == 1 else 1
    hq = h * r
    Q, K, V, log_G = make_qkv(b, t, hq, h, d, dtype, gating, seed=t + d + p)
    dt = default_d_tile(d, p)
    D = feature_dim(d, p, dt)
    S0 = s0 = None
    if init:
        # a plausible state: the state of a random 64-token prefix
        Kp = torch.randn(b, 64, h, d, device=DEV, dtype=torch.float64)
        S0, s0 = ref.update_state_reference(Kp, torch.randn_like(Kp), None, p, dt, 64)
        S0, s0 = S0[:, 0].float(), s0[:, 0].float()
    poison()
    out = vidrial.power_retention(Q, K, V, log_G, initial_state=S0, sum_of_keys=s0, return_final_state=final, deg=p,
                                  chunk_size=c)
    Y = out[0] if final else out
    assert Y.shape == Q.shape and Y.dtype == dtype
    exp = ref.power_retention_reference(Q, K, V, log_G, S0, s0, return_final_state=True, deg=p, chunk_size=c,
                                        d_tile=dt)
    assert rel_err(Y, exp[0]) < 1e-2
    if final:
        # switch_over_seq_len defaults to chunk_size and t is padded to a multiple of it, so the
        # state is always computed here (retention returns None only for padded t < switch)
        assert out[1].shape == (b, h, D, d) and out[2].shape == (b, h, D)
        assert rel_err(out[1], exp[1]) < 1e-2
        assert rel_err(out[2], exp[2]) < 1e-2


def test_power_retention_quadratic_matches_attention_reference():
    import vidrial

    Q, K, V, log_G = make_qkv(2, 777, 4, 2, 64, torch.bfloat16, True, seed=5)
    poison()
    Y = vidrial.power_retention(Q, K, V, log_G, deg=2)
    assert rel_err(Y, ref.attention_reference(Q, K, V, log_G, deg=2)) < 1e-2


def test_same_output_across_d_tile():
    import vidrial

    Q, K, V, log_G = make_qkv(1, 1000, 2, 2, 64, torch.bfloat16, True, seed=9)
    exp = ref.attention_reference(Q, K, V, log_G, deg=2)
    outs = []
    for dt in (4, 8, 16):
        poison()
        outs.append(vidrial.power_retention(Q, K, V, log_G, deg=2, chunk_size=128, d_tile=dt))
        assert rel_err(outs[-1], exp) < 1e-2
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-2


def test_long_ungated_sequence_stays_finite():
    """t = 65536 without gating: the state grows with t; nothing may overflow."""
    import vidrial

    Q, K, V, _ = make_qkv(1, 65536, 1, 1, 64, torch.bfloat16, False, seed=11)
    poison()
    Y, S, s = vidrial.power_retention(Q, K, V, None, return_final_state=True, deg=2, chunk_size=1024)
    assert torch.isfinite(Y).all() and torch.isfinite(S).all() and torch.isfinite(s).all()
    exp = ref.power_retention_reference(Q, K, V, None, return_final_state=True, deg=2, chunk_size=1024)
    assert rel_err(Y, exp[0]) < 1e-2
    assert rel_err(S, exp[1]) < 1e-2
    # fp16 inputs too: the state operand is bf16, so the long ungated state cannot overflow
    Y16 = vidrial.power_retention(Q.half(), K.half(), V.half(), None, deg=2, chunk_size=1024)
    assert torch.isfinite(Y16).all()
    assert rel_err(Y16, exp[0]) < 1e-2


def test_state_round_trip_equals_one_pass():
    """Running two halves with the final state carried equals one pass (initial state in, final out)."""
    import vidrial

    Q, K, V, log_G = make_qkv(1, 2048, 2, 2, 64, torch.bfloat16, True, seed=13)
    Y_all, S_all, s_all = vidrial.power_retention(Q, K, V, log_G, return_final_state=True, chunk_size=256)
    Y1, S1, s1 = vidrial.power_retention(Q[:, :1000], K[:, :1000], V[:, :1000], log_G[:, :1000],
                                         return_final_state=True, chunk_size=256)
    Y2, S2, s2 = vidrial.power_retention(Q[:, 1000:], K[:, 1000:], V[:, 1000:], log_G[:, 1000:], initial_state=S1,
                                         sum_of_keys=s1, return_final_state=True, chunk_size=256)
    assert rel_err(torch.cat([Y1, Y2], 1), Y_all) < 1e-2
    assert rel_err(S2, S_all) < 1e-2 and rel_err(s2, s_all) < 1e-2


def _limit_triton_autotune(max_configs: int = 1):
    """retention autotunes over dozens of configs (minutes); correctness needs one."""
    import sys

    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # pragma: no cover
        return
    for name, mod in list(sys.modules.items()):
        if not name.startswith("retention"):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > max_configs:
                obj.configs = obj.configs[len(obj.configs) // 2: len(obj.configs) // 2 + max_configs]


@pytest.mark.parametrize("t,r,gating,chunk", [(2048, 1, True, 128), (1000, 1, False, 256)])
def test_agrees_with_retention_triton(t, r, gating, chunk):
    os.environ.setdefault("TRITON_NO_AUTOTUNE", "1")
    rt = pytest.importorskip("retention.triton")
    _limit_triton_autotune()
    import vidrial

    Q, K, V, log_G = make_qkv(1, t, 2 * r, 2, 64, torch.bfloat16, gating, seed=17)
    Y = vidrial.power_retention(Q, K, V, log_G, deg=2, chunk_size=chunk)
    Yr = rt.power_retention(Q, K, V, log_G, deg=2, chunk_size=chunk)
    exp = ref.attention_reference(Q, K, V, log_G, deg=2)
    assert rel_err(Y, exp) < 1e-2
    assert rel_err(Y, Yr.to(Y.dtype)) < 2e-2
