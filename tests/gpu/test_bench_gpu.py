"""GPU smoke test of `vidrial bench` (vidrial/bench): a tiny preset through the real runner, peers
as installed. Every vidrial case must pass its correctness check or be "not available" (an op not
built yet); no (case, implementation) may end in an unexplained state; the report is written.

Run: python3 -m pytest -m gpu -q tests/gpu/test_bench_gpu.py
"""
from __future__ import annotations

import json

import pytest

from vidrial.bench import cases as C
from vidrial.bench import report, runner

pytestmark = pytest.mark.gpu

TINY = C.Preset("tiny", sweep_t=(2048,), decode_batches=(2,), input_sets=2, warmup_ms=2.0, rep_ms=5.0,
                max_repeats=10, autotune_configs=1, tokens_per_batch=4096, budget_s=0.0)


def test_bench_tiny_preset(tmp_path, monkeypatch):
    # shapes A and B are added to every preset's sweep; keep this test small
    monkeypatch.setattr(C, "SHAPE_A", C.Shape(b=1, t=4096))
    monkeypatch.setattr(C, "SHAPE_B", C.Shape(b=2, t=2048))
    doc = runner.run(TINY, C.KINDS, log=lambda s: None)
    rows = doc["results"]
    assert {r["kind"] for r in rows} == set(C.KINDS)
    cp, mm = doc["ceilings"]["copy"]["bytes_per_s"], doc["ceilings"]["matmul"]["flops_per_s"]
    assert 1e11 < cp < 1e14 and 1e13 < mm < 1e16
    for r in rows:
        assert r["status"] in ("ok", "skipped", "not available", "error", "check failed"), r
        if r["impl"] == "vidrial":
            assert r["status"] in ("ok", "not available"), (r["case"], r["status"], r.get("note"), r.get("check"))
            if r["status"] == "ok":
                assert r["check"]["passed"] and r["ms"] > 0
        if r["impl"] == "sdpa":
            assert r["status"] == "ok", (r["case"], r.get("note"))
    out = report.write_all(doc, tmp_path)
    assert json.loads(out["json"].read_text())["gpu"]["name"]
