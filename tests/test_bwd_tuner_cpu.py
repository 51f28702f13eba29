"""The backward families are tunable (issue 6): search spaces, the tuner protocol and its check, on the CPU.

* every search space loads and enumerates valid configs (the default among them) for every standard key
  on sm_90; the whole space of the d=64 keys compiles for sm_90 without spills;
* the tuner sees the protocol (tuner._missing_protocol is empty);
* small problems on the CPU: make_inputs lands in the key's buckets (the launcher looks up exactly that
  key), reference() is a bounded slice, check_outputs(reference, reference) is 0 and a perturbed or NaN
  copy fails the tolerance;
* run() executed on the CPU (tests/bwd_host_emu.py runs the rendered kernels as C++) passes the check,
  also for several configs on the same inputs (the worker reuses inputs; discumsum_bwd works in place);
* a short study (tuner + the GPU worker's measurement code, CPU tensors) checks, times and records a winner.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from vidrial.core.compile import CompiledKernel, compile_many
from vidrial.kernels import get_family
from vidrial.kernels.power_retention import bwd_tuning as bt
from vidrial.kernels.power_retention.query_state_bwd import ROW_OUTPUTS
from vidrial.tuning.search_space import load_search_space
from vidrial.tuning.tuner import _missing_protocol

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402

BWD = ("update_state_bwd", "query_state_bwd", "discumsum_bwd", "intra_chunk_attention_bwd")
CPU = torch.device("cpu")
needs_gxx = pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")

# small keys: with TUNE_CHUNK patched to 32 (p=2) / 16 (p=4) each problem has 2+ heads of 2+ chunks
SMALL = [
    ("update_state_bwd", dict(head_dim=32, deg=2, d_tile=8, tokens=256)),
    ("update_state_bwd", dict(head_dim=32, deg=4, d_tile=4, dtype="float16", tokens=128)),
    ("query_state_bwd", dict(head_dim=32, deg=2, d_tile=8, tokens=256)),
    ("discumsum_bwd", dict(head_dim=8, feature_dim=80, batch_heads=2, chunks=4)),
    ("intra_chunk_attention_bwd", dict(head_dim=32, deg=2, stage="dkv", chunk_size=32, tokens=256)),
    ("intra_chunk_attention_bwd", dict(head_dim=32, deg=2, dtype="float16", stage="dq", chunk_size=32, tokens=256)),
    ("intra_chunk_attention_bwd", dict(head_dim=16, deg=4, stage="dkv", chunk_size=16, tokens=128)),
]
IDS = [f"{n}-{kw.get('stage', '')}{kw.get('deg', '')}" for n, kw in SMALL]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setitem(bt.TUNE_CHUNK, 2, 32)
    monkeypatch.setitem(bt.TUNE_CHUNK, 4, 16)


def _problem(name: str, kw: dict):
    fam = get_family(name)
    key = fam.Key(**kw)
    return fam, key, fam.make_inputs(key, CPU, 0)


# ---- search spaces and protocol ---------------------------------------------------------------------
@pytest.mark.parametrize("name", BWD)
def test_search_space_has_valid_configs_for_every_standard_key(name):
    fam = get_family(name)
    assert _missing_protocol(fam) == []
    space = load_search_space(fam)
    assert set(space.fields) <= set(fam.Config.model_fields)
    for key in fam.standard_keys():
        valid = space.valid_configs(key, "sm_90")
        assert valid, key.label()
        assert fam.default_config(key) in valid, key.label()  # the tuner's trial 0 is the default


def _d64_keys(name):
    fam = get_family(name)
    return [(fam, k) for k in fam.standard_keys() if k.head_dim == 64 and getattr(k, "dtype", "bfloat16") == "bfloat16"]


@pytest.mark.parametrize("fam,key", [fk for n in BWD for fk in _d64_keys(n)],
                         ids=lambda x: getattr(x, "name", None) or x.label().replace(" ", ","))
@pytest.mark.parametrize("half", [0, 1])
def test_whole_space_compiles_without_spills_for_sm90(fam, key, half):
    """The d=64 keys (shape A's head dim). Every standard key: `vidrial compile --arch sm_90 --space all --kernel
    NAME` (spill column)."""
    configs = load_search_space(fam).valid_configs(key, "sm_90")[half::2]
    jobs = [(fam.render(key, c), fam.target_arch(c, "sm_90"), (), f"{fam.name} {c.label()}") for c in configs]
    results = compile_many(jobs, workers=2)
    bad = [f"{c.label()}: {r if not isinstance(r, CompiledKernel) else fam.infeasible_reason(key, c, r)}"
           for c, r in zip(configs, results)
           if not isinstance(r, CompiledKernel) or fam.infeasible_reason(key, c, r) is not None]
    assert not bad, "\n".join(bad)


# ---- inputs, reference and check ----------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", SMALL, ids=IDS)
def test_problem_lands_in_the_key_buckets(name, kw, monkeypatch):
    """run(key, None, inputs) makes the launcher pick a config: it must look up exactly `key`."""
    fam, key, inputs = _problem(name, kw)
    seen = []

    class Picked(Exception):
        pass

    def spy(k, device, config=None):
        seen.append(k)
        raise Picked

    monkeypatch.setattr(fam, "config_for", spy)
    from vidrial.core import launch

    monkeypatch.setattr(launch, "_HOST_LAUNCHER", object())  # CPU inputs: let the call reach its dispatch
    with pytest.raises(Picked):
        fam.run(key, None, inputs)
    assert seen == [key]


def _scale(fam, key, inputs, ref, i) -> float:
    """The size check_outputs measures tensor i against (query_state_bwd's dg: the size of its terms)."""
    if fam.name == "query_state_bwd" and ROW_OUTPUTS[i] == "dg":
        dl = ref[ROW_OUTPUTS.index("dl")]
        return max(ref[i].norm().item(), (dl * bt.leading(inputs["l"], dl.shape)).norm().item())
    return ref[i].norm().item()


@pytest.mark.parametrize("name,kw", SMALL, ids=IDS)
def test_check_is_zero_on_the_reference_and_fails_perturbed_copies(name, kw):
    fam, key, inputs = _problem(name, kw)
    ref = fam.reference(key, inputs)
    assert all(r.dtype == torch.float64 for r in ref)
    # a bounded slice: one (KV) head, at most CHECK_CHUNKS chunks
    heads_dim = 2
    assert all(r.shape[heads_dim] == 1 for r in ref)
    assert fam.check_outputs(key, inputs, ref, ref) == 0.0
    tol = fam.tolerance(key)
    gen = torch.Generator().manual_seed(1)
    for i, r in enumerate(ref):
        noise = torch.randn(r.shape, generator=gen, dtype=r.dtype)
        bad = list(ref)
        bad[i] = r + noise * (3 * tol * _scale(fam, key, inputs, ref, i) / noise.norm())
        err = fam.check_outputs(key, inputs, tuple(bad), ref)
        assert tol < err < 4 * tol, (i, err)
        bad[i] = r.clone()
        bad[i].view(-1)[-1] = math.nan
        assert fam.check_outputs(key, inputs, tuple(bad), ref) == math.inf


def test_intra_forward_per_head_is_the_whole_reference():
    from vidrial.reference.forward import intra_chunk_attention_reference

    gen = bt.generator(CPU, 3)
    Q, K, V = bt.randn((2, 64, 6, 16), gen, CPU), bt.randn((2, 64, 3, 16), gen, CPU), bt.randn((2, 64, 3, 16), gen, CPU)
    log_G, _ = bt.chunk_gates(2, 64, 3, 16, gen, CPU)
    for got, want in zip(bt.intra_forward(Q, K, V, log_G, 2, 0.25, 16),
                         intra_chunk_attention_reference(Q, K, V, log_G, 2, 0.25, 16)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_query_state_rows_inputs_are_a_consistent_forward():
    """Y = (O e^m + A) / (l e^m + B): recomputing A, B with phi from Sbar16/sbar gives Y back (to the bf16
    rounding of the stored states and Y), and the first chunk has no state (no initial state)."""
    from vidrial.reference.forward import phi

    _, key, x = _problem("query_state_bwd", SMALL[2][1])
    c, n = x["chunk_size"], x["Q"].shape[1] // x["chunk_size"]
    assert x["Sbar16"][:, 0].abs().max() == 0 and x["sbar"][:, 0].abs().max() == 0 and x["sbar"][:, n].abs().max() > 0
    q = (x["Q"].double() * (x["G"].double() / key.deg).exp().unsqueeze(-1)).view(1, n, c, -1, key.head_dim)
    pq = phi(q, key.deg, key.d_tile) * x["scale"] ** key.deg
    A = torch.einsum("bnchD,bnhDe->bnche", pq, x["Sbar16"].double()).reshape(x["Y"].shape)
    B = torch.einsum("bnchD,bnhD->bnch", pq, x["sbar"][:, :n].double()).reshape(x["l"].shape)
    em = x["m"].double().exp()
    Y = (x["O"].double() * em.unsqueeze(-1) + A) / (x["l"].double() * em + B).unsqueeze(-1)
    assert (Y - x["Y"].double()).norm() / Y.norm() < 1e-2
    assert (B[:, c:] > 0).all() and (x["l"] >= 1).all()


# ---- run() on the CPU (the rendered kernels as C++, tests/bwd_host_emu.py) -------------------------------
@pytest.fixture()
def host_kernels():
    undo = bwd_host_emu.install()
    yield
    undo()


def _other_config(fam, key):
    """A second valid config of the space."""
    valid = load_search_space(fam).valid_configs(key, "sm_90")
    default = fam.default_config(key)
    return [c for c in valid if c != default][0]


@needs_gxx
@pytest.mark.parametrize("name,kw", [s for s in SMALL if s[1].get("deg", 2) == 2], ids=[
    i for i, s in zip(IDS, SMALL) if s[1].get("deg", 2) == 2])
def test_run_on_the_cpu_passes_the_check_for_several_configs(name, kw, host_kernels):
    fam, key, inputs = _problem(name, kw)
    expected = fam.reference(key, inputs)  # once per key, before any run, as the tuner's worker does
    default = fam.default_config(key)
    # the worker reuses one key's inputs for every config: a later config must still pass (in place:
    # discumsum_bwd overwrites its gradients, so it runs the default again after another config)
    configs = (default, _other_config(fam, key)) + ((default,) if name == "discumsum_bwd" else ())
    for config in configs:
        outputs = fam.run(key, config, inputs)
        assert all(o.shape[2] >= e.shape[2] for o, e in zip(outputs, expected))
        err = fam.check_outputs(key, inputs, outputs, expected)
        assert err <= fam.tolerance(key), (config.label(), err)


# ---- a whole study on the CPU: the tuner's measurement path with the kernels run as C++ ---------------------
class HostBackend:
    """vidrial.tuning.worker.GpuBackend's run() (make_inputs once per key, reference once, each config's
    first run checked, then timed) with CPU tensors: the launchers run the kernels through bwd_host_emu."""

    def __new__(cls):
        from vidrial.tuning.worker import GpuBackend

        backend = object.__new__(type("HostGpuBackend", (GpuBackend,), {"hello": cls.hello}))
        backend.torch, backend.device_index, backend.device = torch, 0, CPU
        backend._inputs_key = backend._inputs = backend._expected = None
        return backend

    @staticmethod
    def hello(self):
        return {"gpu": {"name": "Host Emulation", "arch": "sm_90", "sm_count": 1}, "arch": "sm_90", "toolchain": {},
                "device_index": 0, "pid": os.getpid()}


def _cpu_timer(fn, device=None, **_):
    import time

    from vidrial.tuning.measure import Timing

    started = time.perf_counter()
    fn()
    return Timing.from_times([(time.perf_counter() - started) * 1e3])


@needs_gxx
@pytest.mark.parametrize("name,kw", [SMALL[3], SMALL[5]], ids=["discumsum_bwd", "intra_dq"])
def test_a_short_study_on_the_cpu_checks_times_and_records(name, kw, host_kernels, monkeypatch, tmp_path):
    import json

    from vidrial.tuning import measure
    from vidrial.tuning.tuner import tune
    from vidrial.tuning.worker import InProcessMeasurer

    monkeypatch.setattr(measure, "time_cuda", _cpu_timer)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    fam = get_family(name)
    (result,) = tune(fam, [kw], trials=3, out=tmp_path / "out", tuned_dir=tmp_path / "tuned", progress=False,
                     retime_rounds=1, measurer=InProcessMeasurer(HostBackend()))
    # every measured config passed the check ("invalid": suggestions outside the constraints, "infeasible":
    # rejected on compiled facts; neither is measured)
    assert result.status_counts.get("ok", 0) >= 2 and set(result.status_counts) <= {"ok", "invalid", "infeasible"}, \
        result.status_counts
    assert result.default_time_ms is not None and result.winner is not None
    stored = json.loads(Path(result.store_path).read_text())
    (entry,) = stored["entries"].values()
    assert fam.Config.model_validate(entry["config"]) == fam.Config.model_validate(result.winner)
