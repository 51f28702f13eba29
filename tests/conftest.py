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
    # tests marked slow (NVRTC compiles of every standard key: a minute or more each on 2 cores) run first, so
    # under pytest-xdist no worker is left running one alone at the end; otherwise the order is unchanged
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
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
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: the controller prints the summary line
        config.workeroutput["vidrial_gpu_skipped"] = [len(gpu), reason]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller collects nothing itself: it takes the GPU count from a worker."""
    skipped = getattr(node, "workeroutput", {}).get("vidrial_gpu_skipped")
    if skipped:
        node.config._vidrial_gpu_skipped = tuple(skipped)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = getattr(config, "_vidrial_gpu_skipped", None)
    if skipped:
        n, reason = skipped
        terminalreporter.write_line(f"{n} GPU tests skipped (deselected): {reason}")


def pytest_configure(config):
    # under pytest-xdist (README's `-n 2`), torch's intra-op threads split the cores between the workers
    # instead of each worker running os.cpu_count() threads on them (oversubscription)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1 and "PYTEST_XDIST_WORKER" in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        # the xdist controller rebuilds each warning a worker reports by importing its class's module, in one
        # thread per worker: two workers' TunedConfigWarning / UntunedGpuWarning arriving together imported
        # vidrial.dispatch from two threads at once, which its import cycle (dispatch/__init__ <-> select)
        # turns into "ImportError: cannot import name 'Candidate' from partially initialized module" (an
        # INTERNALERROR that ends the run). Imported here first, in the main thread, they are only looked up.
        import vidrial.dispatch.select  # noqa: F401
        import vidrial.dispatch.store  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests use their own compile cache unless VIDRIAL_CACHE_DIR is set by the caller. Under
    pytest-xdist each worker has its own cache root (tuned configs, last_dispatch.json: as one serial
    session has), but all workers share one cubin folder, so a kernel two workers need is compiled once
    (the cubin cache is safe for concurrent processes: test_concurrent_compiles_share_the_cache_safely)."""
    if "VIDRIAL_CACHE_DIR" not in os.environ:
        root = tmp_path_factory.mktemp("vidrial-cache")
        if "PYTEST_XDIST_WORKER" in os.environ:
            # a worker's basetemp is <session basetemp>/popen-gwN: the parent is the run's, shared
            shared = tmp_path_factory.getbasetemp().parent / "vidrial-shared-cubin"
            shared.mkdir(exist_ok=True)
            (root / "cubin").symlink_to(shared, target_is_directory=True)
        os.environ["VIDRIAL_CACHE_DIR"] = str(root)
    yield
