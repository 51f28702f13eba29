"""Packed variable-length batches on the GPU (power_retention(..., cu_seqlens=...)): the packed op against each
sequence run alone through the same op (values and gradients of Q, K, V, log_G; bf16), and against the
float64 per-sequence reference. 8 sequences of mixed lengths, boundaries inside chunks and on their edges.

    python3 -m pytest -m gpu -q tests/gpu/test_varlen_gpu.py
"""
from __future__ import annotations

import pytest
import torch

import vidrial
from vidrial.reference import power_retention_varlen_reference

pytestmark = pytest.mark.gpu
DEV = "cuda"
LENGTHS = (1000, 24, 3000, 1024, 1, 517, 2048, 1578)  # 9192 tokens


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("chunk,gating,hq", [(1024, True, 8), (64, True, 4), (1024, False, 8)])
def test_packed_equals_each_sequence_alone(chunk, gating, hq):
    h, d = 4, 64
    t = sum(LENGTHS)
    g = torch.Generator(device=DEV).manual_seed(3)
    Q = torch.randn(1, t, hq, d, device=DEV, generator=g).bfloat16()
    K = (torch.randn(1, t, h, d, device=DEV, generator=g) * 0.5).bfloat16()
    V = torch.randn(1, t, h, d, device=DEV, generator=g).bfloat16()
    lg = torch.nn.functional.logsigmoid(torch.randn(1, t, h, device=DEV, generator=g) + 3.0) if gating else None
    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32, device=DEV)
    leaves = [x.clone().requires_grad_(True) for x in (Q, K, V)] + [lg.clone().requires_grad_(True) if gating else None]
    Y = vidrial.power_retention(*leaves, chunk_size=chunk, cu_seqlens=cu)
    dY = torch.randn_like(Y)
    (Y.float() * dY.float()).sum().backward()
    offs = cu.tolist()
    for a, e in zip(offs[:-1], offs[1:]):
        alone = [x[:, a:e].detach().clone().requires_grad_(True) if x is not None else None for x in (Q, K, V, lg)]
        Ya = vidrial.power_retention(*alone, chunk_size=chunk)
        (Ya.float() * dY[:, a:e].float()).sum().backward()
        assert _rel(Y[:, a:e], Ya) < 1e-2, (a, e)
        for name, packed, one in zip(("Q", "K", "V", "log_G"), leaves, alone):
            if one is not None:
                assert _rel(packed.grad[:, a:e], one.grad) < 2e-2, (name, a, e)
    want = power_retention_varlen_reference(Q.double(), K.double(), V.double(), None if lg is None else lg.double(),
                                            cu, chunk_size=chunk)
    assert _rel(Y, want) < 1e-2
