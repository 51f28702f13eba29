"""The standard problem set (power_retention/standard_shapes.py): every family derives its shape keys
from it, they lead its standard keys, the tuner's 'shapes' preset and `vidrial show` use them."""
from __future__ import annotations

import json

import pytest

from vidrial.kernels import families
from vidrial.kernels.power_retention.standard_shapes import (DECODE_BATCHES, DECODE_HEADS, HEAD_DIM_DEGREES,
                                                             TRAINING_SHAPES, training_problems)
from vidrial.tuning.tuner import _keys

FAMILIES = sorted(families().items())
NAMES = [n for n, _ in FAMILIES]


@pytest.mark.parametrize("name,family", FAMILIES, ids=NAMES)
def test_shape_keys_lead_the_standard_keys(name, family):
    shapes = family.shape_keys()
    standard = family.standard_keys()
    assert shapes, f"{name} has no shape keys"
    assert len(set(shapes)) == len(shapes), "repeated shape keys"
    assert len(set(standard)) == len(standard), "repeated standard keys"
    assert standard[:len(shapes)] == shapes


@pytest.mark.parametrize("name,family", FAMILIES, ids=NAMES)
def test_shape_keys_cover_every_head_dim_and_degree(name, family):
    keys = family.shape_keys()
    dims = {k.head_dim for k in keys}
    assert dims == {d for d, _ in HEAD_DIM_DEGREES}
    if "deg" in type(keys[0]).model_fields:
        assert {(k.head_dim, k.deg) for k in keys} == set(HEAD_DIM_DEGREES)
    else:  # discumsum(_bwd): the degree shows as the feature dim
        assert {(k.head_dim, k.feature_dim) for k in keys} == {(p.d, p.feature_dim) for p in training_problems()}


def test_runtime_buckets_follow_the_standard_shapes():
    """Spot checks of the derivation against the shapes' own numbers (A: b=1,t=64k; B: b=8,t=8k; h=8)."""
    fams = families()
    assert {(k.bh_bucket, k.t_bucket) for k in fams["intra_chunk_attention"].shape_keys()} == {
        (b * h, t) for _, b, t, h in TRAINING_SHAPES}
    assert {(k.batch_heads, k.chunks) for k in fams["discumsum"].shape_keys()} == {
        (b * h, t // 1024) for _, b, t, h in TRAINING_SHAPES}
    for name in ("update_state_bwd", "query_state_bwd", "intra_chunk_attention_bwd"):
        assert {k.tokens for k in fams[name].shape_keys()} == {b * t * h for _, b, t, h in TRAINING_SHAPES}
    assert {k.tokens for k in fams["query_state"].shape_keys()} == {b * t for _, b, t, h in TRAINING_SHAPES}
    assert {k.bh_chunks_bucket for k in fams["update_state"].shape_keys()} == {
        b * h * t // 1024 for _, b, t, h in TRAINING_SHAPES}
    decode = fams["decode_step"].shape_keys()
    assert {k.bh_bucket for k in decode} == {b * DECODE_HEADS for b in DECODE_BATCHES}
    assert {k.state_dtype for k in decode} == {"float32", "bfloat16"}
    assert all(k.gating and k.q_len == 1 and k.group == 1 for k in decode)


def test_tuner_presets():
    fam = families()["update_state_bwd"]
    assert _keys(fam, None, "shapes") == fam.shape_keys()
    assert _keys(fam, None, "standard") == fam.standard_keys()
    assert _keys(fam, None, "quick") == fam.standard_keys()[:1]


def test_cli_accepts_the_shapes_preset():
    from vidrial.cli import build_parser

    args = build_parser().parse_args(["tune", "--kernel", "discumsum", "--preset", "shapes"])
    assert args.preset == "shapes"


def test_show_reports_shape_coverage(capsys):
    from vidrial.cli import main

    assert main(["show", "--gpu", "nvidia-h200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    fams = {f["family"]: f for f in data["gpus"][0]["families"]}
    for name, family in FAMILIES:
        cov = fams[name]["coverage"]
        shapes = cov["shapes"]
        assert shapes["keys"] == len(family.shape_keys())
        assert shapes["exact"] + shapes["nearest"] + shapes["default"] == shapes["keys"]
        assert sum(k["standard_shape"] for k in cov["keys"]) == shapes["keys"]


def test_show_text_names_the_command_that_fills_shape_gaps(capsys):
    from vidrial.cli import main

    assert main(["show", "--gpu", "nvidia-h200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    gaps = sum(f["coverage"]["shapes"]["keys"] - f["coverage"]["shapes"]["exact"] for f in data["gpus"][0]["families"])
    assert main(["show", "--gpu", "nvidia-h200"]) == 0
    text = capsys.readouterr().out
    assert (f"{gaps} standard-shape keys have no exact entry" in text) == (gaps > 0)
    assert ("--preset shapes --skip-tuned" in text) == (gaps > 0)
