"""The tuner on a real GPU: CUDA-event timing, the measurement worker, a study that survives
deliberately faulting and hanging configs, and a short real study per kernel family."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from vidrial.core.family import KernelFamily
import tuning_doubles as T
from vidrial.tuning.measure import time_cuda
from vidrial.tuning.tuner import tune
from vidrial.tuning.worker import MeasurementWorker

pytestmark = pytest.mark.gpu


def test_time_cuda_medians_a_copy():
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = time_cuda(lambda: y.copy_(x))
    assert t.repeats >= 5 and t.warmup >= 1
    assert 0 < t.min_ms <= t.median_ms <= t.max_ms
    # 512 MB moved: between 0.05 ms (10 TB/s) and 50 ms
    assert 0.05 < t.median_ms < 50, t
    fixed = time_cuda(lambda: y.copy_(x), warmup=2, repeats=7, flush_l2=False)
    assert fixed.repeats == 7 and fixed.warmup == 2


def test_worker_checks_and_times_on_the_gpu():
    job = {"family": T.fault_probe.REF, "key": T.ProbeKey().model_dump(), "config": T.ProbeConfig().model_dump(),
           "arch": None, "check": True, "timing": {"rep_ms": 20}}
    with MeasurementWorker(device_index=0, job_timeout_s=120) as w:
        assert w.info["arch"].startswith("sm_") and w.info["gpu"]["sm_count"] > 0
        job["arch"] = w.info["arch"]
        res = w.measure(job)
        assert res["status"] == "ok", res
        assert res["rel_err"] == pytest.approx(0.0, abs=1e-6) and res["time_ms"] > 0


def test_study_survives_faulting_and_hanging_configs(tmp_path):
    """The isolation proof: illegal-address and hanging kernels are recorded as failed, the
    worker is restarted, and the study finishes with a working winner."""
    (result,) = tune(T.fault_probe, [{}], sampler="grid", out=tmp_path / "out", tuned_dir=tmp_path / "tuned",
                     job_timeout_s=8, progress=False, retime_rounds=2)
    import optuna

    from vidrial.tuning.study import make_storage, trial_rows

    study = optuna.load_study(study_name=result.study_name, storage=make_storage(None, tmp_path / "out"))
    by_mode: dict[str, set[str]] = {}
    for r in (row.as_dict() for row in trial_rows(study)):
        if r["config"] is not None and r["memo_of"] is None:
            by_mode.setdefault(r["config"]["mode"], set()).add(r["status"])
    assert by_mode["ok"] == {"ok"}, by_mode
    assert by_mode["illegal_address"] <= {"fault", "crash"}, by_mode
    assert by_mode["hang"] == {"timeout"}, by_mode
    assert result.winner["mode"] == "ok" and result.time_ms > 0
    stored = json.loads(Path(result.store_path).read_text())
    assert list(stored["entries"].values())[0]["config"]["mode"] == "ok"
    report = (Path(result.report_dir) / "leaderboard.md").read_text()
    assert "timeout" in report and ("fault" in report or "crash" in report)


def _tunable(fam: KernelFamily) -> bool:
    return all(getattr(type(fam), m) is not getattr(KernelFamily, m) for m in ("make_inputs", "run", "reference"))


def _families():
    from vidrial.kernels import families

    return sorted(families().items())


@pytest.mark.parametrize("name", [n for n, _ in _families()] or ["<none>"])
def test_short_real_study_per_family(tmp_path, name):
    from vidrial.kernels import families

    fam = families().get(name)
    if fam is None:
        pytest.skip("no kernel families registered")
    if not _tunable(fam):
        pytest.skip(f"{name} does not implement the tuner protocol (make_inputs/run/reference; docs/HELPERS.md)")
    from vidrial.tuning.search_space import SearchSpaceError, load_search_space

    try:
        load_search_space(fam)
    except SearchSpaceError as exc:
        pytest.skip(f"{name}: {exc}")
    key = fam.standard_keys()[0]
    (result,) = tune(fam, [key], trials=8, out=tmp_path / "out", tuned_dir=tmp_path / "tuned", progress=False,
                     job_timeout_s=180)
    assert result.winner is not None, result.status_counts
    assert result.status_counts.get("ok", 0) >= 1
    bad = {s: n for s, n in result.status_counts.items() if s in ("wrong", "fault", "crash", "timeout", "error")}
    if bad:  # the tuner did its job (rejected them); the family's own tests should catch these
        warnings.warn(f"{name}: configs failed on the GPU and were rejected: {bad}; "
                      f"see {result.report_dir}/leaderboard.md", stacklevel=1)
    assert result.default_time_ms is not None
    assert result.time_ms <= result.default_time_ms * 1.01
    assert Path(result.store_path).is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_share_one_study(tmp_path):
    (result,) = tune(T.fault_probe, [{"n": 1 << 24}], sampler="grid", out=tmp_path / "out",
                     tuned_dir=tmp_path / "tuned", job_timeout_s=8, progress=False, gpus=(0, 1))
    import optuna

    from vidrial.tuning.study import make_storage, trial_rows

    study = optuna.load_study(study_name=result.study_name, storage=make_storage(None, tmp_path / "out"))
    devices = {r.device for r in trial_rows(study) if r.finished and r.memo_of is None}
    assert devices == {"0", "1"}
    assert result.winner["mode"] == "ok"
