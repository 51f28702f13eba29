"""On a real GPU: the standard problems (shapes A and B, fwd+bwd; a decode step) dispatch only keys of
their families' shape_keys(), i.e. the keys `vidrial tune --preset shapes` tunes and `vidrial show`
reports as the standard shapes. Catches a bucketing rule that drifts from the tuned key set."""
from __future__ import annotations

import pytest
import torch

from vidrial import dispatch
from vidrial.kernels import families
from vidrial.kernels.power_retention.standard_shapes import CHUNK_SIZE, DECODE_HEADS, TRAINING_SHAPES

pytestmark = pytest.mark.gpu


@pytest.fixture
def dispatched(monkeypatch):
    """(family name, key) of every config choice made while the test runs."""
    seen: list[tuple[str, object]] = []
    real = dispatch.select_config

    def spy(family, key, gpu=None):
        seen.append((family.name, key))
        return real(family, key, gpu)

    monkeypatch.setattr(dispatch, "select_config", spy)
    return seen


def _assert_all_shape_keys(seen, expected_families):
    fams = families()
    assert {name for name, _ in seen} >= expected_families, sorted({name for name, _ in seen})
    strays = [(name, key.key_string()) for name, key in seen if key not in fams[name].shape_keys()]
    assert not strays, f"dispatched keys outside shape_keys(): {strays}"


@pytest.mark.parametrize("shape", [s[0] for s in TRAINING_SHAPES])
def test_training_shape_dispatches_shape_keys(shape, dispatched):
    from vidrial import power_retention

    _, b, t, h = next(s for s in TRAINING_SHAPES if s[0] == shape)
    d = 64
    g = torch.Generator(device="cuda").manual_seed(3)
    Q, K, V = (torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    log_G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device="cuda", generator=g) + 4).requires_grad_()
    Y = power_retention(Q, K, V, log_G, deg=2, chunk_size=CHUNK_SIZE)
    Y.backward(torch.randn_like(Y))
    torch.cuda.synchronize()
    assert torch.isfinite(Q.grad.float()).all()
    _assert_all_shape_keys(dispatched, {"update_state", "intra_chunk_attention", "query_state", "discumsum",
                                        "discumsum_bwd", "update_state_bwd", "query_state_bwd",
                                        "intra_chunk_attention_bwd"})


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 8, 64])
def test_decode_step_dispatches_shape_keys(b, state_dtype, dispatched):
    from vidrial import power_retention_inference
    from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim

    h, d = DECODE_HEADS, 64
    D = feature_dim(d, 2, default_d_tile(d, 2))
    g = torch.Generator(device="cuda").manual_seed(b)
    Q, K, V = (torch.randn(b, 1, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    log_G = torch.nn.functional.logsigmoid(torch.randn(b, 1, h, device="cuda", generator=g) + 4)
    S = (torch.randn(b, h, D, d, device="cuda", generator=g) * 0.01).to(state_dtype)
    z = torch.rand(b, h, D, device="cuda", generator=g) + 1.0
    Y, _, _ = power_retention_inference(Q, K, V, log_G, S, z, deg=2, switch_over_seq_len=None)
    torch.cuda.synchronize()
    assert torch.isfinite(Y.float()).all()
    _assert_all_shape_keys(dispatched, {"decode_step"})
