"""An installed wheel carries templates, search spaces and tuned configs."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(folder: Path) -> None:
    out, build_dir = folder / "out", folder / "src"
    # build from a copy so the test never leaves build/ or *.egg-info in the checkout
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            dst = build_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(build_dir)], check=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    from run_once import once  # tests/ is on sys.path (tests/conftest.py's folder)

    (whl,) = (once(tmp_path_factory, "wheel", _build_wheel) / "out").glob("vidrial-*.whl")
    return whl


def test_wheel_carries_data_folders(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "search_spaces", "tuned_configs"):
        shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()
                         and "__pycache__" not in p.parts)
        assert shipped, f"{folder}/ is empty in the checkout"
        missing = [p for p in shipped if f"vidrial/_data/{p}" not in names]
        assert not missing, f"wheel lacks {missing}"
    assert "vidrial/cli.py" in names and "vidrial/core/compile.py" in names
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert entry_points and "vidrial = vidrial.cli:main" in zipfile.ZipFile(wheel).read(entry_points[0]).decode()


def test_wheel_carries_no_test_scaffolding(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    scaffolding = [n for n in names if n.endswith(("tuning/testing.py", "tuning_doubles.py")) or n.startswith("tests/")]
    assert not scaffolding, f"the wheel ships test scaffolding: {scaffolding}"


def test_installed_wheel_finds_its_templates(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import vidrial.core.paths as p; d = p.data_dir('templates'); "
            "print(d); assert (d / 'testing' / 'axpy.cu.j2').is_file()")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         check=True, capture_output=True, text=True).stdout
    assert str(target) in out


# the light install (issue 19): `pip install vidrial` pulls only what running and compiling kernels needs
CORE = {"jinja2", "pydantic", "tomli", "filelock", "tqdm", "torch", "cupy-cuda13x", "nvidia-cuda-nvrtc",
        "nvidia-cuda-runtime"}
EXTRAS = {"tune": {"optuna", "scipy"}, "plot": {"matplotlib"}, "bench": {"retention", "fla-core"}}
# what the extras pull in; the blocker below makes them unimportable, as in a venv with the bare install
NOT_CORE = ("optuna", "scipy", "sqlalchemy", "alembic", "colorlog", "matplotlib")


def _requirements(wheel: Path) -> dict[str | None, set[str]]:
    """extra (None: core) -> distribution names of the wheel's Requires-Dist lines."""
    import re

    zf = zipfile.ZipFile(wheel)
    (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    out: dict[str | None, set[str]] = {}
    for line in zf.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        out.setdefault(extra.group(1) if extra else None, set()).add(name)
    return out


def test_wheel_core_requirements_are_only_what_kernels_need(wheel):
    reqs = _requirements(wheel)
    assert reqs[None] == CORE, f"core Requires-Dist: {sorted(reqs[None])}; expected {sorted(CORE)}"
    for extra, names in EXTRAS.items():
        assert names <= reqs.get(extra, set()), f"[{extra}] lacks {names - reqs.get(extra, set())}"
    assert not {"optuna", "scipy", "sqlalchemy", "matplotlib"} & reqs[None]


LIGHT_INSTALL = r'''
import importlib.abc, io, sys
from contextlib import redirect_stderr, redirect_stdout

BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not in the light install)", name=name)
        return None

sys.meta_path.insert(0, Block())
import torch
import vidrial
from vidrial.cli import main
from vidrial.core.errors import InputError

assert vidrial.__file__.startswith(sys.argv[2]), vidrial.__file__  # the installed wheel, not the checkout
q = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)  # CPU tensors: refused with the device rule
for op, args in ((vidrial.power_retention, (q, q, q)), (vidrial.power_retention_inference, (q[:, :1],) * 3)):
    try:
        op(*args)
    except InputError as exc:
        assert "cuda" in str(exc).lower(), exc
    else:
        raise AssertionError(f"{op.__name__} accepted CPU tensors")

from vidrial.dispatch import select_config
from vidrial.dispatch.store import GpuIdentity
from vidrial.kernels import get_family

fam = get_family("discumsum")
config = select_config(fam, fam.standard_keys()[0], GpuIdentity(name="NVIDIA H200", arch="sm_90", sm_count=132))
assert isinstance(config, fam.Config), config

def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()

rc, out, err = cli("show", "--gpu", "nvidia-h200")
assert rc == 0 and "discumsum" in out, (rc, out, err)
rc, out, err = cli("compile", "--arch", "sm_90", "--kernel", "discumsum", "--space", "default", "--workers", "2")
assert rc == 0 and "0 problem(s)" in out, (rc, out, err)
rc, out, err = cli("tune", "--kernel", "discumsum", "--preset", "quick", "--out", sys.argv[3])
assert rc == 2 and err.count("\n") == 1 and 'pip install "vidrial[tune]"' in err and "optuna" in err, (rc, err)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("light install ok")
'''


def test_light_install_runs_kernels_compiles_and_names_the_tune_extra(wheel, tmp_path):
    """The bare wheel with optuna, scipy, sqlalchemy, alembic, matplotlib unimportable (a meta-path blocker stands
    in for a fresh venv, which would need torch from the network): import, input validation of both public ops,
    dispatch for a named GPU, `show`, `compile`, and `tune` refused with the extra to install (exit 2)."""
    import os

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", LIGHT_INSTALL, ",".join(NOT_CORE), str(target), str(tmp_path / "tune")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "light install ok" in done.stdout, done.stdout + done.stderr
