"""An installed wheel carries templates, search spaces and tuned configs."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build_dir = tmp_path_factory.mktemp("src")
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
    (whl,) = out.glob("vidrial-*.whl")
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
