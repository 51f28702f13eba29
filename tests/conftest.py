import os
from pathlib import Path

import pytest

# the tuner's test doubles (tests/tuning_doubles.py) are reached by 'tuning_doubles:attr': child
# processes started with subprocess (not only spawned workers, which inherit sys.path) import them too
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)


def _gpu_skip_reason() -> str | None:
    try:
        import torch
    except Exception as exc:  # pragma: no cover
        return f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA GPU present (torch.cuda.is_available() is False); GPU tests run on the H200 test machine"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    if "gpu" in (config.getoption("markexpr", "") or ""):
        # asked for by name (-m gpu) on a machine without one: each test says why it skips
        skip = pytest.mark.skip(reason=reason)
        for item in gpu:
            item.add_marker(skip)
        return
    # deselected at collection: one summary line instead of a SKIPPED line per test under -ra
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if "gpu" not in item.keywords]
    config._vidrial_gpu_skipped = (len(gpu), reason)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = getattr(config, "_vidrial_gpu_skipped", None)
    if skipped:
        n, reason = skipped
        terminalreporter.write_line(f"{n} GPU tests skipped (deselected): {reason}")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests use their own compile cache unless VIDRIAL_CACHE_DIR is set by the caller."""
    if "VIDRIAL_CACHE_DIR" not in os.environ:
        os.environ["VIDRIAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("vidrial-cache"))
    yield
