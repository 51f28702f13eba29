"""The autotuner (vidrial.tuning.tuner) and what it writes. `vidrial.tuning.record` (recording the keys a
program dispatches, vidrial/dispatch/record.py) is re-exported here without loading the tuner or Optuna."""
from __future__ import annotations

from vidrial.dispatch.record import record

__all__ = ["record"]
