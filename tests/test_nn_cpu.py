"""vidrial.nn.PowerRetention on the CPU: constructor and input errors, and the real kernels (forward,
backward, decode, state compression) executed on the host (tests/bwd_host_emu.py for the training and
update_state kernels, tests/decode_cpu_exec.py for the decode kernel) against a float64 re-implementation
of the layer with its own weights (vidrial.reference.power_retention_reference); prefill + steps against
the full forward; torch.compile(fullgraph=True) of the layer; the lazy `vidrial.nn`."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from vidrial.core.errors import InputError

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402
import decode_cpu_exec  # noqa: E402

F64 = torch.float64
needs_gxx = pytest.mark.skipif(not (bwd_host_emu.available() and decode_cpu_exec.available()),
                               reason="g++ with C++20 <barrier> not found (host execution of the kernels)")


def _nn():
    import vidrial.nn as vnn

    return vnn


class _DecodeLaunchable:
    def __init__(self, family, key, config):
        self.kernel = decode_cpu_exec.CpuKernel(family.render(key, config), family.signature)

    def launch(self, grid, block, args, device_index, stream):
        self.kernel.run(grid, block, args)


@pytest.fixture
def host_kernels():
    """Every kernel family on the CPU: decode_step through decode_cpu_exec, the others through bwd_host_emu."""
    from vidrial.core.launch import set_host_launcher

    cache: dict = {}

    def make(family, key, config):
        k = (family.name, key, config)
        if k not in cache:
            cls = _DecodeLaunchable if family.name == "decode_step" else bwd_host_emu.HostLaunchable
            cache[k] = cls(family, key, config)
        return cache[k]

    old = set_host_launcher(make)
    try:
        yield
    finally:
        set_host_launcher(old)


def _layer(seed=0, **kw):
    args = dict(d_model=64, num_heads=2, head_dim=32, chunk_size=64)
    args.update(kw)
    torch.manual_seed(seed)
    layer = _nn().PowerRetention(**args)
    with torch.no_grad():  # gates that decay visibly over t ~ 100 (the default init decays slowly)
        if layer.gate is not None:
            layer.gate.bias.uniform_(1.0, 4.0)
            layer.gate.weight.normal_(0, 0.2)
    return layer


def _reference(layer, x, weights=None):
    """The layer in float64: its weights (or `weights`, name -> tensor, e.g. float64 leaves for autograd)
    and vidrial.reference.power_retention_reference."""
    from vidrial.reference import power_retention_reference

    b, t, _ = x.shape
    hq, h, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    w = weights if weights is not None else {n: p.detach().to(F64) for n, p in layer.named_parameters()}

    def lin(name, z):
        y = z @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    x = x.to(F64)
    q, k, v = lin("qkv", x).split([hq * d, h * d, h * d], -1)
    lg = torch.nn.functional.logsigmoid(lin("gate", x)) if layer.gate is not None else None
    Y = power_retention_reference(q.unflatten(-1, (hq, d)), k.unflatten(-1, (h, d)), v.unflatten(-1, (h, d)), lg,
                                  deg=layer.deg, chunk_size=layer.chunk_size, d_tile=layer.d_tile)
    return lin("out", Y.reshape(b, t, hq * d))


def _rel(a, b):
    a, b = a.to(F64), b.to(F64)
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


# ---- errors (no kernels) ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw,argument", [
    (dict(d_model=0), "d_model"), (dict(d_model=64.0), "d_model"), (dict(num_heads=0), "num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"), (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(head_dim=48), "head_dim"), (dict(deg=3), "deg"), (dict(chunk_size=40), "chunk_size"),
    (dict(chunk_size=0), "chunk_size"), (dict(switch_over_seq_len=0), "switch_over_seq_len"),
    (dict(gating=1), "gating"), (dict(bias="no"), "bias"), (dict(dtype=torch.float32), "dtype"),
    (dict(scale=float("nan")), "scale"), (dict(d_tile=5), "d_tile"),
])
def test_constructor_errors_name_the_argument(kw, argument):
    args = dict(d_model=64, num_heads=2, head_dim=32)
    args.update(kw)
    with pytest.raises(InputError, match=rf"^{argument}: got .*; expected ") as info:
        _nn().PowerRetention(**args)
    assert info.value.argument == argument


def test_parameters_shapes_and_dtypes():
    vnn = _nn()
    layer = vnn.PowerRetention(96, 4, num_kv_heads=2, head_dim=32, dtype=torch.float16, bias=True)
    assert layer.qkv.weight.shape == ((4 + 2 * 2) * 32, 96) and layer.qkv.bias is not None
    assert layer.gate.weight.shape == (2, 96) and layer.out.weight.shape == (96, 4 * 32)
    assert all(p.dtype == torch.float16 for p in layer.parameters())
    assert vnn.PowerRetention(64, 2, head_dim=32).qkv.weight.dtype == torch.bfloat16  # the default
    assert vnn.PowerRetention(64, 2, head_dim=32, gating=False).gate is None
    g = torch.sigmoid(layer.gate.bias.float())
    assert (g > 0.89).all() and (g < 0.9995).all()  # slowly decaying gates at init
    Q, K, V, lg = layer.project(torch.randn(2, 5, 96).half())
    assert Q.shape == (2, 5, 4, 32) and K.shape == V.shape == (2, 5, 2, 32)
    assert lg.shape == (2, 5, 2) and lg.dtype == torch.float32 and (lg <= 0).all()


@pytest.mark.parametrize("x,argument,shown", [
    (torch.randn(2, 8, 32).bfloat16(), "x", "shape"), (torch.randn(8, 64).bfloat16(), "x", "shape"),
    (torch.randn(2, 8, 64), "x", "dtype torch.float32"), (torch.randn(2, 8, 64).half(), "x", "dtype"),
    ([1, 2], "x", "list"),
])
def test_input_errors(x, argument, shown):
    layer = _layer()
    with pytest.raises(InputError, match=rf"^{argument}: got .*{shown}"):
        layer(x)
    with pytest.raises(InputError, match=rf"^{argument}: got .*{shown}"):
        layer.step(x, layer.new_cache(2))


def test_cache_errors():
    layer = _layer()
    x = torch.randn(2, 1, 64).bfloat16()
    with pytest.raises(InputError, match=r"^x: got batch 2; expected the cache's batch 3"):
        layer.step(x, layer.new_cache(3))
    with pytest.raises(InputError, match=r"^cache: got dict"):
        layer.step(x, {})
    with pytest.raises(InputError, match=r"^cache: got K"):
        layer.step(x, _layer(gating=False).new_cache(2))
    with pytest.raises(InputError, match=r"^batch"):
        layer.new_cache(0)
    with pytest.raises(InputError, match=r"^state_dtype"):
        layer.new_cache(1, state_dtype=torch.float16)


def test_vidrial_nn_is_lazy():
    code = ("import sys, vidrial; assert 'torch' not in sys.modules and 'vidrial.nn' not in sys.modules; "
            "m = vidrial.nn; assert m.PowerRetention.__module__ == 'vidrial.nn'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---- the kernels on the host -----------------------------------------------------------------------
@needs_gxx
@pytest.mark.parametrize("heads,kv_heads,gating,t", [(2, 2, True, 100), (2, 1, False, 80)])
def test_forward_and_gradients_match_float64(host_kernels, heads, kv_heads, gating, t):
    """forward: the layer (real kernels, bf16) against the float64 layer with the same weights; backward:
    every parameter gets a gradient, and it matches float64 autograd."""
    layer = _layer(num_heads=heads, num_kv_heads=kv_heads, gating=gating)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, t, 64, generator=gen).bfloat16()
    dy = torch.randn(1, t, 64, generator=gen).bfloat16()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    y_ref = _reference(layer, x)
    assert _rel(y, y_ref) < 2e-2
    (y.float() * dy.float()).sum().backward()

    params = dict(layer.named_parameters())
    leaves = {n: p.detach().to(F64).requires_grad_(True) for n, p in params.items()}
    y64 = _reference(layer, x, leaves)
    (y64 * dy.to(F64)).sum().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert _rel(p.grad, leaves[name].grad) < 5e-2, name


@needs_gxx
# sizes keep the host-emulated decode steps few (each is a CPU run of the decode kernel, ~1 s): a prompt
# longer than the switch-over (compressed in the prefill), a short switch-over reached by single steps (the
# cache compressed mid-decode), no switch-over at all
@pytest.mark.parametrize("prompt,switch,gating,t", [(40, 32, True, 44), (10, 16, True, 27), (20, None, False, 28)])
def test_prefill_then_steps_equal_the_full_forward(host_kernels, prompt, switch, gating, t):
    """A prompt, then one token at a time (the cache grows to switch_over_seq_len, is compressed into the
    state, starts again, ...): every output equals the full forward over the concatenated sequence."""
    layer = _layer(switch_over_seq_len=switch, gating=gating)
    x = torch.randn(2, t, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        y_full = layer(x)
        cache = layer.new_cache(2)
        ys = []
        had = cache.state
        y, cache = layer.step(x[:, :prompt], cache)
        ys.append(y)
        compressions = int(cache.state is not had)  # a prompt longer than the switch-over is compressed at once
        for i in range(prompt, t):
            had = cache.state
            y, cache = layer(x[:, i:i + 1], cache=cache)
            ys.append(y)
            compressions += cache.state is not had
    y_dec = torch.cat(ys, 1)
    assert y_dec.shape == y_full.shape and cache.seen == t
    assert _rel(y_dec, y_full) < 2e-2
    assert _rel(y_dec, _reference(layer, x)) < 2e-2
    if switch is None:
        assert cache.state is None and cache.length == t
    else:
        assert compressions >= 1 and cache.state is not None and cache.length < switch
        assert cache.state.dtype == torch.float32


@needs_gxx
def test_torch_compile_fullgraph(host_kernels):
    """torch.compile(layer, fullgraph=True) traces the layer (projections, logsigmoid, the custom ops)
    without graph breaks, and the compiled forward + backward equal the eager ones (kernels on the host)."""
    layer = _layer()
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = layer(x)
    y.float().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    yc.float().sum().backward()
    assert torch.equal(yc, y)
    for n, p in layer.named_parameters():
        assert torch.allclose(p.grad.float(), grads[n].float(), rtol=1e-2, atol=1e-3), n


@needs_gxx
def test_tiny_lm_example_runs_two_steps_and_generates(host_kernels):
    """examples/tiny_lm.py at tiny sizes: 2 training steps (forward + backward kernels) and generation
    through the caches (prefill, decode steps), all on the host (compression is test_prefill_then_steps')."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "tiny_lm.py"
    spec = importlib.util.spec_from_file_location("tiny_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "2", "--device", "cpu", "--batch", "1", "--seq", "48", "--period", "8",
                    "--vocab", "16", "--d-model", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                    "--head-dim", "32", "--chunk-size", "32", "--switch-over", "64", "--generate", "2", "--quiet"])
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for v in out["losses"])
    assert 0.0 <= out["accuracy"] <= 1.0
