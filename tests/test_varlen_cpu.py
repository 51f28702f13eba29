"""Packed variable-length batches (power_retention(..., cu_seqlens=...), vidrial.pipeline.varlen) on the CPU:
the gate at each boundary turns the packed computation into the per-sequence one (float64 reference: values
and gradients, boundaries inside chunks and on their edges, GQA, p = 2 and 4, gated and not), the offsets'
validation (each error names cu_seqlens and what is allowed), and the wiring through the op and the layer.
The kernels on packed batches: tests/gpu/test_varlen_gpu.py."""
from __future__ import annotations

import pytest
import torch

import vidrial
from vidrial.core.errors import InputError
from vidrial.pipeline.varlen import BOUNDARY_LOG_GATE, packed_log_gates
from vidrial.reference import power_retention_reference, power_retention_varlen_reference

F64 = torch.float64


def _packed(lengths, hq=2, h=1, d=16, gating=True, seed=0):
    t = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(1, t, hq, d, generator=g, dtype=F64)
    K = torch.randn(1, t, h, d, generator=g, dtype=F64)
    V = torch.randn(1, t, h, d, generator=g, dtype=F64)
    lg = torch.nn.functional.logsigmoid(torch.randn(1, t, h, generator=g, dtype=F64) + 2.0) if gating else None
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return Q, K, V, lg, cu


@pytest.mark.parametrize("lengths,chunk,deg,gating", [
    ((40, 24, 64), 32, 2, True),   # boundaries inside chunks and on a chunk edge (64)
    ((7, 50, 1, 30), 16, 2, True),  # a one-token sequence, many chunks per sequence
    ((33, 31), 32, 2, False),       # ungated: the op gates only the boundaries
    ((20, 28), 16, 4, True),        # p = 4
])
def test_boundary_gates_make_the_packed_op_the_per_sequence_op(lengths, chunk, deg, gating):
    Q, K, V, lg, cu = _packed(lengths, gating=gating, seed=len(lengths))
    leaves = [x.clone().requires_grad_(True) for x in (Q, K, V)] + [lg.clone().requires_grad_(True) if gating else None]
    lg_eff = packed_log_gates(leaves[0], leaves[1], leaves[3], cu, None, False)
    # the exact math (no log / denominator guards): with them, a pair of tokens that shares a chunk in one layout
    # and not in the other differs by ~1e-7 (the guard enters the intra-chunk weights only)
    kw = dict(deg=deg, chunk_size=chunk, d_tile=4 if deg == 4 else 8, log_eps=0.0, denom_eps=0.0)
    got = power_retention_reference(*leaves[:3], lg_eff, **kw)
    per = [x.clone().requires_grad_(True) for x in (Q, K, V)] + [lg.clone().requires_grad_(True) if gating else None]
    want = power_retention_varlen_reference(*per, cu, **kw)
    assert ((got - want).norm() / want.norm()).item() < 1e-12
    dY = torch.randn_like(want)
    (got * dY).sum().backward()
    (want * dY).sum().backward()
    for name, a, w in zip(("Q", "K", "V", "log_G"), leaves, per):
        if w is None:
            continue
        assert ((a.grad - w.grad).norm() / w.grad.norm()).item() < 1e-10, name
    if gating:  # the user's gate at a boundary multiplies an empty state: its gradient is exactly 0
        assert torch.all(leaves[3].grad[0, cu[1:-1].long()] == 0)


def test_packed_log_gates_touch_only_the_boundaries():
    Q, K, V, lg, cu = _packed((5, 9, 3))
    out = packed_log_gates(Q, K, lg.float(), cu, None, False)
    starts = [5, 14]
    assert torch.all(out[0, starts] == BOUNDARY_LOG_GATE)
    keep = [i for i in range(17) if i not in starts]
    assert torch.equal(out[0, keep], lg.float()[0, keep])
    zeros = packed_log_gates(Q, K, None, cu, None, False)  # ungated: zeros but at the boundaries
    assert zeros.dtype == torch.float32 and zeros.shape == (1, 17, 1) and zeros[0, keep].abs().sum() == 0


@pytest.mark.parametrize("cu,pattern", [
    (torch.tensor([0, 9, 5, 17]), r"cu_seqlens: got entries 9, 5 at 1, 2; expected strictly increasing"),
    (torch.tensor([0, 5, 5, 17]), r"strictly increasing offsets \(sorted, no empty sequence\)"),
    (torch.tensor([0, 5, 20]), r"cu_seqlens: got last entry 20; expected the packed length t=17"),
    (torch.tensor([1, 5, 17]), r"cu_seqlens: got first entry 1; expected 0"),
    (torch.tensor([0.0, 17.0]), r"cu_seqlens: got dtype torch.float32; expected torch.int32 or torch.int64"),
    (torch.tensor([[0, 17]]), r"cu_seqlens: got shape \(1, 2\); expected a 1-D integer torch.Tensor"),
    ([0, 17], r"cu_seqlens: got list; expected a 1-D integer torch.Tensor"),
    (torch.tensor([17]), r"cu_seqlens: got 1 entries; expected at least 2"),
])
def test_bad_offsets_name_the_argument(cu, pattern):
    Q, K, V, lg, _ = _packed((5, 9, 3))
    with pytest.raises(InputError, match=pattern):
        packed_log_gates(Q, K, lg, cu, None, False)


def test_what_cu_seqlens_does_not_take():
    Q, K, V, lg, cu = _packed((5, 12))
    with pytest.raises(InputError, match=r"Q: got batch 2; expected batch 1 with cu_seqlens"):
        packed_log_gates(Q.expand(2, -1, -1, -1), K, lg, cu, None, False)
    with pytest.raises(InputError, match=r"initial_state: .*expected None with cu_seqlens"):
        packed_log_gates(Q, K, lg, cu, torch.zeros(1), False)
    with pytest.raises(InputError, match=r"return_final_state: got True; expected False with cu_seqlens"):
        packed_log_gates(Q, K, lg, cu, None, True)


def test_the_op_and_the_layer_pass_the_packed_gates(monkeypatch):
    """power_retention hands the kernels' forward the boundary gates (the CPU cannot run the kernels:
    the forward is replaced by a recorder); the layer hands cu_seqlens to the op."""
    from vidrial import ops
    from vidrial.pipeline import forward

    seen = {}

    def fake_forward(Q, K, V, log_G, *rest):
        seen["log_G"] = log_G
        return torch.zeros(Q.shape, dtype=Q.dtype)

    monkeypatch.setattr(forward, "power_retention_forward", fake_forward)
    Q, K, V, lg, cu = _packed((6, 10))
    Q, K, V = (x.bfloat16() for x in (Q, K, V))
    vidrial.power_retention(Q, K, V, None, cu_seqlens=cu)
    assert seen["log_G"][0, 6, 0] == BOUNDARY_LOG_GATE and seen["log_G"][0, :6].abs().sum() == 0

    layer = vidrial.nn.PowerRetention(d_model=64, num_heads=2, head_dim=32)
    calls = {}
    monkeypatch.setattr(ops, "power_retention", lambda *a, **k: calls.update(k) or torch.zeros(1, 16, 2, 32, dtype=torch.bfloat16))
    layer(torch.randn(1, 16, 64, dtype=torch.bfloat16), cu_seqlens=cu)
    assert calls["cu_seqlens"] is cu
    with pytest.raises(InputError, match=r"cu_seqlens: .*expected None when decoding"):
        layer(torch.randn(1, 1, 64, dtype=torch.bfloat16), cache=layer.new_cache(1), cu_seqlens=cu)
