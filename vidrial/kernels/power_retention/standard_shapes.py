"""The standard problem set: shapes A and B of docs/BENCHMARKS.md and the decode shapes, at every head
dim / degree the product supports. Shipped configs must cover the keys these problems dispatch
(`vidrial show` reports it; `vidrial tune --preset shapes` tunes exactly them).

Each family derives its keys by calling its own `problem_key` (the function its launcher calls) on
meta tensors of these shapes, so a change to a bucketing rule can never leave the tuned keys behind
the dispatched ones (tests/test_standard_shapes_cpu.py checks the derivation against the launchers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

# (name, batch, time, heads); chunk 1024, bf16, gating on (docs/BENCHMARKS.md)
TRAINING_SHAPES: tuple[tuple[str, int, int, int], ...] = (("A", 1, 65536, 8), ("B", 8, 8192, 8))
CHUNK_SIZE = 1024
# p = 4 only at d = 32: at d = 64 one fp32 chunk state is already 254 MB (D = 992256), 130 GB at shape A
HEAD_DIM_DEGREES: tuple[tuple[int, int], ...] = ((32, 2), (64, 2), (128, 2), (32, 4))
# one new token against a state, h = 8 KV heads (no GQA), gated; both state precisions the API takes
DECODE_BATCHES: tuple[int, ...] = (1, 8, 64)
DECODE_HEADS = 8
DECODE_STATE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


@dataclass(frozen=True)
class _Layout:
    d: int
    deg: int
    d_tile: int

    @property
    def feature_dim(self) -> int:
        from vidrial.kernels.power_retention.sympow import feature_dim

        return feature_dim(self.d, self.deg, self.d_tile)


@dataclass(frozen=True)
class TrainingProblem(_Layout):
    shape: str
    b: int
    t: int
    h: int
    chunk_size: int = CHUNK_SIZE

    @property
    def chunks(self) -> int:
        return self.t // self.chunk_size


@dataclass(frozen=True)
class DecodeProblem(_Layout):
    b: int
    h: int
    state_dtype: str


def training_problems() -> Iterator[TrainingProblem]:
    from vidrial.kernels.power_retention.sympow import default_d_tile

    for d, p in HEAD_DIM_DEGREES:
        for name, b, t, h in TRAINING_SHAPES:
            yield TrainingProblem(d=d, deg=p, d_tile=default_d_tile(d, p), shape=name, b=b, t=t, h=h)


def decode_problems() -> Iterator[DecodeProblem]:
    from vidrial.kernels.power_retention.sympow import default_d_tile

    for d, p in HEAD_DIM_DEGREES:
        for sd in DECODE_STATE_DTYPES:
            for b in DECODE_BATCHES:
                yield DecodeProblem(d=d, deg=p, d_tile=default_d_tile(d, p), b=b, h=DECODE_HEADS, state_dtype=sd)


def meta(*shape: int, dtype: str = "bfloat16") -> Any:
    """A tensor without storage: what the problem_key functions read (shape and dtype) and nothing else."""
    import torch

    return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")


def unique(keys: Iterator[Any] | list[Any]) -> list[Any]:
    """Keys in first-seen order without repeats (shapes A and B share some keys)."""
    return list(dict.fromkeys(keys))


__all__ = ["TRAINING_SHAPES", "CHUNK_SIZE", "HEAD_DIM_DEGREES", "DECODE_BATCHES", "DECODE_HEADS",
           "DECODE_STATE_DTYPES", "TrainingProblem", "DecodeProblem", "training_problems", "decode_problems",
           "meta", "unique"]
