"""Helpers for the tuner protocol of kernel families (make_inputs; docs/TUNING.md "What the tuner times").

The tuner stores a winner under the key it tuned and the dispatcher serves that winner to every call
whose runtime sizes fall in the key's power-of-two buckets. So make_inputs builds a problem of exactly
that key (sizes at the top of each bucket, where the bucket's real problems are), within a memory cap.
"""
from __future__ import annotations

from typing import Any

from vidrial.core.errors import InputError

# Bytes of random inputs make_inputs may allocate for one key. Outputs and the op's workspace come on
# top: they are what the dispatched op itself allocates at that key.
INPUT_BYTES_CAP = 4 << 30


def size_in_bucket(bucket: int, unit_bytes: float, *, field: str, cap: int = INPUT_BYTES_CAP) -> int:
    """The largest n of the power-of-two bucket `bucket` (bucket/2 < n <= bucket, so n maps back to
    `bucket`) whose inputs, n * unit_bytes, fit in `cap`: the bucket value itself unless that is over
    the cap. Raises InputError naming the key field `field` when even the bucket's smallest size is."""
    n = min(bucket, int(cap // max(unit_bytes, 1)))
    if n <= bucket // 2:
        need = (bucket // 2 + 1) * unit_bytes / 2**30
        raise InputError(field, bucket, f"a bucket whose smallest problem fits the tuner's input cap of "
                                        f"{cap / 2**30:.1f} GiB (this one needs {need:.1f} GiB); tune a smaller "
                                        "bucket (the dispatcher serves larger sizes from the nearest tuned key)")
    return n


def generator(device: Any, seed: int) -> Any:
    """A seeded torch.Generator that torch.randn(..., device=device, generator=g) accepts: the CUDA
    device's own (inputs are drawn where they live, not on the host), else a CPU one. 'meta' tensors
    take it too and hold no values, so make_inputs(key, "meta", seed) gives the shapes for free."""
    import torch

    dev = torch.device(device)
    return torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(seed)


__all__ = ["INPUT_BYTES_CAP", "size_in_bucket", "generator"]
