"""Tuned configs at call time: the store (`vidrial.dispatch.store`: the JSON files the tuner writes)
and the dispatcher (`vidrial.dispatch.select`: exact -> nearest -> default). Kernels call
`select_config(family, key, gpu)` from here; nothing here imports the tuner (vidrial.tuning), so a
kernel call never loads Optuna."""
from __future__ import annotations

from vidrial.dispatch import record, store
from vidrial.dispatch.select import (
    Candidate,
    Dispatch,
    FileReport,
    Index,
    Origin,
    Source,
    StaleEntry,
    UntunedGpuWarning,
    borrowed_index,
    build_index,
    current_gpu,
    distance,
    get_index,
    last_dispatch,
    last_dispatch_file,
    nearest_same_arch,
    reload,
    resolve,
    select_config,
    tuned_entry,
)
from vidrial.dispatch.store import SCHEMA_VERSION, GpuIdentity, TunedConfigWarning, TunedEntry

__all__ = ["select_config", "current_gpu", "reload", "last_dispatch", "last_dispatch_file", "build_index", "get_index",
           "resolve", "tuned_entry", "distance", "Dispatch", "Candidate", "Index", "FileReport", "StaleEntry", "Source",
           "Origin", "store", "UntunedGpuWarning", "borrowed_index", "nearest_same_arch", "record", "SCHEMA_VERSION", "GpuIdentity", "TunedConfigWarning", "TunedEntry"]
