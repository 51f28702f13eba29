"""Fused update_state (MATH.md section 3 step 1): per-chunk states S [b,n,h,D,d] and s [b,n,h,D].

    S[:, nu] = sum_tau phi(k~_tau) v_tau^T,   s[:, nu] = sum_tau phi(k~_tau),
    k~ = k * exp((g[nu, c-1] - g[nu, tau]) / p),  g = cumsum of log_G inside the chunk.

One kernel per (head_dim, deg, d_tile, dtype, chunk_size, gating) and tile config; batch, heads and
the number of chunks are runtime arguments. phi(k~) is formed in registers and fed to mma.sync
(templates/update_state.cu.j2); it never reaches global memory.
"""
from __future__ import annotations

import math
from functools import cache
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from vidrial.core.arch import arch_limits
from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily
from vidrial.core.rules import Between, MultipleOf, OneOf, PowerOfTwo, Rule
from vidrial.kernels import register
from vidrial.kernels.power_retention.sympow import SUPPORTED_DEGREES, default_d_tile, layout

HEAD_DIMS = (32, 64, 128)
TILE_KS = (16, 32, 64, 128)
WARP_CHOICES = (1, 2, 4, 8)
DTYPES = ("bf16", "fp16")
# Registers per thread we allow for accumulators + A fragments + feature offsets (the rest of the
# 255 goes to B fragments, addresses and temporaries); above it ptxas spills.
REGISTER_BUDGET = 200


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length() if n > 1 else 1


