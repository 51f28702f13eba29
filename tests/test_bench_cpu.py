"""CPU tests of `vidrial bench` (vidrial/bench, vidrial/commands/bench.py): work counts against
docs/MATH.md section 6, presets, case building with missing peers, the runner's failure handling, the
report writer (JSON, markdown, PNG when matplotlib is there) and the CLI parser. No GPU needed."""
from __future__ import annotations

import json
import sys

import pytest

from vidrial.bench import cases as C
from vidrial.bench import report, runner
from vidrial.bench.peers import IMPL_NAMES, Peer, load_all, load_gla, load_retention


# ---------------------------------------------------------------- work counts (docs/MATH.md section 6)

def test_exact_feature_dim():
    assert C.exact_feature_dim(64, 2) == 2080  # C(65, 2)
    assert C.exact_feature_dim(32, 2) == 528
    assert C.exact_feature_dim(64, 4) == 766480  # C(67, 4)


def test_forward_flops_shape_a_matches_hand_count():
    # t*d*(4D + 2c) per (b, h): 65536 * 64 * (4*2080 + 2*1024) = 65536*64*10368, times h=8
    assert C.retention_fwd_flops(C.SHAPE_A) == 8 * 65536 * 64 * 10368 == 347_892_350_976
    # docs/BENCHMARKS.md: retention forward at shape A, 5.80 ms = "60 TFLOP/s useful"
    assert round(C.retention_fwd_flops(C.SHAPE_A) / 5.80e-3 / 1e12) == 60


def test_forward_flops_same_tokens_same_work_when_chunked():
    # the chunked count is linear in tokens: shape B (8 x 8192) does the work of shape A (1 x 65536)
    assert C.retention_fwd_flops(C.SHAPE_B) == C.retention_fwd_flops(C.SHAPE_A)


def test_forward_flops_quadratic_when_one_chunk():
    s = C.Shape(b=64, t=1024)  # t <= chunk: the quadratic formula runs, causal 2 t^2 d per (b, h)
    assert C.retention_fwd_flops(s) == 64 * 8 * 2 * 1024 * 1024 * 64 == 68_719_476_736


def test_sdpa_and_gla_flops():
    assert C.sdpa_fwd_flops(C.SHAPE_A) == 8 * 2 * 65536 ** 2 * 64
    assert C.gla_fwd_flops(C.SHAPE_A) == 8 * 65536 * 64 * (4 * 64 + 2 * 64)


def test_fwd_bwd_is_3_5_times_forward():
    for impl in IMPL_NAMES:
        f = C.flops(impl, "fwd", C.SHAPE_B)
        assert C.flops(impl, "fwd_bwd", C.SHAPE_B) == pytest.approx(3.5 * f)
    assert C.flops("vidrial", "decode", C.SHAPE_B) is None


def test_decode_bytes():
    s = C.Shape(b=8, t=65536)
    # b*h*D*d*2 = 8*8*2080*64*2 = 17,039,360 bytes: "17 MB at b=h=8, d=64, p=2"
    assert C.decode_state_bytes(s) == 17_039_360
    assert C.bytes_moved("vidrial", "decode", s) == C.bytes_moved("retention", "decode", s) == 17_039_360
    assert C.bytes_moved("sdpa", "decode", s) == 2 * 8 * 8 * 65536 * 64 * 2  # the bf16 KV cache
    assert C.bytes_moved("gla", "decode", s) == 2 * 8 * 8 * 64 * 64 * 4
    assert C.bytes_moved("vidrial", "fwd", s) is None


# ---------------------------------------------------------------- presets and cases

def test_presets():
    std, quick = C.PRESETS["standard"], C.PRESETS["quick"]
    assert std.sweep_t == tuple(1024 * 2 ** i for i in range(7))  # 1k .. 64k
    assert std.decode_batches == (1, 8, 64)
    assert std.tokens_per_batch == quick.tokens_per_batch == 65536
    assert std.input_sets >= 3 and quick.input_sets >= 2
    assert 0 < quick.budget_s < 120 and 0 < std.budget_s < 480
    assert set(quick.sweep_t) <= set(std.sweep_t) and set(quick.decode_batches) <= set(std.decode_batches)
    for p in (std, quick):
        shapes = C.training_shapes(p)
        assert C.SHAPE_A in shapes and C.SHAPE_B in shapes
        assert all(s.b * s.t == 65536 for s in shapes)
        assert all((s.h, s.d, s.deg, s.chunk) == (8, 64, 2, 1024) for s in shapes)
    assert len(C.training_shapes(std)) == 7


