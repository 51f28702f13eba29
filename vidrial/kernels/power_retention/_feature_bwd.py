"""Python side of templates/common/feature_bwd.cuh (tensor-core backward through the feature map):
its shared-memory geometry, the layouts it supports, and the config rules shared by the kernels built
on it (query_state_bwd impl="mma16", update_state_bwd impl="mma16"), which size their shared memory
from these."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from vidrial.core.errors import ConfigError
from vidrial.kernels.power_retention._bwd_util import RowLoopConfig, default_row_loop

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


MMA16_WARPS = (2, 4, 8)
MMA16_TILE_F = (64, 128)


def chain_chunk(head_dim: int, deg: int, d_tile: int) -> int:
    """vfb::Chain<T, P>::CHUNK: features per chain chunk (T^M, M the most low digits with T^M <= SUB)."""
    m, c = 0, 1
    while m < deg and c * d_tile <= SUB:
        c *= d_tile
        m += 1
    return c


class Mma16Config(RowLoopConfig):
    """RowLoopConfig plus the choice of implementation: the row loop (common/bwd_prims.cuh) or the bf16
    tensor-core kernel on common/feature_bwd.cuh (`impl="mma16"`: 32 rows per warp, cp.async stages of
    tile_f state features). The row loop's fields keep their rules; with "mma16" rows_per_lane and mma
    are unused and must keep their defaults."""

    impl: Literal["rowloop", "mma16"] = Field(
        "rowloop", description="'rowloop' (common/bwd_prims.cuh RowLoop, fp32/tf32 GEMMs) or 'mma16' (bf16 "
                               "tensor cores + per-row chain rule, common/feature_bwd.cuh)")
    stages: int = Field(2, description="impl='mma16': cp.async buffers of the state feature tile")

    @property
    def rows(self) -> int:
        return WROWS * self.warps if self.impl == "mma16" else super().rows

    def check_fields(self) -> None:
        if self.impl == "rowloop":
            super().check_fields()
            if self.stages != 2:
                raise ConfigError("stages", self.stages, "2 with impl='rowloop' (only 'mma16' pipelines the state)")
            return
        if self.warps not in MMA16_WARPS:
            raise ConfigError("warps", self.warps, f"one of {MMA16_WARPS} with impl='mma16' (32 rows per warp)")
        if self.tile_f not in MMA16_TILE_F:
            raise ConfigError("tile_f", self.tile_f, f"one of {MMA16_TILE_F} with impl='mma16' (features per "
                                                     f"cp.async stage, whole {SUB}-feature GEMM steps)")
        if not 2 <= self.stages <= 4:
            raise ConfigError("stages", self.stages, "between 2 and 4")
        if self.rows_per_lane != 2:
            raise ConfigError("rows_per_lane", self.rows_per_lane,
                              "2 (the default) with impl='mma16': unused, a CTA holds 32 * warps rows")
        if self.mma:
            raise ConfigError("mma", True, "False with impl='mma16': it is the row loop's tf32 switch; 'mma16' "
                                           "always runs bf16 tensor cores")


def default_for(family, key, impl: str, mma16: Mma16Config) -> Mma16Config:
    """A family's default: `mma16` when `impl` (its module's switch, read per call) is "mma16" and
    family.check accepts it on sm_80; else the row loop's default (family.Config)."""
    if impl == "mma16":
        try:
            family.check(key, mma16, "sm_80")
            return mma16
        except ConfigError:
            pass
    return default_row_loop(family.Config, key.head_dim, key.deg, key.d_tile)
