"""Fused update_state (docs/MATH.md section 3 step 1): per-chunk states S [b,n,h,D,d] and s [b,n,h,D].

    S[:, nu] = sum_tau phi(k~_tau) v_tau^T,   s[:, nu] = sum_tau phi(k~_tau),
    k~ = k * exp((g[nu, c-1] - g[nu, tau]) / p),  g = cumsum of log_G inside the chunk.

One kernel per (head_dim, deg, d_tile, dtype, chunk_size, gating) and tile config; batch, heads and
the number of chunks are runtime arguments. phi(k~) is formed in registers and fed to the tensor
cores; it never reaches global memory. Two implementations, the config's `impl`:
- "mma_sync" (templates/update_state.cu.j2): warp-level mma.sync, sm_80 and newer;
- "wgmma" (templates/update_state_wgmma.cu.j2): Hopper warpgroup MMA with phi as the register A
  operand and V read by the tensor cores from swizzled shared memory; compiled for sm_90a, runs on
  sm_90 GPUs only (head_dim 64 or 128). Correct, in the search space, not the default: see
  UpdateStateFamily's note on default_config_for.
"""
from __future__ import annotations

import math
from functools import cache
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from vidrial.core.arch import arch_limits, normalize_arch
from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.rules import Between, MultipleOf, OneOf, PowerOfTwo, Rule
from vidrial.core.tensors import HEAD_DIMS, IN_DTYPES, InDType, check_aligned_rows, check_tensor, dtype_name, \
    pow2_bucket, ptr
from vidrial.kernels import register
from vidrial.kernels.power_retention.sympow import SUPPORTED_DEGREES, block_table, default_d_tile, layout

TILE_KS = (16, 32, 64, 128)
IMPLS = ("mma_sync", "wgmma")
WGMMA_HEAD_DIMS = (64, 128)  # 128-byte swizzled V rows (one or two 64-column groups)
_TEMPLATES = {"mma_sync": "update_state.cu.j2", "wgmma": "update_state_wgmma.cu.j2"}
WARP_CHOICES = (1, 2, 4, 8)
# Registers per thread we allow for accumulators + A fragments + feature offsets (the rest of the
# 255 goes to B fragments, addresses and temporaries); above it ptxas spills.
REGISTER_BUDGET = 200


