"""Shared pieces of the backward kernel families (update_state_bwd, query_state_bwd, discumsum_bwd,
intra_chunk_attention_bwd): the row-loop geometry of templates/common/bwd_prims.cuh, arch lookup."""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import Field, model_validator

from vidrial.core.config import KernelConfig
from vidrial.core.errors import ConfigError

ROWS = 32
IN_DTYPES = ("bfloat16", "float16")


# Default of RowLoopConfig.mma in the families' default_config (tensor cores for the two GEMMs of
# update_state_bwd and the query_state_bwd rows pass). CPU-verified (tests/bwd_host_emu.py emulates
# mma.sync m16n8k8 tf32 from its documented fragment layout); GPU-verified on the H200 2026-11-28
# (tests/gpu/test_backward_gpu.py runs both paths: 43 passed).
MMA_DEFAULT = True


class RowLoopConfig(KernelConfig):
    """Tiles of the feature-map backward loops (common/bwd_prims.cuh RowLoop)."""

    tile_f: int = Field(64, description="features per shared-memory tile (rounded to whole sympow blocks)")
    warps: int = Field(8, description="warps per CTA")
    rows_per_lane: int = Field(2, description="rows per lane: a CTA owns 32 * rows_per_lane rows")
    mma: bool = Field(False, description="the two GEMMs of the row loop on tensor cores (mma.sync tf32)")

    @property
    def rows(self) -> int:
        return ROWS * self.rows_per_lane

    @model_validator(mode="after")
    def _valid(self):
        self.check_fields()
        return self

    def check_fields(self) -> None:
        """The per-field rules (families with another kernel variant override them); raises ConfigError."""
        if self.rows_per_lane not in (1, 2):
            raise ConfigError("rows_per_lane", self.rows_per_lane, "1 or 2")
        if self.tile_f not in (16, 32, 64, 128, 256):
            raise ConfigError("tile_f", self.tile_f, "one of 16, 32, 64, 128, 256")
        if self.warps not in (4, 8):
            raise ConfigError("warps", self.warps, "4 or 8")


