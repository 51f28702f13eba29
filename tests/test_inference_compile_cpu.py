"""power_retention_inference under torch.compile (issue 19): the step traces as one custom op
(vidrial::power_retention_decode) with fullgraph=True and dynamic=True, and an InputError keeps its text.
Meta tensors: the op's fake kernel runs (shapes and checks), no kernel."""
from __future__ import annotations

import pytest
import torch

import vidrial
from vidrial.kernels.power_retention.sympow import feature_dim

D64 = feature_dim(64, 2, 8)


def _step_inputs(b=2, tq=1, L=8, hq=4, h=2, d=64, state=True, state_dtype=torch.float32):
    kw = dict(device="meta")
    Q = torch.randn(b, tq, hq, d, dtype=torch.bfloat16, **kw)
    K = torch.randn(b, L, h, d, dtype=torch.bfloat16, **kw)
    V = torch.randn(b, L, h, d, dtype=torch.bfloat16, **kw)
    lg = torch.randn(b, L, h, **kw)
    S = torch.randn(b, h, D64, d, dtype=state_dtype, **kw) if state else None
    z = torch.randn(b, h, D64, **kw) if state else None
    return Q, K, V, lg, S, z


def _compiled(dynamic=False, switch=16):
    def step(Q, K, V, lg, S, z):
        return vidrial.power_retention_inference(Q, K, V, lg, S, z, deg=2, switch_over_seq_len=switch)

    torch._dynamo.reset()
    return torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")


def test_fullgraph_step_without_compression_returns_the_given_state():
    Q, K, V, lg, S, z = _step_inputs(L=8)
    Y, S2, z2 = _compiled()(Q, K, V, lg, S, z)
    assert Y.shape == Q.shape and Y.dtype == Q.dtype
    assert S2.shape == S.shape and z2.shape == z.shape  # the state, unchanged (as eager returns it)


@pytest.mark.parametrize("state,state_dtype", [(True, torch.float32), (True, torch.bfloat16), (False, None)])
def test_fullgraph_step_that_compresses_returns_a_new_state(state, state_dtype):
    Q, K, V, lg, S, z = _step_inputs(L=16, state=state, state_dtype=state_dtype or torch.float32)
    Y, S2, z2 = _compiled(switch=16)(Q, K, V, lg, S, z)
    assert Y.shape == Q.shape
    assert S2.shape == (2, 2, D64, 64) and z2.shape == (2, 2, D64)
    assert S2.dtype == (state_dtype or torch.float32) and z2.dtype == torch.float32


def test_dynamic_with_closure_ints():
    """dynamic=True makes ints captured from an enclosing function symbolic (deg, switch_over_seq_len): the
    step specialises them (they choose the kernels) instead of handing SymInts to the op's checks."""
    deg, switch = 2, 16

    def step(Q, K, V, lg, S, z):
        return vidrial.power_retention_inference(Q, K, V, lg, S, z, deg=deg, switch_over_seq_len=switch)

    torch._dynamo.reset()
    fn = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for L, compresses in ((8, False), (13, False), (16, True)):
        Q, K, V, lg, S, z = _step_inputs(L=L)
        Y, S2, z2 = fn(Q, K, V, lg, S, z)
        assert Y.shape == Q.shape and S2.shape == S.shape and (S2 is not S) == compresses


def test_fake_kernel_reads_no_values():
    """The fake kernel runs on fake tensors that claim a real device (cuda under a GPU trace; cpu here): the
    log_G value check (a device->host read) must not run there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        Q, K, V, lg, S, z = (x.to("cpu") for x in _step_inputs(L=16))
        Y, S2, z2 = torch.ops.vidrial.power_retention_decode(Q, K, V, lg, S, z, 2, 0.0, 16, 0, None)
    assert Y.shape == Q.shape and S2.shape == S.shape and z2.shape == z.shape


def test_dynamic_sizes_trace_once_per_layout():
    """dynamic=True: batch, new tokens and cache length are symbolic (head_dim is specialised)."""
    fn = _compiled(dynamic=True, switch=None)
    for b, tq, L in ((2, 1, 8), (3, 2, 11), (1, 4, 40)):
        Q, K, V, lg, S, z = _step_inputs(b=b, tq=tq, L=L)
        Y, S2, _ = fn(Q, K, V, lg, S, z)
        assert Y.shape == (b, tq, 4, 64) and S2.shape == S.shape


@pytest.mark.parametrize("mutate,argument,text", [
    (lambda x: dict(x, lg=x["lg"][:, :3]), "log_G", "log_G"),
    (lambda x: dict(x, S=x["S"][..., :32]), "initial_state", "initial_state"),
    (lambda x: dict(x, Q=x["Q"].float()), "Q", "torch.bfloat16 or torch.float16"),
])
def test_input_errors_keep_their_text_under_fullgraph(mutate, argument, text):
    Q, K, V, lg, S, z = _step_inputs()
    x = mutate(dict(Q=Q, K=K, V=V, lg=lg, S=S, z=z))
    with pytest.raises(Exception) as info:
        _compiled()(x["Q"], x["K"], x["V"], x["lg"], x["S"], x["z"])
    msg = str(info.value)
    assert argument in msg and text in msg, msg[:2000]


def test_the_op_is_registered_with_a_schema():
    schema = str(torch.ops.vidrial.power_retention_decode.default._schema)
    assert "ScalarType? state_dtype" in schema and "Tensor? initial_state" in schema