class UpdateStateConfig(KernelConfig):
    """Tiles of the fused update_state kernel.

    tile_m: features per CTA (multiple of 16 * warps); tile_k: time steps per pipeline stage;
    warps: warps per CTA (they split tile_m); stages: cp.async pipeline depth (K and V tiles);
    min_ctas: __launch_bounds__ minimum CTAs per SM (steers ptxas' register allocation)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "tile_m": MultipleOf(16, 16, 1024, why="MMA rows are 16"),
        "tile_k": OneOf(TILE_KS, "16-step MMA reduction, 32-step panels"), "warps": OneOf(WARP_CHOICES),
        "stages": Between(2, 6, "cp.async pipeline depth"), "min_ctas": Between(1, 4),
    }

    tile_m: int = 128
    tile_k: int = 64
    warps: int = 4
    stages: int = 3
    min_ctas: int = 1

    @model_validator(mode="after")
    def _split(self) -> "UpdateStateConfig":
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
    dtype: Literal["bf16", "fp16"] = "bf16"
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
    mt = config.warp_m // 16
    accumulators = mt * (key.head_dim // 8 + 1) * 4
    a_fragments = mt * 8 if config.tile_k >= 32 else mt * 4
    offsets = mt * 2 * key.deg
    return accumulators + a_fragments + offsets


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

    def corner_configs(self, key: UpdateStateKey) -> list[UpdateStateConfig]:
        """Smallest tiles, and the largest tiles that pass check() on sm_80 (the tighter arch)."""
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
    def threads_per_block(self, config: UpdateStateConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: UpdateStateKey, config: UpdateStateConfig) -> int:
        mat = config.tile_k * key.head_dim * 2
        kt_buffers = 2 if config.stages >= 3 else 1  # the transposed K tile, double-buffered with >= 3 stages
        size = config.stages * 2 * mat + kt_buffers * mat
        if key.gating:
            size += key.chunk_size * 4 + 32 * 4
        return size

    def render_context(self, key: UpdateStateKey, config: UpdateStateConfig) -> dict[str, Any]:
        return dict(
            head_dim=key.head_dim, deg=key.deg, d_tile=key.d_tile, feature_dim=key.feature_dim,
            chunk_size=key.chunk_size, gating=key.gating, dtype=key.dtype,
            tile_m=config.tile_m, tile_k=config.tile_k, warps=config.warps, stages=config.stages,
            min_ctas=config.min_ctas, smem_bytes=self.dynamic_smem_bytes(key, config),
        )

    def shape_keys(self) -> list[UpdateStateKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        # gated: the forward; ungated: the backward's state pass (query_state_bwd runs this kernel on
        # inputs whose gates it has already applied)
        return unique(problem_key(meta(p.b, p.t, p.h, p.d), gates, p.deg, p.d_tile, p.chunk_size)
                      for p in training_problems() for gates in (meta(p.b, p.t, p.h, dtype="float32"), None))

    def standard_keys(self) -> list[UpdateStateKey]:
        keys = self.shape_keys()
        for d in HEAD_DIMS:
            for dtype in DTYPES:
                for chunk in (64, 1024):
                    for gating in (True, False):
                        keys.append(UpdateStateKey(head_dim=d, deg=2, d_tile=default_d_tile(d, 2), dtype=dtype,
                                                   chunk_size=chunk, gating=gating))
        for t in (1, 16):  # exact symmetric power and the coarse MMA-friendly layout, shape A/B settings
            keys.append(UpdateStateKey(head_dim=64, deg=2, d_tile=t, dtype="bf16", chunk_size=1024, gating=True))
        for dtype in DTYPES:  # degree 4 at a moderate D (d=32, d_tile=4: D=84480)
            keys.append(UpdateStateKey(head_dim=32, deg=4, d_tile=4, dtype=dtype, chunk_size=256, gating=True))
        from vidrial.kernels.power_retention.standard_shapes import unique

        return unique(keys)

    def grid(self, key: UpdateStateKey, config: UpdateStateConfig, bh_chunks: int) -> tuple[int, int, int]:
        return (math.ceil(key.feature_dim / config.tile_m) * bh_chunks, 1, 1)

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
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[key.dtype]
        gen = generator(device, seed)
        K = (torch.randn(1, t, h, d, generator=gen, device=device) / d**0.25).to(dtype)
        V = torch.randn(1, t, h, d, generator=gen, device=device).to(dtype)
        G = (torch.nn.functional.logsigmoid(torch.randn(1, t, h, generator=gen, device=device) + 3.0)
             if key.gating else None)
        return {"K": K, "V": V, "G": G}

    def inputs_key(self, inputs: dict[str, Any], key: UpdateStateKey) -> UpdateStateKey:
        """The key the public op computes for `inputs`."""
        return problem_key(inputs["K"], inputs["G"], key.deg, key.d_tile, key.chunk_size)

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
        return (1e-2 if key.dtype == "bf16" else 3e-3) * (1.5 if key.deg == 4 else 1.0)


family: UpdateStateFamily = register(UpdateStateFamily())  # type: ignore[assignment]


# ---- block table (see templates/common/sympow.cuh for why a device table) ---------------------
_TABLES: dict[tuple[int, int, int, int], Any] = {}


def block_table_values(head_dim: int, deg: int, d_tile: int) -> list[int]:
    """One u32 per feature block, byte j = tile index i_{j+1} (sympow.py's order)."""
    out = []
    for blk in layout(head_dim, deg, d_tile).blocks:
        packed = 0
        for j, tile in enumerate(blk):
            packed |= int(tile) << (8 * j)
        out.append(packed)
    return out


def block_table(head_dim: int, deg: int, d_tile: int, device) -> Any:
    """Cached int32 device tensor of the block table. Built (one host->device copy) on the first
    call per layout and device: call update_state once before capturing a CUDA graph (the first
    call also compiles or loads the kernel)."""
    import torch

    memo = (head_dim, deg, d_tile, device.index)
    table = _TABLES.get(memo)
    if table is None:
        vals = [v - (1 << 32) if v >= 1 << 31 else v for v in block_table_values(head_dim, deg, d_tile)]
        table = torch.tensor(vals, dtype=torch.int32, device=device)
        _TABLES[memo] = table
    return table


# ---- public launcher ----------------------------------------------------------------------------
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16"}


def problem_key(K: Any, log_G: Any, deg: int, d_tile: int, chunk_size: int) -> UpdateStateKey:
    """The dispatch key of a call (b*h*chunks bucketed to a power of two); the tuner's make_inputs
    must produce inputs whose key is the key it tunes."""
    b, t, h, d = K.shape
    return _key(d, deg, d_tile, _DTYPE_NAMES[str(K.dtype).removeprefix("torch.")], chunk_size, log_G is not None,
                _pow2_bucket(b * h * (t // chunk_size)))


@cache
def _key(head_dim: int, deg: int, d_tile: int, dtype: str, chunk: int, gating: bool, bucket: int) -> UpdateStateKey:
    return UpdateStateKey(head_dim=head_dim, deg=deg, d_tile=d_tile, dtype=dtype, chunk_size=chunk,
                          gating=gating, bh_chunks_bucket=bucket)


@cache
def _kernel_key(key: UpdateStateKey) -> UpdateStateKey:
    """The key with its runtime bucket fixed: launchables are shared across batch/heads/chunks."""
    return key.model_copy(update={"bh_chunks_bucket": 1})


@cache
def _arch(device_index: int) -> str:
    from vidrial.core.arch import device_arch

    return device_arch(device_index)


def select_config(key: UpdateStateKey, device_index: int | None = None) -> UpdateStateConfig:
    """The single call site that picks a config when the caller gives none: the dispatcher
    (tuned JSON for this GPU, nearest compatible key, else the family default)."""
    try:
        from vidrial import dispatch
    except ImportError:  # pragma: no cover - a build without the dispatcher
        return family.default_config(key)
    return dispatch.select_config(family, key, dispatch.current_gpu(device_index))


def _check_kv(name: str, x, ref=None) -> None:
    import torch

    if not isinstance(x, torch.Tensor):
        raise InputError(name, type(x).__name__, "a torch.Tensor [batch, time, heads, head_dim]")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise InputError(name, f"dtype {x.dtype}", "torch.bfloat16 or torch.float16")
    if x.dim() != 4:
        raise InputError(name, f"shape {tuple(x.shape)}", "4 dims [batch, time, heads, head_dim]")
    if x.shape[-1] not in HEAD_DIMS:
        raise InputError(name, f"head_dim {x.shape[-1]} (shape {tuple(x.shape)})", f"head_dim in {HEAD_DIMS}")
    if ref is not None:
        if x.shape != ref.shape:
            raise InputError(name, f"shape {tuple(x.shape)}", f"the shape of K {tuple(ref.shape)}")
        if x.dtype != ref.dtype:
            raise InputError(name, f"dtype {x.dtype}", f"the dtype of K ({ref.dtype})")
    if x.stride(-1) != 1:
        raise InputError(name, f"strides {tuple(x.stride())}", "a contiguous last dim (stride 1); call .contiguous()")
    if any(s % 8 for s in x.stride()[:3]) or x.data_ptr() % 16:
        raise InputError(name, f"strides {tuple(x.stride())}, data_ptr % 16 = {x.data_ptr() % 16}",
                         "batch/time/head strides that are multiples of 8 elements and a 16-byte aligned "
                         "start (16-byte cp.async loads); call .contiguous()")


def update_state(K, V, log_G=None, *, deg: int = 2, d_tile: int | None = None, chunk_size: int,
                 config: UpdateStateConfig | None = None):
    """Per-chunk states of power retention (MATH.md section 3 step 1), fused on the GPU.

    K, V: [b, t, h, d] bf16 or fp16 CUDA tensors (last dim contiguous), d in (32, 64, 128), t a
    multiple of chunk_size (the caller pads). log_G: [b, t, h] float32 or None (no gating).
    Returns S [b, t/chunk_size, h, D, d] float32 and s [b, t/chunk_size, h, D] float32, with
    D = sympow.feature_dim(d, deg, d_tile). Launches on the current stream; no host sync, no copies.
    """
    import torch

    _check_kv("K", K)
    _check_kv("V", V, K)
    b, t, h, d = K.shape
    if deg not in SUPPORTED_DEGREES:
        raise InputError("deg", deg, f"one of {SUPPORTED_DEGREES}")
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    if not isinstance(d_tile, int) or d_tile < 1 or d % d_tile:
        raise InputError("d_tile", d_tile, f"a divisor of head_dim={d}: {[x for x in range(1, d + 1) if d % x == 0]}")
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size % 16:
        raise InputError("chunk_size", chunk_size, "a positive multiple of 16")
    if t % chunk_size:
        raise InputError("K", f"sequence length t={t}", f"a multiple of chunk_size={chunk_size} (pad the sequence)")
    if log_G is not None:
        if not isinstance(log_G, torch.Tensor):
            raise InputError("log_G", type(log_G).__name__, "None or a float32 torch.Tensor [batch, time, heads]")
        if log_G.dtype != torch.float32:
            raise InputError("log_G", f"dtype {log_G.dtype}", "torch.float32")
        if tuple(log_G.shape) != (b, t, h):
            raise InputError("log_G", f"shape {tuple(log_G.shape)}", f"shape {(b, t, h)} (batch, time, heads of K)")
        if log_G.device != K.device:
            raise InputError("log_G", f"device {log_G.device}", f"the device of K ({K.device})")
    if V.device != K.device:
        raise InputError("V", f"device {V.device}", f"the device of K ({K.device})")
    if K.device.type != "cuda":
        raise InputError("K", f"device {K.device}", "a CUDA tensor")
    if config is not None and not isinstance(config, UpdateStateConfig):
        raise InputError("config", type(config).__name__, "None or an UpdateStateConfig")

    n = t // chunk_size
    bhc = b * h * n
    key = problem_key(K, log_G, deg, d_tile, chunk_size)
    D = key.feature_dim
    S = torch.empty((b, n, h, D, d), device=K.device, dtype=torch.float32)
    s = torch.empty((b, n, h, D), device=K.device, dtype=torch.float32)
    if bhc == 0:
        return S, s
    dev = K.device.index if K.device.index is not None else torch.cuda.current_device()
    if config is None:
        config = select_config(key, dev)
    kernel = family.launchable(_kernel_key(key), config, _arch(dev))
    grid = family.grid(key, config, bhc)
    if grid[0] >= 2**31:
        raise InputError("K", f"batch*heads*chunks={bhc} with D={D}", "fewer than 2^31 CTAs; split the batch")
    table = block_table(d, deg, d_tile, K.device)
    from vidrial.core.launch import current_stream_handle

    if log_G is not None:
        gptr, gs = log_G.data_ptr(), log_G.stride()
    else:
        gptr, gs = 0, (0, 0, 0)
    ks, vs = K.stride(), V.stride()
    kernel.launch(grid, (family.threads_per_block(config), 1, 1),
                  (K.data_ptr(), V.data_ptr(), gptr, table.data_ptr(), S.data_ptr(), s.data_ptr(), h, n,
                   ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], gs[0], gs[1], gs[2]),
                  dev, current_stream_handle(dev))
    return S, s


__all__ = ["UpdateStateConfig", "UpdateStateKey", "UpdateStateFamily", "family", "update_state",
           "block_table_values"]
