"""vidrial.autograd on the CPU: the custom ops' fake (meta) implementations give the right shapes
and dtypes for forward and backward, autograd wiring routes the gradients, and torch.compile
(fullgraph=True) traces the ops without graph breaks (meta tensors: no kernel runs)."""
import pytest
import torch

import vidrial.autograd  # noqa: F401  (registers torch.ops.vidrial.*)


def _meta(b=1, t=128, hq=4, h=2, d=64, gating=True, state=False, D=2304):
    kw = dict(device="meta", requires_grad=True)
    Q = torch.randn(b, t, hq, d, dtype=torch.bfloat16, **kw)
    K = torch.randn(b, t, h, d, dtype=torch.bfloat16, **kw)
    V = torch.randn(b, t, h, d, dtype=torch.bfloat16, **kw)
    lg = torch.randn(b, t, h, **kw) if gating else None
    S0 = torch.randn(b, h, D, d, **kw) if state else None
    s0 = torch.randn(b, h, D, **kw) if state else None
    return Q, K, V, lg, S0, s0


@pytest.mark.parametrize("gating,state,chunk", [(True, False, 64), (False, True, 64), (True, False, 0)])
def test_fake_forward_backward_shapes(gating, state, chunk):
    Q, K, V, lg, S0, s0 = _meta(gating=gating, state=state)
    out = torch.ops.vidrial.power_retention_fwd(Q, K, V, lg, S0, s0, 2, 0.125, chunk, 8, chunk != 0)
    Y = out[0]
    assert Y.shape == Q.shape and Y.dtype == Q.dtype
    if chunk:
        assert out[4].shape == (1, 2, 2, 2304, 64) and out[4].dtype == torch.bfloat16
        assert out[5].shape == (1, 3, 2, 2304) and out[6].shape == (1, 2, 2304, 64)
    loss = Y.float().sum() + (out[6].sum() if chunk else 0)
    loss.backward()
    for x in (Q, K, V, lg, S0, s0):
        if x is not None:
            assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype


def test_compile_fullgraph_traces_the_ops():
    def f(Q, K, V, lg):
        return torch.ops.vidrial.power_retention_fwd(Q, K, V, lg, None, None, 2, 0.125, 64, 8, False)[0]

    Q, K, V, lg, _, _ = _meta()
    fc = torch.compile(f, fullgraph=True, backend="aot_eager")
    Y = fc(Q, K, V, lg)
    Y.float().sum().backward()
    assert Q.grad.shape == Q.shape and lg.grad.shape == lg.shape


def test_compile_fullgraph_traces_the_public_op(monkeypatch):
    """vidrial.power_retention (module attribute, padding, checks) traces with fullgraph=True; the
    device checks are relaxed so that meta tensors stand in for CUDA ones."""
    import vidrial
    from vidrial.pipeline import checks

    real = checks.check_inputs

    def lenient(Q, K, V, log_G, *args):
        b, t, hq, d = Q.shape
        return b, t, hq, K.shape[2], d

    monkeypatch.setattr(checks, "check_inputs", lenient)
    assert real is not lenient

    def f(Q, K, V, lg):
        return vidrial.power_retention(Q, K, V, lg, deg=2, chunk_size=64)

    Q, K, V, lg, _, _ = _meta(t=100)  # padded to 128 inside
    torch._dynamo.reset()
    Y = torch.compile(f, fullgraph=True, backend="aot_eager")(Q, K, V, lg)
    assert Y.shape == Q.shape
    Y.float().sum().backward()
    assert Q.grad.shape == Q.shape and lg.grad.shape == lg.shape


@pytest.mark.parametrize("shape", [(2, 3, 16, 8), (2, 50, 8), (1, 4, 7, 1)])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_time_is_the_cumsum_along_time(shape, reverse):
    """The gate scans run on an [.., h, T] copy (fast innermost scan); same sums as cumsum along T."""
    from vidrial.pipeline.backward import scan_time as _scan_time

    x = torch.randn(shape, dtype=torch.float64)
    want = x.flip(-2).cumsum(-2).flip(-2) if reverse else x.cumsum(-2)
    got = _scan_time(x, reverse=reverse)
    assert got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_chunk_cumsum_restarts_every_chunk():
    from vidrial.pipeline.backward import chunk_cumsum as _chunk_cumsum

    lg = torch.randn(2, 48, 3)
    got = _chunk_cumsum(lg, 16)
    for nu in range(3):
        sl = slice(16 * nu, 16 * nu + 16)
        torch.testing.assert_close(got[:, sl], lg[:, sl].cumsum(1))


def test_intra_row_term():
    from vidrial.pipeline.backward import intra_row_term as _intra_row_term

    dO, O = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.randn(2, 5, 3, 8, dtype=torch.float64)
    dl, l = torch.randn(2, 5, 3, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
    want = torch.einsum("bthd,bthd->bth", dO, O) + dl * (l - 1e-6)
    torch.testing.assert_close(_intra_row_term(dO, O, dl, l), want)


def test_compiled_log_G_check_skips_the_value_read():
    """Issue 17 item 9a: the log_G checks that power_retention and power_retention_inference run
    (structure, then values) trace with fullgraph=True: the device->host read of max(log_G) is skipped
    while compiling (it would break the graph), and still raises in eager mode."""
    from vidrial.core.errors import InputError
    from vidrial.pipeline import checks

    lg = torch.full((1, 8, 2), 0.5)  # breaks the contract: only eager calls can see it

    def f(lg):
        checks._check_log_G(lg, (1, 8, 2), "batch, time, kv_heads")
        return lg * 2

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(lg), lg * 2)
    with pytest.raises(InputError, match=r"^log_G: got max value 0.5"):
        f(lg)