def _peers(**over):
    peers = {n: Peer(n, True, funcs={k: (lambda *a, **k: None) for k in C.KINDS}) for n in IMPL_NAMES}
    peers.update(over)
    return peers


def test_build_cases_kinds_tags_and_callables():
    cases = C.build_cases(C.PRESETS["quick"], ("fwd", "decode"), _peers())
    kinds = {c.kind for c in cases}
    assert kinds == {"fwd", "decode"}
    fwd = [c for c in cases if c.kind == "fwd"]
    assert len(fwd) == 3 and len([c for c in cases if c.kind == "decode"]) == 2
    a = next(c for c in fwd if c.shape == C.SHAPE_A)
    assert "A" in a.tags and "sweep" in a.tags
    assert set(a.impls) == set(IMPL_NAMES)
    for name, impl in a.impls.items():
        assert impl.skipped is None and callable(impl.make)
        assert impl.flops == C.flops(name, "fwd", C.SHAPE_A)
    assert a.impls["vidrial"].check is not None and a.impls["sdpa"].check is None
    assert len({c.name for c in cases}) == len(cases)


def test_missing_peer_is_skipped_with_note():
    peers = _peers(retention=Peer("retention", False, "skipped: retention not importable (ModuleNotFoundError)"),
                   vidrial=Peer("vidrial", True, funcs={"fwd": lambda *a, **k: None, "decode": None},
                                missing={"decode": "not available: vidrial.inference missing"}))
    cases = C.build_cases(C.PRESETS["quick"], C.KINDS, peers)
    fwd = next(c for c in cases if c.kind == "fwd")
    assert fwd.impls["retention"].skipped.startswith("skipped: retention not importable")
    assert fwd.impls["retention"].make is None
    dec = next(c for c in cases if c.kind == "decode")
    assert dec.impls["vidrial"].skipped.startswith("not available")
    fb = next(c for c in cases if c.kind == "fwd_bwd")
    assert fb.impls["vidrial"].skipped.startswith("not available")  # no fwd_bwd in funcs
    row = runner.run_impl(fwd, fwd.impls["retention"], C.PRESETS["quick"])
    assert row["status"] == "skipped" and row["note"].startswith("skipped: retention")
    assert "ms" not in row
    row = runner.run_impl(dec, dec.impls["vidrial"], C.PRESETS["quick"])
    assert row["status"] == "not available"


def test_peer_loaders_without_gpu_or_package(monkeypatch):
    import vidrial.bench.peers as P

    peers = load_all()
    assert peers["vidrial"].available
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    if not cuda:
        for n in ("retention", "sdpa", "gla"):
            assert not peers[n].available and peers[n].note.startswith("skipped:")
    # with a "GPU" but no package: skipped with the import error as the reason
    monkeypatch.setattr(P, "_cuda_reason", lambda: None)
    monkeypatch.setitem(sys.modules, "retention", None)
    monkeypatch.setitem(sys.modules, "retention.triton", None)
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.setitem(sys.modules, "fla.ops", None)
    monkeypatch.setitem(sys.modules, "fla.ops.gla", None)
    r, g = load_retention(), load_gla()
    assert not r.available and r.note.startswith("skipped: retention not importable")
    assert not g.available and g.note.startswith("skipped: flash-linear-attention")
    assert load_all(skip=("gla",))["gla"].note == "skipped: excluded on the command line"


def test_runner_reports_failures_and_goes_on():
    case = C.Case("fwd test", "fwd", C.SHAPE_B)

    def boom(seed):
        raise RuntimeError("kernel exploded")

    def nie(seed):
        raise NotImplementedError("backward not built")

    row = runner.run_impl(case, C.Impl("vidrial", boom), C.PRESETS["quick"])
    assert row["status"] == "error" and "kernel exploded" in row["note"] and "traceback" in row
    row = runner.run_impl(case, C.Impl("vidrial", None, check=nie), C.PRESETS["quick"])
    assert row["status"] == "not available" and "backward not built" in row["note"]
    row = runner.run_impl(case, C.Impl("sdpa", boom), C.PRESETS["quick"], over_budget=True)
    assert row["status"] == "skipped" and "budget" in row["note"]