class UpdateStateConfig(KernelConfig):
    """Tiles of the fused update_state kernel.

    impl: the implementation, "mma_sync" (any sm_80+ GPU) or "wgmma" (Hopper, sm_90a); tile_m: features
    per CTA (multiple of 16 * warps: whole 16-row MMA tiles per warp; for wgmma whole 64-row tiles per
    warpgroup of 4 warps); tile_k: time steps per pipeline stage; warps: warps per CTA (they split
    tile_m); stages: cp.async pipeline depth (K and V tiles); min_ctas: __launch_bounds__ minimum
    CTAs per SM (steers ptxas' register allocation)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "tile_m": MultipleOf(16, 16, 1024, why="MMA rows are 16"),
        "tile_k": OneOf(TILE_KS, "16-step MMA reduction, 32-step panels"), "warps": OneOf(WARP_CHOICES),
        "stages": Between(2, 6, "cp.async pipeline depth"), "min_ctas": Between(1, 4),
    }

    impl: Literal["mma_sync", "wgmma"] = "mma_sync"
    tile_m: int = 128
    tile_k: int = 64
    warps: int = 4
    stages: int = 3
    min_ctas: int = 1

    @model_validator(mode="after")
    def _split(self) -> "UpdateStateConfig":
        if self.impl == "wgmma" and self.warps % 4:
            raise ConfigError("warps", self.warps, "a multiple of 4 with impl='wgmma' (whole warpgroups)")
        if self.tile_m % (16 * self.warps):
            raise ConfigError("tile_m", self.tile_m,
                              f"a multiple of 16 * warps = {16 * self.warps} (each warp owns whole 16-row MMA tiles)")
        return self

    @property
    def warp_m(self) -> int:
        return self.tile_m // self.warps


class UpdateStateKey(ProblemKey):
    """Compile-time layout and shape constants, plus a bucket of the runtime work size."""

    RULES: ClassVar[dict[str, Rule]] = {
        "head_dim": OneOf(HEAD_DIMS), "deg": OneOf(SUPPORTED_DEGREES), "chunk_size": MultipleOf(16),
        "bh_chunks_bucket": PowerOfTwo(),
    }

    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "d_tile", "dtype", "chunk_size", "gating")

    head_dim: int
    deg: int = 2
    d_tile: int = 8
    dtype: InDType = "bfloat16"
    chunk_size: int = 1024
    gating: bool = True
    bh_chunks_bucket: int = 512  # power of two >= b * h * n_chunks

    @model_validator(mode="after")
    def _layout(self) -> "UpdateStateKey":
        if self.head_dim % self.d_tile or self.d_tile < 1:
            divisors = [t for t in range(1, self.head_dim + 1) if self.head_dim % t == 0]
            raise ConfigError("d_tile", self.d_tile, f"a divisor of head_dim={self.head_dim}: {divisors}")
        return self

    @property
    def feature_dim(self) -> int:
        return layout(self.head_dim, self.deg, self.d_tile).feature_dim


def _register_estimate(key: UpdateStateKey, config: UpdateStateConfig) -> int:
    mt = config.warp_m // 16  # 16-row tiles per warp (for wgmma: the warp's slices of its m64 tiles)
    accumulators = mt * (key.head_dim // 8 + 1) * 4
    a_fragments = mt * 8 if config.tile_k >= 32 else mt * 4
    if config.impl == "wgmma":
        a_fragments *= 2  # a panel's fragments are formed while the previous panel's wgmmas read theirs
    offsets = mt * 2 * key.deg
    return accumulators + a_fragments + offsets


def _is_hopper(arch: str) -> bool:
    return arch_limits(arch).capability == 90


class UpdateStateFamily(KernelFamily[UpdateStateKey, UpdateStateConfig]):
    name = "update_state"
    template = "update_state.cu.j2"
    Config = UpdateStateConfig
    Key = UpdateStateKey
    # K, V, log_G, block table, S, s, heads, n_chunks, K strides (b,t,h), V strides, log_G strides
    signature = ("ptr",) * 6 + ("i32", "i32") + ("i64",) * 9

    # ---- configs ---------------------------------------------------------------------------
    @staticmethod
    def _largest_tile_k(chunk: int, cap: int = 64) -> int:
        return max(t for t in TILE_KS if t <= cap and chunk % t == 0)

    def default_config(self, key: UpdateStateKey) -> UpdateStateConfig:
        d = key.head_dim
        # Larger warp tiles (warp_m) reuse each B fragment more and were faster on the H200 (bench
        # sweep: d=64, p=2, T=8: warp_m 64 -> 0.66 ms, warp_m 32 -> 0.93 ms at shape A), as long as
        # ptxas does not spill. warp_m=64 fits at d=64 when a warp's rows share their last factor
        # (rows in one feature block, T^p % 64 == 0, and T divides 16), else warp_m=32; d=128 only
        # fits warp_m=16.
        # Without shared factors (e.g. T=1) warp_m=64 runs at the register limit: faster on the H200
        # (T=1: 0.64-0.76 ms vs 0.85-0.91 ms) but it spills for some chunk sizes / archs, so the safe
        # default is warp_m=32 and the tuner may pick warp_m=64 where its compile facts are clean.
        block = key.d_tile**key.deg
        tile_k_cap, stages = 64, 3
        if d == 128:
            tile_m, warps = 128, 8
        elif d == 64 and key.deg == 2 and block % 64 == 0 and 16 % key.d_tile == 0:  # T = 8 or 16
            tile_m, warps = 256, 4
        elif d == 64:
            tile_m, warps = 128, 4
        else:
            tile_m, warps = 256, 4
        tile_k = self._largest_tile_k(key.chunk_size, tile_k_cap)
        cfg = UpdateStateConfig(tile_m=tile_m, tile_k=tile_k, warps=warps, stages=stages)
        if self.dynamic_smem_bytes(key, cfg) > arch_limits("sm_80").max_dynamic_smem_per_block:
            cfg = cfg.model_copy(update={"stages": 2})
        return cfg

    # No default_config_for override: on Hopper too the default is mma_sync. Measured on an H200
    # (2026-12-02, benchmarks/bench_impls.py, shape A/B, d=64, T=8): the tuned mma_sync config 0.561 ms,
    # the best wgmma config of 16 0.579 ms (tile_m=256, tile_k=128, warps=8, stages=4); Nsight Compute
    # on the wgmma kernel: shared-memory pipe (L1/TEX) 70% busy, issue slots 37%, 2 warps per
    # scheduler. The tuner may still pick wgmma per key (it is in the search space).

    def wgmma_config(self, key: UpdateStateKey) -> UpdateStateConfig:
        """The best measured wgmma tiles that fit `key` (largest tile_k dividing the chunk)."""
        tile_m, warps = (256, 8) if key.head_dim == 64 else (128, 8)
        limit = arch_limits("sm_90").max_dynamic_smem_per_block
        for cap in (128, 64, 32, 16):  # 4 stages of K and V: d = 128 fits tile_k <= 64
            cfg = UpdateStateConfig(impl="wgmma", tile_m=tile_m, tile_k=self._largest_tile_k(key.chunk_size, cap),
                                    warps=warps, stages=4)
            if self.dynamic_smem_bytes(key, cfg) <= limit:
                return cfg
        return cfg

    def corner_configs(self, key: UpdateStateKey) -> list[UpdateStateConfig]:
        """Smallest tiles, the largest tiles that pass check() on sm_80 (the tighter arch), and for
        head dims the wgmma kernel takes, its smallest and largest tiles (checked on sm_90a)."""
        return self._mma_sync_corners(key) + self._wgmma_corners(key)

    def _wgmma_corners(self, key: UpdateStateKey) -> list[UpdateStateConfig]:
        if key.head_dim not in WGMMA_HEAD_DIMS:
            return []
        small = UpdateStateConfig(impl="wgmma", tile_m=64, tile_k=16, warps=4, stages=4)
        out = [small]
        for tile_m, warps, tile_k, stages in ((256, 8, 128, 4), (256, 8, 64, 6), (256, 4, 64, 5), (128, 8, 64, 4)):
            if key.chunk_size % tile_k:
                continue
            cfg = UpdateStateConfig(impl="wgmma", tile_m=tile_m, tile_k=tile_k, warps=warps, stages=stages)
            try:
                self.check(key, cfg, "sm_90a")
            except ConfigError:
                continue
            out.append(cfg)
            break
        return out

    def _mma_sync_corners(self, key: UpdateStateKey) -> list[UpdateStateConfig]:
        small = UpdateStateConfig(tile_m=16, tile_k=16, warps=1, stages=2)
        large = None
        for warps in (8, 4):
            for tile_k in (128, 64, 32, 16):
                if key.chunk_size % tile_k:
                    continue
                for mt in (4, 3, 2, 1):
                    for stages in (4, 3, 2):
                        cfg = UpdateStateConfig(tile_m=16 * mt * warps, tile_k=tile_k, warps=warps, stages=stages)
                        try:
                            self.check(key, cfg, "sm_80")
                        except ConfigError:
                            continue
                        large = cfg
                        break
                    if large:
                        break
                if large:
                    break
            if large:
                break
        return [small] + ([large] if large is not None else [])

    def check(self, key: UpdateStateKey, config: UpdateStateConfig, arch: str) -> None:
        if config.impl == "wgmma":
            if not _is_hopper(arch):
                raise ConfigError("impl", config.impl, f"needs a Hopper GPU (sm_90 / sm_90a); use impl='mma_sync' "
                                                       f"on {normalize_arch(arch)}")
            if key.head_dim not in WGMMA_HEAD_DIMS:
                raise ConfigError("impl", config.impl, f"takes head_dim in {WGMMA_HEAD_DIMS}, not "
                                                       f"head_dim={key.head_dim}; use impl='mma_sync'")
            if config.stages < 4:
                raise ConfigError("stages", config.stages, "at least 4 with impl='wgmma' (the tensor cores read two "
                                                           "stages while two more load)")
        if key.chunk_size % config.tile_k:
            raise ConfigError("tile_k", config.tile_k, f"must divide chunk_size={key.chunk_size}")
        regs = _register_estimate(key, config)
        if regs > REGISTER_BUDGET:
            raise ConfigError("tile_m", config.tile_m,
                              f"warp_m={config.warp_m} needs ~{regs} registers per thread for accumulators "
                              f"(head_dim={key.head_dim}, deg={key.deg}); at most {REGISTER_BUDGET} fit "
                              "without spilling: lower tile_m or raise warps")
        super().check(key, config, arch)

    # ---- rendering and launch shape --------------------------------------------------------
    def template_for(self, config: UpdateStateConfig) -> str:
        return _TEMPLATES[config.impl]

    def implementation_templates(self) -> tuple[str, ...]:
        return tuple(_TEMPLATES.values())

    def target_arch(self, config: UpdateStateConfig, arch: str) -> str:
        return "sm_90a" if config.impl == "wgmma" else arch

    def threads_per_block(self, config: UpdateStateConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: UpdateStateKey, config: UpdateStateConfig) -> int:
        mat = config.tile_k * key.head_dim * 2
        kt_buffers = 2 if config.stages >= 3 else 1  # the transposed K tile, double-buffered with >= 3 stages
        size = config.stages * 2 * mat + kt_buffers * mat
        if key.gating:
            size += key.chunk_size * 4 + 32 * 4
        if config.impl == "wgmma":
            # the ones block of the s column (d = 64: a 9th swizzled column group of TILE_K rows) and
            # slack to align the swizzled tiles to 1024 bytes
            size += (config.tile_k * 128 if key.head_dim == 64 else 256) + 1024
        return size

    def render_context(self, key: UpdateStateKey, config: UpdateStateConfig) -> dict[str, Any]:
        return dict(
            head_dim=key.head_dim, deg=key.deg, d_tile=key.d_tile, feature_dim=key.feature_dim,
            chunk_size=key.chunk_size, gating=key.gating, dtype=_TEMPLATE_DTYPE[key.dtype],
            tile_m=config.tile_m, tile_k=config.tile_k, warps=config.warps, stages=config.stages,
            min_ctas=config.min_ctas, smem_bytes=self.dynamic_smem_bytes(key, config),
            # the wgmma N sizes: S's columns (+ the s column at d = 64), the m64n8 s column (d = 128)
            wgmma_ns=(72 if key.head_dim == 64 else key.head_dim, 8),
        )

    def shape_keys(self) -> list[UpdateStateKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        # gated: the forward; ungated: the backward's state pass (query_state_bwd runs this kernel on
        # inputs whose gates it has already applied)
        return unique(self.problem_key(dict(K=meta(p.b, p.t, p.h, p.d), log_G=gates, deg=p.deg, d_tile=p.d_tile,
                                            chunk_size=p.chunk_size))
                      for p in training_problems() for gates in (meta(p.b, p.t, p.h, dtype="float32"), None))

    def standard_keys(self) -> list[UpdateStateKey]:
        keys = self.shape_keys()
        for d in HEAD_DIMS:
            for dtype in IN_DTYPES:
                for chunk in (64, 1024):
                    for gating in (True, False):
                        keys.append(UpdateStateKey(head_dim=d, deg=2, d_tile=default_d_tile(d, 2), dtype=dtype,
                                                   chunk_size=chunk, gating=gating))
        for t in (1, 16):  # exact symmetric power and the coarse MMA-friendly layout, shape A/B settings
            keys.append(UpdateStateKey(head_dim=64, deg=2, d_tile=t, dtype="bfloat16", chunk_size=1024, gating=True))
        for dtype in IN_DTYPES:  # degree 4 at a moderate D (d=32, d_tile=4: D=84480)
            keys.append(UpdateStateKey(head_dim=32, deg=4, d_tile=4, dtype=dtype, chunk_size=256, gating=True))
        from vidrial.kernels.power_retention.standard_shapes import unique

        return unique(keys)

    # ---- launch path ---------------------------------------------------------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """K, V [b,t,h,d] bf16/fp16 (last dim contiguous, 16-byte rows), log_G [b,t,h] fp32 or None,
        deg, d_tile (None: the default), chunk_size dividing t (the caller pads)."""
        K, V, log_G, deg, d_tile, c = (x.get(k) for k in ("K", "V", "log_G", "deg", "d_tile", "chunk_size"))
        what = "[batch, time, heads, head_dim]"
        check_tensor("K", K, dtypes=IN_DTYPES, ndim=4, what=what)
        b, t, h, d = K.shape
        if d not in HEAD_DIMS:
            raise InputError("K", f"head_dim {d} (shape {tuple(K.shape)})", f"head_dim in {HEAD_DIMS}")
        check_tensor("V", V, dtypes=IN_DTYPES, ndim=4, what=what, like=("K", K))
        check_aligned_rows("K", K)
        check_aligned_rows("V", V)
        if deg not in SUPPORTED_DEGREES:
            raise InputError("deg", deg, f"one of {SUPPORTED_DEGREES}")
        d_tile = default_d_tile(d, deg) if d_tile is None else d_tile
        if not isinstance(d_tile, int) or d_tile < 1 or d % d_tile:
            raise InputError("d_tile", d_tile, f"a divisor of head_dim={d}: {[x for x in range(1, d + 1) if d % x == 0]}")
        if not isinstance(c, int) or c < 16 or c % 16:
            raise InputError("chunk_size", c, "a positive multiple of 16")
        if t % c:
            raise InputError("K", f"sequence length t={t}", f"a multiple of chunk_size={c} (pad the sequence)")
        if log_G is not None:
            check_tensor("log_G", log_G, dtypes=("float32",), shape=(b, t, h), device=K.device,
                         what="[batch, time, heads] (of K)")
        if -(-layout(d, deg, d_tile).feature_dim // 16) * b * h * (t // c) >= 2**31:
            raise InputError("K", f"batch*heads*chunks={b * h * (t // c)}", "fewer than 2^31 CTAs; split the batch")
        return dict(K=K, V=V, log_G=log_G, deg=deg, d_tile=d_tile, chunk_size=c)

    def problem_key(self, x: dict[str, Any]) -> UpdateStateKey:
        """b*h*chunks bucketed to a power of two (the tuner's make_inputs must give the key it tunes)."""
        b, t, h, d = x["K"].shape
        return _key(d, x["deg"], x["d_tile"], dtype_name(x["K"].dtype), x["chunk_size"], x["log_G"] is not None,
                    pow2_bucket(b * h * (t // x["chunk_size"])))

    def outputs(self, key: UpdateStateKey, config: UpdateStateConfig, x: dict[str, Any]) -> dict[str, Any]:
        """S [b,n,h,D,d] and s [b,n,h,D], fp32."""
        import torch

        b, t, h, d = x["K"].shape
        n, D = t // key.chunk_size, key.feature_dim
        return {"S": torch.empty((b, n, h, D, d), device=x["K"].device, dtype=torch.float32),
                "s": torch.empty((b, n, h, D), device=x["K"].device, dtype=torch.float32)}

    def launches(self, key: UpdateStateKey, config: UpdateStateConfig, x: dict[str, Any], out: dict[str, Any]):
        K, V, log_G = x["K"], x["V"], x["log_G"]
        b, t, h, d = K.shape
        n = t // key.chunk_size
        if b * h * n == 0:
            return
        gs = log_G.stride() if log_G is not None else (0, 0, 0)
        table = block_table(d, key.deg, key.d_tile, K.device)
        yield Launch((math.ceil(key.feature_dim / config.tile_m) * b * h * n, 1, 1),
                     (K.data_ptr(), V.data_ptr(), ptr(log_G), table.data_ptr(), out["S"].data_ptr(),
                      out["s"].data_ptr(), h, n, *K.stride()[:3], *V.stride()[:3], *gs))

    # ---- tuner protocol (vidrial/tuning): inputs, a run, the float64 reference -------------------
    def make_inputs(self, key: UpdateStateKey, device: Any, seed: int) -> dict[str, Any]:
        """One problem of the key's own bucket: b = 1, h * n = bh_chunks_bucket (up to 8 heads, n
        chunks; fewer chunks only past the tuner's input cap), logsigmoid gates, drawn on `device`;
        the reference checks the first head and first two chunks (bounds its memory)."""
        import torch

        from vidrial.core.protocol import generator, size_in_bucket

        d, c = key.head_dim, key.chunk_size
        bhc = size_in_bucket(key.bh_chunks_bucket, c * (4 * d + 4), field="bh_chunks_bucket")  # K, V, log_G
        h = math.gcd(bhc, 8)
        t = bhc // h * c
        dtype = getattr(torch, key.dtype)
        gen = generator(device, seed)
        K = (torch.randn(1, t, h, d, generator=gen, device=device) / d**0.25).to(dtype)
        V = torch.randn(1, t, h, d, generator=gen, device=device).to(dtype)
        G = (torch.nn.functional.logsigmoid(torch.randn(1, t, h, generator=gen, device=device) + 3.0)
             if key.gating else None)
        return {"K": K, "V": V, "G": G}

    def inputs_key(self, inputs: dict[str, Any], key: UpdateStateKey) -> UpdateStateKey:
        """The key the public op computes for `inputs`."""
        return self.problem_key(dict(K=inputs["K"], log_G=inputs["G"], deg=key.deg, d_tile=key.d_tile,
                                     chunk_size=key.chunk_size))

    def run(self, key: UpdateStateKey, config: UpdateStateConfig, inputs: dict[str, Any]) -> Any:
        return update_state(inputs["K"], inputs["V"], inputs["G"], deg=key.deg, d_tile=key.d_tile,
                            chunk_size=key.chunk_size, config=config)

    def reference(self, key: UpdateStateKey, inputs: dict[str, Any]) -> Any:
        from vidrial.reference.forward import update_state_reference

        m = min(2, inputs["K"].shape[1] // key.chunk_size) * key.chunk_size
        G = inputs["G"][:, :m, :1] if inputs["G"] is not None else None
        return update_state_reference(inputs["K"][:, :m, :1], inputs["V"][:, :m, :1], G, key.deg, key.d_tile,
                                      key.chunk_size)

    def check_outputs(self, key: UpdateStateKey, inputs: dict[str, Any], outputs: Any, expected: Any) -> float:
        import torch

        (S, s), (S_ref, s_ref) = outputs, expected
        nm = S_ref.shape[1]
        err = 0.0
        for out, ref in ((S[:, :nm, :1], S_ref), (s[:, :nm, :1], s_ref)):
            if not torch.isfinite(out).all():
                return float("inf")
            err = max(err, ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item())
        return err

    def tolerance(self, key: UpdateStateKey) -> float:
        return (1e-2 if key.dtype == "bfloat16" else 3e-3) * (1.5 if key.deg == 4 else 1.0)


FAMILY = family = register(UpdateStateFamily())
# the spelling the template tests (`dtype == 'fp16'`)
_TEMPLATE_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}


@cache
def _key(head_dim: int, deg: int, d_tile: int, dtype: str, chunk: int, gating: bool, bucket: int) -> UpdateStateKey:
    return UpdateStateKey(head_dim=head_dim, deg=deg, d_tile=d_tile, dtype=dtype, chunk_size=chunk,
                          gating=gating, bh_chunks_bucket=bucket)


def update_state(K, V, log_G=None, *, deg: int = 2, d_tile: int | None = None, chunk_size: int,
                 config: UpdateStateConfig | None = None):
    """Per-chunk states of power retention (docs/MATH.md section 3 step 1), fused on the GPU.

    K, V: [b, t, h, d] bf16 or fp16 CUDA tensors (last dim contiguous), d in (32, 64, 128), t a
    multiple of chunk_size (the caller pads). log_G: [b, t, h] float32 or None (no gating).
    Returns S [b, t/chunk_size, h, D, d] float32 and s [b, t/chunk_size, h, D] float32, with
    D = sympow.feature_dim(d, deg, d_tile). Launches on the current stream; no host sync, no copies.
    """
    out = family(config, K=K, V=V, log_G=log_G, deg=deg, d_tile=d_tile, chunk_size=chunk_size)
    return out["S"], out["s"]


__all__ = ["UpdateStateConfig", "UpdateStateKey", "UpdateStateFamily", "FAMILY", "family", "update_state"]
