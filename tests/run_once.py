"""Expensive setup that several tests share, done once per test run, pytest-xdist workers included.

A module- or session-scoped fixture runs once per worker process under pytest-xdist. With pytest 9,
pytest-xdist's `--dist loadgroup` no longer keeps an `xdist_group` on one worker (it renames
`item._nodeid`, which pytest 9's `Node.nodeid` ignores), so the setup is shared through the run's
temporary folder instead: the first worker builds it under a file lock, the others wait and reuse it.
A build that fails leaves nothing behind: the next test to ask builds it again (and fails the same way).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` filled by build(folder), built once for the whole run."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # a worker's basetemp is <run's basetemp>/popen-gwN
    folder = root / f"once-{name}"
    with FileLock(str(root / f"once-{name}.lock")):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder
