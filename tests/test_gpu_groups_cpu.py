"""benchmarks/h200_session.sh's default GPU test groups name every file of tests/gpu (a file left out of
them is never run on the H200: test_backward_sweep_gpu.py and test_tuner_fidelity_gpu.py were)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_gpu_test_file_is_in_a_default_group():
    script = (ROOT / "benchmarks" / "h200_session.sh").read_text()
    block = script[script.index("local groups=("):script.index("})", script.index("local groups=("))]
    grouped = set(re.findall(r"tests/gpu/(test_\w+\.py)", block))
    files = {p.name for p in (ROOT / "tests" / "gpu").glob("test_*.py")}
    assert files - grouped == set(), f"GPU test files in no default group: {sorted(files - grouped)}"
