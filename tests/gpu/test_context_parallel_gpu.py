"""Context parallelism on one GPU (world size 1, NCCL): the vidrial backend through vidrial.parallel equals
vidrial.power_retention on the whole sequence, values and gradients (issue 20)."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_world_size_one_equals_the_op(tmp_path):
    import torch.distributed as dist

    import vidrial
    from vidrial.parallel import power_retention_context_parallel

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        b, t, hq, h, d = 2, 2048, 4, 2, 64
        Q = torch.randn(b, t, hq, d, device="cuda", generator=g).to(torch.bfloat16)
        K = torch.randn(b, t, h, d, device="cuda", generator=g).to(torch.bfloat16)
        V = torch.randn(b, t, h, d, device="cuda", generator=g).to(torch.bfloat16)
        G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device="cuda", generator=g) + 3)
        W = torch.randn(b, t, hq, d, device="cuda", generator=g)

        def run(fn):
            leaves = [x.clone().requires_grad_(True) for x in (Q, K, V, G)]
            Y = fn(*leaves)
            (Y.float() * W).sum().backward()
            return Y.detach().float(), [x.grad.float() for x in leaves]

        Y_ref, g_ref = run(lambda q, k, v, lg: vidrial.power_retention(q, k, v, lg, chunk_size=1024))
        Y_cp, g_cp = run(lambda q, k, v, lg: power_retention_context_parallel(q, k, v, lg, chunk_size=1024))

        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()

        assert rel(Y_cp, Y_ref) < 1e-2
        for name, a, b_ in zip("QKVG", g_cp, g_ref):
            assert rel(a, b_) < 2e-2, name
    finally:
        dist.destroy_process_group()
