"""The tuner times the problem it stores the winner for (issue 6): for every family that says which
key its inputs have (KernelFamily.inputs_key), the op's own dispatch key of make_inputs(key) is `key`
itself (same buckets of the runtime sizes), within the tuner's input cap; a reference that covers a
leading slice is exact there and is compared there; the worker refuses inputs of another key."""
from __future__ import annotations

import pytest
import torch

from vidrial.core.errors import InputError
from vidrial.core.family import KernelFamily
from vidrial.core.protocol import INPUT_BYTES_CAP, size_in_bucket
from vidrial.kernels import families
from vidrial.reference import forward as R

FORWARD = {"update_state", "intra_chunk_attention", "discumsum", "query_state", "decode_step"}
FAMILIES = sorted((n, f) for n, f in families().items() if type(f).inputs_key is not KernelFamily.inputs_key)
STANDARD = [(n, f, k) for n, f in FAMILIES for k in f.standard_keys()]
STANDARD_IDS = [f"{n}-{i}" for n, f in FAMILIES for i in range(len(f.standard_keys()))]


def _small(key):
    """The key with its runtime buckets shrunk to CPU-friendly sizes (same compile part)."""
    small = {"bh_chunks_bucket": 16, "bh_bucket": 4, "t_bucket": 256, "tokens": 512, "batch_heads": 4, "chunks": 4}
    fields = type(key).model_fields
    update = {k: v for k, v in small.items() if k in fields}
    if "chunk_size" in fields and key.chunk_size:
        update["chunk_size"] = 128 if "tokens" in fields else 64
    return type(key).model_validate(key.model_dump() | update)


def _nbytes(inputs) -> int:
    return sum(x.numel() * x.element_size() for x in inputs.values() if isinstance(x, torch.Tensor))


def test_every_forward_family_says_what_key_its_inputs_have():
    assert FORWARD <= {n for n, _ in FAMILIES}


@pytest.mark.parametrize("name,family,key", STANDARD, ids=STANDARD_IDS)
def test_standard_key_at_full_size_maps_back_within_the_cap(name, family, key):
    """At the real buckets of every standard key (meta tensors: shapes only). Before the fix,
    intra_chunk_attention timed b*hq=4, t=4093 for its key of 8 heads x 65536 tokens."""
    inputs = family.make_inputs(key, "meta", seed=0)
    assert family.inputs_key(inputs, key) == key, f"{name}: the tuner would time another key than {key.label()}"
    assert _nbytes(inputs) <= INPUT_BYTES_CAP


@pytest.mark.parametrize("name,family", FAMILIES, ids=[n for n, _ in FAMILIES])
@pytest.mark.parametrize("value", [1, 2, 4, 8, 64])
def test_each_runtime_bucket_maps_back(name, family, value):
    """Small and odd buckets, one runtime field at a time (the t - 3 and heads rules at their edges)."""
    for std in family.standard_keys()[:2]:
        base = _small(std)
        for field in base.runtime_part():
            key = type(base).model_validate(base.model_dump() | {field: value})
            assert family.inputs_key(family.make_inputs(key, "meta", seed=0), key) == key, (field, value)


