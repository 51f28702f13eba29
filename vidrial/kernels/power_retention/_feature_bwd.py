"""Python side of templates/common/feature_bwd.cuh (tensor-core backward through the feature map):
its shared-memory geometry and the layouts it supports. Kernels built on it (query_state_bwd
impl="mma16"; next, update_state_bwd's dK) size their shared memory from these."""
from __future__ import annotations

from vidrial.core.errors import ConfigError

SUB = 64  # features per warp GEMM step (vfb::SUB)
WROWS = 32  # rows per warp (vfb::WROWS)
PS = SUB + 8  # scratch row stride in floats (vfb::PS)
MAX_HEAD_DIM = 128  # the warp's A fragments (2 x head_dim/16 x 4 registers) stay in registers


def padded_row(head_dim: int) -> int:
    """16-bit elements per padded shared-memory row (vfb::Geometry::LD)."""
    return head_dim + 8


def scratch_floats(head_dim: int) -> int:
    """Per-warp scratch: the U staging (bf16 [32][LD]) and then dphi' ([32][PS] fp32)."""
    return max(WROWS * PS, WROWS * padded_row(head_dim) // 2)


def state_tile_floats(head_dim: int, tile_f: int, stages: int) -> int:
    """vfb::StateTile::FLOATS: `stages` buffers of tile_f bf16 state rows and tile_f fp32 values."""
    return stages * (tile_f * padded_row(head_dim) // 2 + tile_f)


def check_layout(head_dim: int, d_tile: int, field: str, value: object) -> None:
    """Raises ConfigError(field, value, rule) unless feature_bwd.cuh supports this layout."""
    if head_dim % 32 or head_dim > MAX_HEAD_DIM:
        raise ConfigError(field, value, f"head_dim a multiple of 32 up to {MAX_HEAD_DIM} (the warp's dY/V fragments "
                                        f"stay in registers); got head_dim={head_dim}")
    if d_tile & (d_tile - 1):
        raise ConfigError(field, value, f"d_tile a power of two (whole sympow chunks per {SUB}-feature step); "
                                        f"got d_tile={d_tile}")
