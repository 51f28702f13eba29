"""Tuned configs at call time: the store (`vidrial.dispatch.store`: the JSON files the tuner writes)
and the dispatcher (`vidrial.dispatch.select`: exact -> nearest -> default). Kernels call
`select_config(family, key, gpu)` from here; nothing here imports the tuner (vidrial.tuning), so a
kernel call never loads Optuna."""
from __future__ import annotations

from vidrial.dispatch import store
from vidrial.dispatch.select import (
    Candidate,
    Dispatch,
    FileReport,
    Index,
    Origin,
    Source,
    StaleEntry,
    build_index,
    current_gpu,
    distance,
    get_index,
    last_dispatch,
    last_dispatch_file,
    reload,
    resolve,
    select_config,
    tuned_entry,
)
from vidrial.dispatch.store import SCHEMA_VERSION, GpuIdentity, TunedConfigWarning, TunedEntry

__all__ = ["select_config", "current_gpu", "reload", "last_dispatch", "last_dispatch_file", "build_index", "get_index",
           "resolve", "tuned_entry", "distance", "Dispatch", "Candidate", "Index", "FileReport", "StaleEntry", "Source",
           "Origin", "store", "SCHEMA_VERSION", "GpuIdentity", "TunedConfigWarning", "TunedEntry"]
