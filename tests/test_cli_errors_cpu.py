"""CLI mistakes a person makes get one line naming the argument, the value and what is allowed, exit code 2,
no traceback (issue 17 item 8). Tune and bench arguments are checked before any GPU or Optuna work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vidrial.cli import main
from vidrial.dispatch import store

REPO = Path(__file__).resolve().parent.parent
GPU = store.GpuIdentity(name="NVIDIA H200", arch="sm_90", sm_count=132)


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, captured.out, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"vidrial {argv[0]}: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def no_tuning(monkeypatch):
    """Tune argument errors must come before a study, a measurement worker or an Optuna storage exists."""
    from vidrial.tuning import tuner

    def reached(*args, **kwargs):
        raise AssertionError("argument check came too late: tuning work started")

    monkeypatch.setattr(tuner, "tune_key", reached)
    monkeypatch.setattr(tuner, "make_storage", reached)


# ---- compile ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sm_75", "sm_1000"])
def test_compile_unsupported_arch(arch, capsys):
    _one_line_error(capsys, ["compile", "--arch", arch], f"--arch: got '{arch}'", "sm_80", "sm_90a")


def test_compile_unknown_kernel(capsys):
    err = _one_line_error(capsys, ["compile", "--kernel", "nope", "--arch", "sm_90"], "--kernel: got 'nope'",
                          "update_state")
    assert "[" not in err  # the allowed names as a plain list, not a Python repr


def _fake_compile_many(spilling: set[int]):
    """compile_many without NVRTC: job i spills 16 bytes when i is in `spilling`."""
    from vidrial.core.compile import CompiledKernel, CompileFacts

    def compile_many(jobs, workers=None, on_done=None):
        out = []
        for i, (kernel, arch, _opts, _label) in enumerate(jobs):
            spill = 8 if i in spilling else 0
            facts = CompileFacts(registers=255, spill_store_bytes=spill, spill_load_bytes=spill,
                                 stack_frame_bytes=0, static_smem_bytes=0)
            out.append(CompiledKernel(kernel.entry, arch, b"\0", facts, "fake", 0.0, False))
            if on_done is not None:
                on_done(i, out[-1])
        return out
    return compile_many


@pytest.mark.parametrize("spilling, rc", [({1}, 0), ({0}, 1)])
def test_compile_marks_and_counts_every_spilling_config(spilling, rc, capsys, monkeypatch):
    """Job 0 is the first key's default config, job 1 its first corner: a spilling corner is a marked row and a
    problem in the summary (exit 0); a spilling default stays an error (exit 1)."""
    import vidrial.commands.compile as command

    monkeypatch.setattr(command, "compile_many", _fake_compile_many(spilling))
    assert main(["compile", "--arch", "sm_90", "--kernel", "discumsum", "--space", "corners", "--limit-keys", "1",
                 "--progress"]) == rc
    captured = capsys.readouterr()
    marked = [line for line in captured.out.splitlines() if "SPILLS]" in line]
    assert len(marked) == 1 and ("[DEFAULT CONFIG SPILLS]" in marked[0]) == (0 in spilling)
    assert "1 problem(s)" in captured.out
    assert "compiling" in captured.err  # --progress: the bar, on stderr


def test_a_real_process_prints_no_traceback():
    out = subprocess.run([sys.executable, "-m", "vidrial", "compile", "--arch", "sm_75"], capture_output=True,
                         text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and out.stderr.strip().startswith("vidrial compile: --arch: got 'sm_75'")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---- ship -------------------------------------------------------------------------------------------------------
def _tuned_run(root: Path, families: tuple[str, ...] = ("update_state",)) -> None:
    from vidrial.kernels import get_family

    for name in families:
        fam = get_family(name)
        key = fam.standard_keys()[0]
        store.record(fam, key, fam.default_config(key), gpu=GPU, time_ms=1.0, default_time_ms=1.0, trials=1,
                     directory=root)


def test_ship_missing_or_empty_source(tmp_path, capsys):
    _one_line_error(capsys, ["ship", "/nonexistent"], "source: got /nonexistent", "<gpu>/<family>.json")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["ship", str(tmp_path / "empty"), "--into", str(tmp_path / "into")],
                    f"source: got {tmp_path / 'empty'}")
    assert not (tmp_path / "into").exists()


def test_ship_into_a_corrupt_file_merges_nothing(tmp_path, capsys):
    run, into = tmp_path / "run", tmp_path / "into"
    _tuned_run(run, ("discumsum", "update_state"))
    corrupt = into / "nvidia-h200" / "update_state.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text("{not json")
    _one_line_error(capsys, ["ship", str(run), "--into", str(into)], "--into: got", str(corrupt), "not valid JSON")
    assert corrupt.read_text() == "{not json"
    assert not (into / "nvidia-h200" / "discumsum.json").exists()  # nothing half-merged


def test_ship_into_an_existing_file(tmp_path, capsys):
    _tuned_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, ["ship", str(tmp_path / "run"), "--into", str(tmp_path / "file")],
                    f"--into: got {tmp_path / 'file'}", "folder")


# ---- bench ------------------------------------------------------------------------------------------------------
def test_bench_from_missing_json(tmp_path, capsys):
    _one_line_error(capsys, ["bench", "--from-json", "/nonexistent.json", "--out", str(tmp_path / "o")],
                    "--from-json: got /nonexistent.json", "bench.json")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text", ["{}", "{not json", "[1, 2]", '{"results": 3}'])
def test_bench_from_json_that_is_no_bench_run(text, tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(text)
    _one_line_error(capsys, ["bench", "--from-json", str(path), "--out", str(tmp_path / "o")],
                    f"--from-json: got {path}", "results")
    assert not (tmp_path / "o").exists()


def test_bench_out_is_an_existing_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, ["bench", "--preset", "quick", "--out", str(tmp_path / "file")],
                    f"--out: got {tmp_path / 'file'}", "folder")


# ---- tune -------------------------------------------------------------------------------------------------------
def _tune_error(capsys, tmp_path: Path, extra: list[str], *needles: str) -> str:
    argv = ["tune", "--kernel", "update_state", "--preset", "quick", "--out", str(tmp_path / "out"),
            "--no-progress", *extra]
    return _one_line_error(capsys, argv, *needles)


def test_tune_kernel_that_cannot_be_imported(tmp_path, capsys, no_tuning):
    _tune_error(capsys, tmp_path, ["--kernel", "nosuchmod:x"], "--kernel: got 'nosuchmod:x'", "nosuchmod")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("trials", ["0", "-5"])
def test_tune_trials_must_be_positive(trials, tmp_path, capsys, no_tuning):
    _tune_error(capsys, tmp_path, ["--trials", trials], f"--trials: got {trials}", "at least 1")
    assert not (tmp_path / "out").exists()


def test_tune_storage_errors(tmp_path, capsys, no_tuning):
    _tune_error(capsys, tmp_path, ["--storage", "foo://"], "--storage: got 'foo://'", "sqlite:///")
    _tune_error(capsys, tmp_path, ["--storage", "sqlite:////nonexistent/x.db"],
                "--storage: got 'sqlite:////nonexistent/x.db'", "/nonexistent")
    (tmp_path / "folder").mkdir()
    _tune_error(capsys, tmp_path, ["--storage", str(tmp_path / "folder")], f"--storage: got '{tmp_path / 'folder'}'",
                "file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--out", "--tuned-dir"])
def test_tune_output_folder_is_an_existing_file(flag, tmp_path, capsys, no_tuning):
    (tmp_path / "file").write_text("x")
    _tune_error(capsys, tmp_path, [flag, str(tmp_path / "file")], f"{flag}: got {tmp_path / 'file'}", "folder")
    assert (tmp_path / "file").read_text() == "x"


def test_tune_space_is_a_folder(tmp_path, capsys, no_tuning):
    _tune_error(capsys, tmp_path, ["--space", str(tmp_path)], f"--space: got {tmp_path}", "TOML file")
    _tune_error(capsys, tmp_path, ["--space", str(tmp_path / "none.toml")], "--space: got", "TOML file")


def test_a_failed_tune_leaves_no_empty_output_folder(tmp_path, capsys):
    import tuning_doubles as T

    out = tmp_path / "vidrial-tune"
    rc = main(["tune", "--kernel", T.synthetic.REF, "--key", '{"head_dim": 128}', "--out", str(out),
               "--backend", "tuning_doubles:NoDeviceBackend", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA device" in err, (rc, err)
    assert not out.exists(), sorted(out.rglob("*"))


# ---- show, --version --------------------------------------------------------------------------------------------
def test_show_unknown_gpu_lists_the_known_ones(capsys):
    _one_line_error(capsys, ["show", "--gpu", "bogus"], "--gpu: got 'bogus'", "nvidia-h200")


def test_show_known_gpu_by_name_still_works(capsys):
    assert main(["show", "--gpu", "NVIDIA H200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"][0]["gpu"] == "nvidia-h200"


def test_version(capsys):
    import vidrial

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"vidrial {vidrial.__version__}"
