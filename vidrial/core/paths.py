"""Where vidrial finds its data folders and keeps its caches.

An installed wheel carries templates/, search_spaces/ and tuned_configs/ as
vidrial/_data/<folder>; a source checkout uses the folders at the repo root.
"""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from vidrial.core.errors import InputError

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_REPO_ROOT = _PACKAGE_DIR.parent


@cache
def data_dir(folder: str) -> Path:
    """The shipped folder `folder` (templates, search_spaces or tuned_configs)."""
    for candidate in (_PACKAGE_DIR / "_data" / folder, _REPO_ROOT / folder):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"vidrial data folder {folder!r} not found in {_PACKAGE_DIR / '_data'} or {_REPO_ROOT}; "
        "the installation is incomplete (reinstall vidrial)"
    )


def user_cache_dir() -> Path:
    """Root of vidrial's per-user cache: $VIDRIAL_CACHE_DIR, else $XDG_CACHE_HOME/vidrial."""
    override = os.environ.get("VIDRIAL_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vidrial"


def user_tuned_dir() -> Path:
    """User tuned configs, which override the shipped ones: $VIDRIAL_TUNED_DIR or <cache>/tuned_configs."""
    override = os.environ.get("VIDRIAL_TUNED_DIR")
    return Path(override).expanduser() if override else user_cache_dir() / "tuned_configs"


def check_folder_argument(argument: str, path: str | Path) -> Path:
    """`path` as a folder to write into: InputError naming `argument` unless it is a folder or could be
    created as one. Creates nothing, so a run that fails later leaves no empty folder behind."""
    p = Path(path).expanduser()
    for existing in (p, *p.parents):
        if existing.exists():
            if existing.is_dir():
                return p
            why = "a file" if existing == p else f"{existing} is a file"
            raise InputError(argument, f"{path} ({why})", "a folder, or a path where one can be created")
    return p
