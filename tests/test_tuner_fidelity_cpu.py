"""The tuner times the problem it stores the winner for: for every family with the tuner protocol,
the dispatch key of make_inputs(key) is `key` itself (same buckets of the runtime sizes), and a
reference that covers only a leading slice is compared on that slice."""
from __future__ import annotations

import pytest
import torch

from vidrial.kernels import families


def _small(key):
    """The standard key with its runtime buckets shrunk to CPU-friendly sizes (same compile part)."""
    small = {"bh_chunks_bucket": 16, "bh_bucket": 4, "t_bucket": 256, "tokens": 512, "batch_heads": 4,
             "chunks": 4}
    fields = type(key).model_fields
    update = {k: v for k, v in small.items() if k in fields}
    if "chunk_size" in fields and "t_bucket" in fields and key.chunk_size:
        update["chunk_size"] = 64
    if "chunk_size" in fields and "tokens" in fields:
        update["chunk_size"] = 128
    if "chunk_size" in fields and "bh_chunks_bucket" in fields:
        update["chunk_size"] = 64
    return type(key).model_validate(key.model_dump() | update)


FAMILIES = sorted((n, f) for n, f in families().items() if hasattr(f, "inputs_key"))


def test_every_forward_family_says_what_key_its_inputs_have():
    names = {n for n, _ in FAMILIES}
    assert {"update_state", "intra_chunk_attention", "query_state", "discumsum", "decode_step"} <= names


@pytest.mark.parametrize("name,family", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_make_inputs_maps_back_to_its_key(name, family):
    for std in family.standard_keys()[:6]:
        key = _small(std)
        inputs = family.make_inputs(key, "cpu", seed=0)
        assert family.inputs_key(inputs, key) == key, f"{name}: tuner would time another key than {key.label()}"


@pytest.mark.parametrize("name", ["intra_chunk_attention", "query_state"])
def test_sliced_reference_is_checked_on_its_slice(name):
    family = families()[name]
    key = _small(family.standard_keys()[0])
    inputs = family.make_inputs(key, "cpu", seed=1)
    expected = family.reference(key, inputs)
    exp = expected if isinstance(expected, tuple) else (expected,)
    # "outputs" at full size whose leading slice is the reference: error 0; a change inside the slice is seen
    full = []
    for e in exp:
        shape = list(e.shape)
        shape[1] = inputs["Q"].shape[1]
        shape[2] = inputs["Q"].shape[2]
        out = torch.randn(shape, dtype=torch.float64)
        out[tuple(slice(0, n) for n in e.shape)] = e
        full.append(out)
    outputs = tuple(full) if isinstance(expected, tuple) else full[0]
    assert family.check_outputs(key, inputs, outputs, expected) == 0.0
    full[0][(0,) * full[0].dim()] += 10 * float(exp[0].abs().max())
    assert family.check_outputs(key, inputs, outputs, expected) > family.tolerance(key)


@pytest.mark.parametrize("name,family", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_full_size_standard_key_maps_back(name, family):
    """At the real bucket of a standard key (tensors on the meta device: shapes only). Before the
    fix, intra_chunk_attention timed b*hq=4, t=4093 for a key of 8 heads x 65536 tokens."""
    key = family.standard_keys()[0]
    inputs = family.make_inputs(key, "meta", seed=0)
    assert family.inputs_key(inputs, key) == key