def blocks_per_tile(block_size: int, tile_f: int) -> int:
    return max(1, tile_f // block_size)


def row_loop_geometry(head_dim: int, deg: int, d_tile: int, cfg: RowLoopConfig) -> dict[str, int]:
    from vidrial.kernels.power_retention.sympow import layout

    lay = layout(head_dim, deg, d_tile)
    bpt = blocks_per_tile(lay.block_size, cfg.tile_f)
    F = bpt * lay.block_size
    return dict(n_blocks=lay.n_blocks, block_size=lay.block_size, blocks_per_tile=bpt, F=F,
                fpw=F // cfg.warps, cpw=head_dim // cfg.warps, D=lay.feature_dim,
                ftiles=-(-lay.n_blocks // bpt))


def row_loop_smem_floats(head_dim: int, F: int, warps: int, rows: int = ROWS) -> int:
    """common/bwd_prims.cuh RowLoop::SMEM_FLOATS (rows = 32 * rows_per_lane)."""
    off_u = -(-(F * (head_dim + 4) + F + rows * (head_dim + 1)) // 4) * 4
    return off_u + rows * (head_dim + 4) + rows + 2 * F * (rows + 4) + warps * rows


def check_row_loop(head_dim: int, deg: int, d_tile: int, cfg: RowLoopConfig, max_fpw: int = 32) -> dict[str, int]:
    geo = row_loop_geometry(head_dim, deg, d_tile, cfg)
    if head_dim % (4 * cfg.warps):
        raise ConfigError("warps", cfg.warps, f"4 * warps must divide head_dim={head_dim}")
    if geo["F"] % cfg.warps:
        raise ConfigError("tile_f", cfg.tile_f, f"the tile of {geo['F']} features must be a multiple of warps={cfg.warps}")
    if geo["fpw"] > max_fpw:
        raise ConfigError("tile_f", cfg.tile_f, f"{geo['fpw']} features per warp exceed {max_fpw} (registers); "
                                                "use more warps or a smaller tile_f")
    if cfg.mma:
        rows, F, w = cfg.rows, geo["F"], cfg.warps
        if F % 8 or (rows // 16) * (F // 8) % w or (rows // 16) * (head_dim // 8) % w or rows > F:
            raise ConfigError("mma", True, f"tensor-core tiling needs 16x8 tiles divided evenly over the warps and "
                                           f"rows <= features per tile (rows={rows}, tile={F}, warps={w})")
    if head_dim // 8 > 255:
        raise ConfigError("head_dim", head_dim, "at most 255 sympow tiles")
    return geo


_ARCH: dict[int, str] = {}


C = TypeVar("C", bound=RowLoopConfig)


def default_row_loop(config_cls: type[C], head_dim: int, deg: int, d_tile: int) -> C:
    """The row-loop families' default: a feature tile of one to four sympow blocks, 8 warps, and the
    tensor cores (MMA_DEFAULT) where the tiling allows them."""
    from vidrial.core.errors import ConfigError
    from vidrial.kernels.power_retention.sympow import layout

    bs = layout(head_dim, deg, d_tile).block_size
    cfg = config_cls(tile_f=max(64, min(bs, 256)), warps=8, rows_per_lane=2 if bs <= 64 else 1)
    if MMA_DEFAULT:
        mma = cfg.model_copy(update={"mma": True})
        try:
            check_row_loop(head_dim, deg, d_tile, mma)
            return mma
        except ConfigError:
            pass
    return cfg


def row_loop_context(key: Any, config: RowLoopConfig) -> dict[str, Any]:
    """Template variables shared by the row-loop templates (key: head_dim, deg, d_tile, dtype)."""
    from vidrial.kernels.power_retention._fwd_util import DTYPE_NAMES

    geo = row_loop_geometry(key.head_dim, key.deg, key.d_tile, config)
    return dict(head_dim=key.head_dim, deg=key.deg, d_tile=key.d_tile, n_blocks=geo["n_blocks"],
                blocks_per_tile=geo["blocks_per_tile"], warps=config.warps, rows_per_lane=config.rows_per_lane,
                min_ctas=1 if config.rows_per_lane == 2 else 2,  # registers: 255 (no spills) / 128
                mma=config.mma, in_type=DTYPE_NAMES[key.dtype], key_label=key.label(), config_label=config.label())


def device_arch(device) -> str:
    from vidrial.core.arch import device_arch as _device_arch

    idx = device.index if device.index is not None else 0
    a = _ARCH.get(idx)
    if a is None:
        a = _ARCH[idx] = _device_arch(idx)
    return a


def ptr(x: Any) -> int:
    return 0 if x is None else x.data_ptr()


# Tests set this to run the kernels on the CPU (tests/bwd_host_emu.py): a callable
# (family, key, config) -> object with .launch(grid, block, args, device_index, stream), used for
# CPU tensors only. The GPU path never looks at it beyond this None check.
HOST_LAUNCHER = None


def launchable(family, key, config, device):
    """family.launchable(key, config, arch of device), or the host launcher for CPU tensors (tests)."""
    if device.type == "cpu" and HOST_LAUNCHER is not None:
        return HOST_LAUNCHER(family, key, config)
    return family.launchable(key, config, device_arch(device))


def stream_of(device) -> int:
    if device.type == "cpu":
        return 0
    from vidrial.core.launch import current_stream_handle

    return current_stream_handle(device.index)


def pick(family, key, device):
    """The dispatcher's config on a GPU; the default config for CPU tensors (host emulation in tests)."""
    if device.type == "cpu":
        return family.default_config(key)
    from vidrial.kernels.power_retention._fwd_util import pick_config

    return pick_config(family, key)


class SliceCheck:
    """check_outputs and tolerance of the backward families' tuner protocol: the outputs' leading block
    (the slice reference() computes, bwd_tuning.py) against reference(), 2-norm relative error."""

    def check_outputs(self, key: Any, inputs: dict[str, Any], outputs: Any, expected: Any) -> float:
        from vidrial.kernels.power_retention.bwd_tuning import slice_error

        return slice_error(outputs, expected)

    def tolerance(self, key: Any) -> float:
        from vidrial.kernels.power_retention.bwd_tuning import TOLERANCE

        return TOLERANCE