def test_runner_orders_standard_shapes_first():
    cases = C.build_cases(C.PRESETS["standard"], C.KINDS, _peers())
    ordered = runner._order(cases)
    n_first = sum(1 for c in cases if {"A", "B", "decode"} & set(c.tags))
    assert n_first == 2 + 2 + 3
    assert all({"A", "B", "decode"} & set(c.tags) for c in ordered[:n_first])
    assert sorted(c.name for c in ordered) == sorted(c.name for c in cases)


# ---------------------------------------------------------------- report

def synthetic_doc() -> dict:
    """A result set as runner.run makes it, with made-up times (no GPU)."""
    preset = C.PRESETS["quick"]
    peers = _peers(gla=Peer("gla", False, "skipped: fla not importable"))
    ms = {"vidrial": 1.0, "retention": 2.0, "sdpa": 0.5}
    rows = []
    for case in C.build_cases(preset, C.KINDS, peers):
        for name, impl in case.impls.items():
            row = case.describe()
            row.update(impl=name, flops=impl.flops, bytes=impl.bytes)
            if impl.skipped:
                row.update(status="skipped", note=impl.skipped)
            else:
                scale = case.shape.t / 8192 if name == "sdpa" and case.kind != "decode" else 1.0
                row.update(status="ok", ms=ms[name] * scale * (0.01 if case.kind == "decode" else 1),
                           timed="eager", per_set_ms=[1.0, 1.1])
                if name == "vidrial":
                    row["check"] = {"rel_err": 3e-3, "tol": 2e-2, "passed": True}
            rows.append(row)
    rows[-1]["note"] = "NaN-safe"
    ceilings = {"copy": {"bytes_per_s": 4.25e12}, "matmul": {"flops_per_s": 7.01e14}}
    runner.derive(rows, ceilings)
    return {"schema": "vidrial-bench/1", "date": "2026-11-28T12:00:00+00:00", "preset": "quick",
            "gpu": {"name": "NVIDIA H200"}, "versions": {"torch": "2.11", "vidrial": "0.1.0", "retention": None},
            "settings": {"preset": dict(vars(preset))}, "ceilings": ceilings,
            "peers": {n: p.as_dict() for n, p in peers.items()}, "results": rows}


def test_derive_ratios_and_ceiling_fraction():
    doc = synthetic_doc()
    v = next(r for r in doc["results"] if r["kind"] == "fwd" and r["impl"] == "vidrial"
             and r["shape"]["t"] == 65536)
    assert v["vs"]["retention"] == pytest.approx(2.0)  # retention's ms / vidrial's ms
    assert "gla" not in v["vs"]
    assert v["tokens_per_s"] == pytest.approx(65536 / 1e-3)
    assert v["ceiling_fraction"] == pytest.approx(C.retention_fwd_flops(C.SHAPE_A) / 1e-3 / 7.01e14)
    d = next(r for r in doc["results"] if r["kind"] == "decode" and r["impl"] == "vidrial" and r["shape"]["b"] == 8)
    assert d["us_per_step"] == pytest.approx(10.0)
    assert d["ceiling_fraction"] == pytest.approx(17_039_360 / 1e-5 / 4.25e12)


def test_report_writer_json_markdown_and_png(tmp_path):
    doc = synthetic_doc()
    doc["results"][0]["weird"] = float("nan")
    out = report.write_all(doc, tmp_path)
    loaded = json.loads(out["json"].read_text())  # valid JSON (NaN written as null)
    assert loaded["gpu"]["name"] == "NVIDIA H200" and loaded["results"][0]["weird"] is None
    assert len(loaded["results"]) == len(doc["results"])
    md = out["markdown"].read_text()
    assert "## forward" in md and "## decode" in md and "NVIDIA H200" in md and "2.00x" in md
    text = report.text_report(doc)
    assert "gla: skipped: fla not importable" in text and "vidrial vs retention" in text
    if report.have_matplotlib():
        names = sorted(p.name for p in out["plots"])
        assert names == sorted([report.THROUGHPUT_PNG, report.DECODE_PNG])
        for p in out["plots"]:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    else:
        assert out["plots"] == [] and "matplotlib" in out["plot_note"]


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    out = report.write_all(synthetic_doc(), tmp_path)
    assert out["plots"] == [] and out["plot_note"].startswith("plots skipped")
    assert json.loads(out["json"].read_text())["outputs"]["plot_note"].startswith("plots skipped")