@pytest.mark.parametrize("name,family", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_real_cpu_inputs_map_back(name, family):
    for std in family.standard_keys():
        key = _small(std)
        inputs = family.make_inputs(key, "cpu", seed=0)
        assert all(x.device.type == "cpu" for x in inputs.values() if isinstance(x, torch.Tensor))
        assert family.inputs_key(inputs, key) == key, key.label()


@pytest.mark.parametrize("name,family", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_a_bucket_past_the_input_cap_is_refused_with_its_field(name, family):
    std = family.standard_keys()[0]
    huge = type(std).model_validate(std.model_dump() | {f: 2**40 for f in std.runtime_part()})
    with pytest.raises(InputError, match="input cap") as err:
        family.make_inputs(huge, "meta", seed=0)
    assert err.value.argument in std.runtime_part()


def test_size_in_bucket_stays_in_the_bucket():
    assert size_in_bucket(64, 10, field="chunks", cap=10_000) == 64
    assert size_in_bucket(64, 10, field="chunks", cap=500) == 50  # largest n <= cap, still in (32, 64]
    assert size_in_bucket(1, 10, field="chunks", cap=10) == 1
    with pytest.raises(InputError, match="chunks"):
        size_in_bucket(64, 10, field="chunks", cap=320)  # 33 * 10 B is the smallest of the bucket


# ---- bounded references: exact on their slice, compared on their slice ----------------------------------------
def _full_reference(name, key, x):
    """The whole problem in float64 (what a correct kernel writes everywhere), from reference.py."""
    from vidrial.reference.forward import query_state_reference

    if name == "update_state":
        return R.update_state_reference(x["K"], x["V"], x["G"], key.deg, key.d_tile, key.chunk_size)
    if name == "discumsum":
        return R.discumsum_reference(x["S"], x["s"], x["chunk_gates"])
    if name == "query_state":
        return query_state_reference(x["Q"], x["Sbar"], x["sbar"], x["O"], x["l"], x["m"], x["log_G"], deg=key.deg,
                                     d_tile=key.d_tile, scale=x["scale"], chunk_size=x["chunk_size"])
    if key.normalize and not key.chunk_size:
        return R.attention_reference(x["Q"], x["K"], x["V"], x["log_G"], key.deg)
    O, l, m = R.intra_chunk_attention_reference(x["Q"], x["K"], x["V"], x["log_G"], key.deg, None,
                                                key.chunk_size or x["Q"].shape[1])
    return O / l.unsqueeze(-1) if key.normalize else (O, l, m)


SLICED = [("update_state", 0), ("discumsum", 0), ("query_state", 0), ("intra_chunk_attention", 0),
          ("intra_chunk_attention", 1)]


@pytest.mark.parametrize("name,index", SLICED)
def test_sliced_reference_is_exact_and_checked_on_its_slice(name, index):
    family = families()[name]
    key = _small(family.standard_keys()[index])
    inputs = family.make_inputs(key, "cpu", seed=1)
    expected = family.reference(key, inputs)
    full = _full_reference(name, key, inputs)
    outs = list(full) if isinstance(full, tuple) else [full]
    exps = expected if isinstance(expected, tuple) else (expected,)
    assert any(o.numel() > e.numel() for o, e in zip(outs, exps)), "the reference should cover a slice only"
    as_outputs = lambda: tuple(outs) if isinstance(full, tuple) else outs[0]  # noqa: E731
    # the slice's reference equals the whole problem's reference there (slicing changes nothing)
    assert family.check_outputs(key, inputs, as_outputs(), expected) < 1e-9
    # a wrong value outside the slice is not seen, one inside is
    outs[0] = outs[0].clone()
    outs[0][(-1,) * outs[0].dim()] += 1e3
    assert family.check_outputs(key, inputs, as_outputs(), expected) < 1e-9
    outs[0][(0,) * outs[0].dim()] += 10 * float(exps[0].abs().max())
    assert family.check_outputs(key, inputs, as_outputs(), expected) > family.tolerance(key)


# ---- the worker refuses to time another key's problem -------------------------------------------------------------
def _cpu_backend():
    from vidrial.tuning.worker import GpuBackend

    backend = object.__new__(GpuBackend)  # GpuBackend's input path without a GPU
    backend.torch, backend.device_index, backend.device = torch, 0, torch.device("meta")
    backend._inputs_key = backend._inputs = backend._expected = None
    return backend


def _pre_fix_intra_family():
    """intra_chunk_attention with the make_inputs it had before the fix: b=1, 2 KV heads x GQA 2,
    t = min(t_bucket, 4096) - 3, whatever the key's buckets."""
    from vidrial.kernels.power_retention.intra_chunk_attention import IntraChunkAttentionFamily

    class PreFix(IntraChunkAttentionFamily):
        def make_inputs(self, key, device, seed):
            dt = torch.bfloat16 if key.dtype == "bfloat16" else torch.float16
            t = max(1, min(key.t_bucket, 4096) - 3)
            Q = torch.empty(1, t, 4, key.head_dim, dtype=dt, device=device)
            K = torch.empty(1, t, 2, key.head_dim, dtype=dt, device=device)
            G = torch.empty(1, t, 2, device=device) if key.gating else None
            return dict(Q=Q, K=K, V=K, log_G=G)

    return PreFix()


def test_worker_refuses_inputs_of_another_key():
    from vidrial.tuning.worker import ProblemMismatchError

    real = families()["intra_chunk_attention"]
    key = real.standard_keys()[0]  # shape A's key: 8 heads, t_bucket 65536
    backend = _cpu_backend()
    with pytest.raises(ProblemMismatchError, match=r"bh_bucket: 4 \(key 8\), t_bucket: 4096 \(key 65536\)"):
        backend._inputs_for(_pre_fix_intra_family(), key, 0)
    assert backend._inputs is None
    inputs = backend._inputs_for(real, key, 0)
    assert inputs["Q"].shape == (1, 65533, 8, key.head_dim)
