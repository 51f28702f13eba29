"""GPU tests of vidrial.nn.PowerRetention: decode (prefill + steps through the cache, compressions
included) equals the full forward, in bf16 and fp16; gradients reach every parameter; the tiny LM of
examples/tiny_lm.py learns its synthetic task (the loss falls) and generates through the caches;
torch.compile(fullgraph=True) of the layer.

Run: python3 -m pytest -m gpu -q tests/gpu/test_nn_gpu.py"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
DEV = "cuda"
ROOT = Path(__file__).resolve().parents[2]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm()).item()


def _layer(dtype, **kw):
    import vidrial.nn as vnn

    args = dict(d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, chunk_size=128, switch_over_seq_len=128)
    args.update(kw)
    torch.manual_seed(0)
    layer = vnn.PowerRetention(**args, device=DEV, dtype=dtype)
    with torch.no_grad():
        if layer.gate is not None:
            layer.gate.bias.uniform_(2.0, 6.0)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("prompt,t,switch,gating", [(100, 400, 128, True), (1, 300, 64, True), (200, 300, None, False),
                                                     (300, 700, 256, True)])
def test_decode_equals_full_forward(dtype, prompt, t, switch, gating):
    layer = _layer(dtype, switch_over_seq_len=switch, gating=gating)
    x = torch.randn(2, t, 256, device=DEV, dtype=dtype, generator=torch.Generator(DEV).manual_seed(1))
    with torch.no_grad():
        y_full = layer(x)
        cache = layer.new_cache(2)
        ys = [layer.step(x[:, :prompt], cache)[0]]
        for i in range(prompt, t):
            ys.append(layer.step(x[:, i:i + 1], cache)[0])
    y = torch.cat(ys, 1)
    assert cache.seen == t and (cache.state is None) == (switch is None or t < switch)
    assert _rel(y, y_full) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradients_reach_every_parameter(dtype):
    layer = _layer(dtype)
    x = torch.randn(2, 300, 256, device=DEV, dtype=dtype, requires_grad=True)
    layer(x).float().square().mean().backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_torch_compile_fullgraph_matches_eager():
    layer = _layer(torch.bfloat16)
    x = torch.randn(2, 256, 256, device=DEV, dtype=torch.bfloat16)
    y = layer(x)
    torch._dynamo.reset()
    yc = torch.compile(layer, fullgraph=True)(x)
    assert _rel(yc, y) < 1e-2


def test_tiny_lm_loss_falls_and_generates():
    spec = importlib.util.spec_from_file_location("tiny_lm", ROOT / "examples" / "tiny_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "300", "--device", DEV, "--quiet"])
    losses = out["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-20:]) / 20
    assert all(v == v for v in losses), "NaN loss"
    assert last < 0.5 * first, (first, last)
    # greedy continuation of a fresh pattern after a 4-period prompt: chance is 1/64; measured 0.44 on an
    # H200 (2026-12-02; errors compound once a generated token is wrong). decode == forward is checked
    # exactly above; this checks that generation through the caches has learned the task at all.
    assert out["accuracy"] is not None and out["accuracy"] > 0.25, out["accuracy"]
