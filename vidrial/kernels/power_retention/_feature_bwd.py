"""Python side of templates/common/feature_bwd.cuh (tensor-core backward through the feature map):
its shared-memory geometry, the layouts it supports, and the config shared by the kernels built on it
(query_state_bwd's rows pass, update_state_bwd), which size their shared memory from these.

Both families have two implementations, the config's `impl`: "mma_sync" (feature_bwd.cuh, any sm_80+
GPU, 32 rows per warp) and "wgmma" (Hopper, sm_90a, p = 2, d_tile = 8, head_dim = 64: the first GEMM on
warpgroup MMA with its accumulators handed to the chain rule in registers, common/wgmma_chain.cuh; 64
rows per warpgroup, one 64-feature sympow block per cp.async stage). The rules and the routing of the
wgmma variant (arch, layout, template, target) live here, once for both."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from vidrial.core.arch import is_hopper, normalize_arch
from vidrial.core.config import KernelConfig
from vidrial.core.errors import ConfigError
from vidrial.core.tensors import C_TYPES

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


def check_layout(head_dim: int, d_tile: int) -> None:
    """Raises ConfigError(head_dim / d_tile, ...) unless feature_bwd.cuh supports this layout."""
    if head_dim % 32 or head_dim > MAX_HEAD_DIM:
        raise ConfigError("head_dim", head_dim, f"head_dim a multiple of 32 up to {MAX_HEAD_DIM} (the warp's dY/V "
                                                f"fragments stay in registers); got head_dim={head_dim}")
    if d_tile & (d_tile - 1):
        raise ConfigError("d_tile", d_tile, f"d_tile a power of two (whole sympow chunks per {SUB}-feature step); "
                                            f"got d_tile={d_tile}")


WARPS = (2, 4, 8)
TILE_F = (64, 128)
WGMMA_STAGES = (3, 4, 5, 6)


def chain_chunk(head_dim: int, deg: int, d_tile: int) -> int:
    """vfb::Chain<T, P>::CHUNK: features per chain chunk (T^M, M the most low digits with T^M <= SUB)."""
    m, c = 0, 1
    while m < deg and c * d_tile <= SUB:
        c *= d_tile
        m += 1
    return c


class FeatureBwdConfig(KernelConfig):
    """Tiles of the bf16 tensor-core kernels on common/feature_bwd.cuh: a CTA holds 32 rows per warp and
    streams the state through shared memory in cp.async stages of tile_f features."""

    tile_f: int = Field(64, description="state features per cp.async stage (whole 64-feature GEMM steps)")
    warps: int = Field(4, description="warps per CTA, 32 rows each (wgmma: 64 rows per warpgroup)")
    stages: int = Field(2, description="cp.async buffers of the state feature tile")
    impl: Literal["mma_sync", "wgmma"] = Field("mma_sync", description="mma_sync (sm_80+) or wgmma (Hopper, sm_90a)")

    @property
    def rows(self) -> int:
        return 16 * self.warps if self.impl == "wgmma" else WROWS * self.warps

    @model_validator(mode="after")
    def _valid(self):
        self.check_fields()
        return self

    def check_fields(self) -> None:
        """The per-field rules (also run by the families' check(): model_copy skips validators)."""
        if self.impl == "wgmma":
            if self.warps not in (4, 8):
                raise ConfigError("warps", self.warps, "4 or 8 with impl='wgmma' (whole warpgroups, 64 rows each)")
            if self.tile_f != 64:
                raise ConfigError("tile_f", self.tile_f, "64 with impl='wgmma' (one sympow block per stage)")
            if self.stages not in WGMMA_STAGES:
                raise ConfigError("stages", self.stages, f"one of {WGMMA_STAGES} with impl='wgmma' (two stages are "
                                                         "read while the next loads)")
            return
        if self.warps not in WARPS:
            raise ConfigError("warps", self.warps, f"one of {WARPS} (32 rows per warp)")
        if self.tile_f not in TILE_F:
            raise ConfigError("tile_f", self.tile_f, f"one of {TILE_F} (features per cp.async stage, whole "
                                                     f"{SUB}-feature GEMM steps)")
        if not 2 <= self.stages <= 4:
            raise ConfigError("stages", self.stages, "between 2 and 4")


def wgmma_applies(key: Any) -> bool:
    """The layouts the wgmma kernels take."""
    return key.deg == 2 and key.d_tile == 8 and key.head_dim == 64


class FeatureBwdFamily:
    """What the two families on feature_bwd.cuh share (mixed in before KernelFamily): rendering, threads,
    shared memory from `smem_bytes(head_dim, config)`, the layout check `check_key(key)`, the routing of
    the two implementations (`templates`: impl -> template), and the standard keys (bf16 and fp16 of the
    training shapes)."""

    templates: dict[str, str]  # impl -> template

    def smem_bytes(self, head_dim: int, config: FeatureBwdConfig) -> int:
        raise NotImplementedError

    def check_key(self, key: Any) -> None:
        check_layout(key.head_dim, key.d_tile)

    def template_for(self, config: FeatureBwdConfig) -> str:
        return self.templates[config.impl]

    def implementation_templates(self) -> tuple[str, ...]:
        return tuple(self.templates.values())

    def target_arch(self, config: FeatureBwdConfig, arch: str) -> str:
        return "sm_90a" if config.impl == "wgmma" else arch

    def wgmma_config(self, key: Any) -> FeatureBwdConfig:
        """One warpgroup (64 rows), four stages: the best measured tiles at shape A (two CTAs per SM: the
        kernels use ~200 registers per thread)."""
        return self.Config(impl="wgmma", warps=4, tile_f=64, stages=4)

    def wgmma_corners(self, key: Any) -> list[FeatureBwdConfig]:
        """The smallest and largest wgmma tiles, where the kernel applies."""
        if not wgmma_applies(key):
            return []
        return [self.Config(impl="wgmma", warps=4, stages=3), self.Config(impl="wgmma", warps=8, stages=6)]

    def render_context(self, key: Any, config: FeatureBwdConfig) -> dict[str, Any]:
        from vidrial.kernels.power_retention.sympow import layout

        return dict(head_dim=key.head_dim, deg=key.deg, d_tile=key.d_tile,
                    n_blocks=layout(key.head_dim, key.deg, key.d_tile).n_blocks, warps=config.warps,
                    tile_f=config.tile_f, stages=config.stages, in_type=C_TYPES[key.dtype],
                    smem_bytes=self.smem_bytes(key.head_dim, config), key_label=key.label(),
                    config_label=config.label(), wgmma_ns=(64,))

    def threads_per_block(self, config: FeatureBwdConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: Any, config: FeatureBwdConfig) -> int:
        return self.smem_bytes(key.head_dim, config)

    def check(self, key: Any, config: FeatureBwdConfig, arch: str) -> None:
        config.check_fields()  # again: model_copy(update=...) skips the validators
        if config.impl == "wgmma":
            if not is_hopper(arch):
                raise ConfigError("impl", config.impl, f"needs a Hopper GPU (sm_90 / sm_90a); use impl='mma_sync' "
                                                       f"on {normalize_arch(arch)}")
            if not wgmma_applies(key):
                raise ConfigError("impl", config.impl, f"takes deg=2, d_tile=8, head_dim=64, not deg={key.deg}, "
                                                       f"d_tile={key.d_tile}, head_dim={key.head_dim}; use "
                                                       "impl='mma_sync'")
        self.check_key(key)
        super().check(key, config, arch)

    def shape_keys(self, dtype: str = "bfloat16") -> list[Any]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        # signature_input: the family's tensor its problem_key reads the sizes off
        return unique(self.problem_key({self.signature_input: meta(p.b, p.t, p.h, p.d, dtype=dtype), "deg": p.deg,
                                        "d_tile": p.d_tile}) for p in training_problems())

    def standard_keys(self) -> list[Any]:
        return self.shape_keys() + self.shape_keys("float16")


def wgmma_smem_bytes(head_dim: int, config: FeatureBwdConfig, row_scalars: int) -> int:
    """Dynamic shared memory of the wgmma kernels (their static_asserts check it): per stage a 64-feature
    state block (bf16, 128-byte rows) and its 64 fp32 values | x rows (16-bit, stride d+8) | dx rows (fp32,
    stride d+8) | `row_scalars` fp32 per row | slack to align the swizzled tiles to 1024 bytes."""
    rows = config.rows
    return (config.stages * 64 * (2 * head_dim + 4) + rows * (head_dim + 8) * 2 + rows * (head_dim + 8) * 4
            + rows * row_scalars * 4 + 1024)