# ---------------------------------------------------------------- CLI

def test_cli_parser():
    from vidrial.cli import build_parser
    from vidrial.commands.bench import kinds_of

    p = build_parser()
    a = p.parse_args(["bench"])
    assert a.preset == "standard" and a.only is None and kinds_of(a.only) == ("fwd", "fwd_bwd", "decode")
    a = p.parse_args(["bench", "--preset", "quick", "--out", "x", "--only", "decode", "--only", "fwd"])
    assert (a.preset, a.out) == ("quick", "x") and kinds_of(a.only) == ("fwd", "decode")
    assert a.func.__module__ == "vidrial.commands.bench"
    for bad in (["bench", "--preset", "huge"], ["bench", "--only", "bwd"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_cli_from_json_and_no_gpu(tmp_path, capsys):
    from vidrial.cli import main

    report.write_json(synthetic_doc(), tmp_path / "run")
    rc = main(["bench", "--from-json", str(tmp_path / "run" / report.JSON_NAME), "--out", str(tmp_path / "re")])
    assert rc == 0 and (tmp_path / "re" / report.MD_NAME).exists()
    assert "vidrial vs retention" in capsys.readouterr().out
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    if not cuda:
        assert main(["bench", "--preset", "quick", "--out", str(tmp_path / "x")]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------- check plumbing on the CPU (float64 reference as the op)

@pytest.fixture
def cpu_cases(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(C, "DEVICE", "cpu")
    monkeypatch.setattr(C, "CHECK_TOKENS", 32)
    return C.Shape(b=2, t=64, h=2, d=32, chunk=16)


def _ref_op():
    import torch

    from vidrial.reference.forward import power_retention_reference

    def op(Q, K, V, log_G, deg=2, chunk_size=None):
        return power_retention_reference(Q, K, V, log_G, deg=deg, chunk_size=chunk_size).to(torch.bfloat16)
    return op


def test_check_fwd_plumbing(cpu_cases):
    r = C.check_vidrial_fwd(_ref_op(), cpu_cases, 3)
    assert r["rel_err"] < 1e-2 and "[0, :32]" in r["what"]
    wrong = lambda *a, **k: _ref_op()(*a, **k) * 1.1  # noqa: E731
    assert C.check_vidrial_fwd(wrong, cpu_cases, 3)["rel_err"] > C.FWD_TOL


def test_check_fwd_bwd_prefix_gradients(cpu_cases):
    # gradients of the whole problem with dY zero past the prefix == the prefix problem's gradients
    r = C.check_vidrial_fwd_bwd(_ref_op(), cpu_cases, 5)
    assert set(r["per_input"]) == {"dQ", "dK", "dV", "dlog_G"}
    assert r["rel_err"] < 2e-2, r


def test_check_decode_plumbing(cpu_cases):
    import torch

    from vidrial.reference.forward import power_retention_inference_reference

    s = C.Shape(b=2, t=64, h=2, d=32)

    def op(q, k, v, g, S, z, deg=2, scale=None, switch_over_seq_len=512):
        Y, S2, z2 = power_retention_inference_reference(q, k, v, g, S, z, deg=deg, scale=scale,
                                                        switch_over_seq_len=switch_over_seq_len)
        return Y.to(torch.bfloat16), S2, z2
    x = C.vidrial_decode_inputs(s, 1, n_hist=4)
    assert x["S"].dtype == torch.bfloat16 and x["S"].abs().sum() > 0 and x["z"].dtype == torch.float32
    from vidrial.reference.forward import phi

    assert (phi(x["q"][:, 0], 2, x["d_tile"]) * x["z"].double()).sum(-1).min() >= 0  # phi(q).z = sum (q.k)^2
    assert C.check_vidrial_decode(op, s, 1)["rel_err"] < 1e-2


def test_input_sets_differ_and_are_not_zero(cpu_cases):
    a, b = C.training_inputs(cpu_cases, 0), C.training_inputs(cpu_cases, 1)
    assert not (a["Q"] == b["Q"]).all() and a["Q"].abs().sum() > 0
    assert (a["log_G"] < 0).all() and a["log_G"].dtype.is_floating_point


# ---------------------------------------------------------------- the whole run with fakes (no GPU)

def test_run_end_to_end_with_fakes(monkeypatch, tmp_path, capsys):
    import vidrial.bench.ceilings as ceil
    import vidrial.bench.peers as P
    import vidrial.tuning.measure as M
    from vidrial.tuning.measure import Timing

    ms = {"vidrial": 1.0, "retention": 3.0, "sdpa": 2.0}

    def fake_peers(ac, skip=()):
        out = {n: Peer(n, True, funcs={k: n for k in C.KINDS}) for n in ("vidrial", "retention", "sdpa")}
        out["vidrial"].funcs["fwd_bwd"] = None
        out["vidrial"].missing["fwd_bwd"] = "not available: vidrial.autograd (ImportError)"
        out["gla"] = Peer("gla", False, "skipped: fla not installed")
        return out

    def fake_make(impl, s, seed):
        if impl == "retention" and s.t == 1024:
            raise RuntimeError("triton failed")
        return lambda: impl

    calls = []

    def fake_time(fn, **kw):
        calls.append(kw)
        return Timing.from_times([ms[fn()]] * 5)

    monkeypatch.setattr(P, "load_all", fake_peers)
    monkeypatch.setattr(ceil, "measure", lambda **kw: {"copy": {"bytes_per_s": 4e12}, "matmul": {"flops_per_s": 7e14}})
    monkeypatch.setattr(M, "time_cuda", fake_time)
    for key in list(C.MAKERS):
        monkeypatch.setitem(C.MAKERS, key, fake_make)
    for key in list(C.CHECKS):
        monkeypatch.setitem(C.CHECKS, key, lambda fn, s, seed: {"rel_err": 1e-3, "tol": 2e-2, "what": "fake"})
    progress = []
    doc = runner.run(C.PRESETS["quick"], C.KINDS, on_progress=lambda d: progress.append(len(d["results"])),
                     log=lambda s: None, progress=True)
    rows = doc["results"]
    assert len(rows) == (3 + 3 + 2) * 4 and progress[-1] == len(rows)
    assert f"{len(rows)}/{len(rows)}" in capsys.readouterr().err  # the tqdm bar over the (case, impl) runs
    st = {(r["kind"], r["shape"]["t"], r["shape"]["b"], r["impl"]): r for r in rows}
    assert st[("fwd", 65536, 1, "vidrial")]["status"] == "ok"
    assert st[("fwd", 65536, 1, "vidrial")]["vs"] == {"retention": 3.0, "sdpa": 2.0}
    assert st[("fwd", 65536, 1, "vidrial")]["check"]["passed"]
    assert st[("fwd", 1024, 64, "retention")]["status"] == "error"
    assert st[("fwd_bwd", 8192, 8, "vidrial")]["status"] == "not available"
    assert st[("fwd", 8192, 8, "gla")]["status"] == "skipped"
    dec = st[("decode", 65536, 8, "vidrial")]
    assert dec["status"] == "ok" and dec["us_per_step"] == pytest.approx(1000.0) and len(dec["per_set_ms"]) == 2
    assert all(k["rep_ms"] == C.PRESETS["quick"].rep_ms for k in calls)
    out = report.write_all(doc, tmp_path)
    assert json.loads(out["json"].read_text())["preset"] == "quick"


def test_readme_block_written_and_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n")
    doc = synthetic_doc()
    out = report.write_all(doc, tmp_path / "docs" / "bench")
    report.update_readme(readme, doc, out["plots"])
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n") and "## Benchmark results" in text and "NVIDIA H200" in text
    assert text.count(report.README_START) == 1 and "2026-11-28" in text
    for p in out["plots"]:
        assert f"(docs/bench/{p.name})" in text
    doc["gpu"]["name"] = "NVIDIA H100"
    report.update_readme(readme, doc, out["plots"])
    text2 = readme.read_text()
    assert text2.count(report.README_START) == 1 and "H100" in text2 and "H200" not in text2
    assert text2.count("## Benchmark results") == 1


def test_anchor_rows_on_h200_only():
    doc = synthetic_doc()
    rows = report.anchor_rows(doc)
    got = {(r[0], r[1]): r for r in rows}
    assert got[("fwd A", "retention")][2:] == ["1.000", "5.800", "5.80x"]
    assert ("decode b8", "sdpa") in got and ("fwd B", "sdpa") in got
    assert "docs/BENCHMARKS.md" in report.text_report(doc)
    doc["gpu"]["name"] = "NVIDIA A100"
    assert report.anchor_rows(doc) == []
