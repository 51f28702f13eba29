"""query_state (docs/MATH.md section 3 step 4), fused with the merge of the intra-chunk half.

Per (batch, chunk nu, query head) and a tile of `tile_m` queries:

    q~ = s * q * exp(g[nu, tau] / p)          (g: cumsum of log_G inside the chunk, KV head i // r)
    Yq = phi(q~)^T Sbar_nu  [tile_m, d]       tensor cores, mma.sync m16n8k16 bf16 -> fp32
    zq = phi(q~)^T sbar_nu  [tile_m]          fp32 (CUDA cores, from the same phi values)
    Y  = (O e^m + Yq) / (l e^m + zq)          shared shift sh = max(m, log zq) per row

Two implementations (the config's `impl`):
- "mma_sync" (templates/query_state.cu.j2, sm_80+, any layout), described below;
- "wgmma" (templates/query_state_wgmma.cu.j2, Hopper, sm_90a; p = 2, d_tile = 8, d in 64/128):
  phi(q~) as the register A operand of wgmma (two shared reads per row and block), the bf16 state
  read by the tensor cores from swizzled shared memory, zq as 8 more columns of the same wgmma
  (from a bf16 copy of sbar the launch makes).

GEMM view: M = queries, N = d, K = D features. phi(q~) is formed in registers from an fp32 q~
tile in shared memory (features along the reduction dimension, order of sympow.py via the block
table of common/sympow.cuh); the state tile comes in bf16 through a cp.async pipeline of
`stages` buffers and ldmatrix.trans. (O, l, m) are intra_chunk_attention's outputs in merge
mode: O = sum exp(a - m) v, l = sum exp(a - m) + 1e-6, m = row max of the log weights.

The state operand is the bf16 copy of Sbar written by discumsum (bf16_copy): reading the fp32
state and converting in the kernel costs twice the bytes and a conversion per element for the
same bf16 MMA operand. bf16 (not fp16) also for fp16 inputs: bf16 keeps fp32's exponent range,
so an ungated state at t = 65536 cannot overflow.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.rules import PowerOfTwo, Rule
from vidrial.core.tensors import C_TYPES, IN_DTYPES, InDType, check_tensor, dtype_name, pow2_bucket, ptr
from vidrial.kernels import register

__all__ = ["QueryStateConfig", "QueryStateKey", "QueryStateFamily", "FAMILY", "query_state"]

ODType = Literal["bfloat16", "float16", "float32"]


WGMMA_HEAD_DIMS = (64, 128)
_TEMPLATES = {"mma_sync": "query_state.cu.j2", "wgmma": "query_state_wgmma.cu.j2"}


class QueryStateConfig(KernelConfig):
    impl: Literal["mma_sync", "wgmma"] = Field(
        "mma_sync", description="mma_sync: warp MMAs, any GPU (sm_80+); wgmma: Hopper warpgroup MMAs (sm_90a)")
    tile_m: int = Field(64, description="queries per CTA (M)")
    tile_k: int = Field(32, description="features per pipeline step (K), multiple of 16")
    warps: int = Field(4, description="warps per CTA; they split tile_m (each owns tile_m / warps rows)")
    stages: int = Field(3, description="cp.async buffers of the state tile")
    min_ctas: int = Field(1, description="__launch_bounds__ minimum CTAs per SM (caps registers per thread)")
    feature_path: Literal["auto", "generic"] = Field(
        "auto", description="auto: paired 64-bit feature loads when p=2 and d_tile is 8 or a multiple of 16; "
                            "generic: per-feature index math (any layout)")

    @model_validator(mode="after")
    def _valid(self):
        if self.tile_m not in (16, 32, 64, 128, 256):
            raise ConfigError("tile_m", self.tile_m, "one of 16, 32, 64, 128, 256")
        if self.tile_k not in (16, 32, 64, 128):
            raise ConfigError("tile_k", self.tile_k, "one of 16, 32, 64, 128 (multiple of the MMA k=16)")
        if self.warps not in (1, 2, 4, 8):
            raise ConfigError("warps", self.warps, "one of 1, 2, 4, 8")
        if not 2 <= self.stages <= 6:
            raise ConfigError("stages", self.stages, "between 2 and 6")
        if not 1 <= self.min_ctas <= 4:
            raise ConfigError("min_ctas", self.min_ctas, "between 1 and 4")
        if self.tile_m % (16 * self.warps):
            raise ConfigError("tile_m", self.tile_m, f"a multiple of 16 * warps = {16 * self.warps}")
        if self.impl == "wgmma":
            if self.warps % 4:
                raise ConfigError("warps", self.warps, "a multiple of 4 with impl='wgmma' (whole warpgroups)")
            if self.tile_k != 64:
                raise ConfigError("tile_k", self.tile_k, "64 with impl='wgmma' (one sympow block per stage)")
            if self.stages < 3:
                raise ConfigError("stages", self.stages, "at least 3 with impl='wgmma'")
        return self


class QueryStateKey(ProblemKey):
    # buckets are what problem_key() gives: another value could never be dispatched to (nor tuned)
    RULES: ClassVar[dict[str, Rule]] = {"chunk_size": PowerOfTwo(), "tokens": PowerOfTwo()}
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "d_tile", "dtype", "o_dtype")
    head_dim: int = 64
    deg: int = 2
    d_tile: int = 8
    dtype: InDType = "bfloat16"
    o_dtype: ODType = "float32"
    chunk_size: int = Field(1024, description="bucket (power of two) of the chunk size")
    tokens: int = Field(65536, description="bucket (power of two) of batch * time")

    @model_validator(mode="after")
    def _valid(self):
        from vidrial.kernels.power_retention.sympow import layout

        layout(self.head_dim, self.deg, self.d_tile)
        if self.head_dim % 16 or not 16 <= self.head_dim <= 256:
            raise ConfigError("head_dim", self.head_dim, "a multiple of 16 between 16 and 256")
        if self.head_dim // self.d_tile > 255:
            raise ConfigError("d_tile", self.d_tile, "at most 255 tiles (d / d_tile)")
        return self

    @property
    def feature_dim(self) -> int:
        from vidrial.kernels.power_retention.sympow import feature_dim

        return feature_dim(self.head_dim, self.deg, self.d_tile)


def _smem_bytes(d: int, cfg: QueryStateConfig) -> int:
    if cfg.impl == "wgmma":  # stages of (d/64 state groups + the zq group) x 64 swizzled rows, bf16 q~ tile
        return cfg.stages * (d // 64 + 1) * 64 * 128 + cfg.tile_m * (d + 8) * 2 + cfg.tile_m * 4 + cfg.warps * 4 + 1024
    q = cfg.tile_m * (d + 8) * 4
    b = cfg.stages * cfg.tile_k * (d + 8) * 2
    z = cfg.stages * cfg.tile_k * 4
    g = cfg.tile_m * 4 + cfg.warps * 4
    return q + b + z + g + 16


class QueryStateFamily(KernelFamily[QueryStateKey, QueryStateConfig]):
    name = "query_state"
    template = "query_state.cu.j2"
    Config = QueryStateConfig
    Key = QueryStateKey
    signature = ("ptr",) * 8 + ("i32",) * 8 + ("f32", "ptr")

    def default_config(self, key: QueryStateKey) -> QueryStateConfig:
        d = key.head_dim
        if d <= 64:
            tile_m = 128 if key.chunk_size >= 128 else 64
            # H200, shape A (t=65536, d=64, d_tile=8): tile_k=64 with 4 stages 0.81 ms vs 0.93 ms at
            # tile_k=32 (identical output); used where D has no K tail (D % 64 == 0)
            if tile_m == 128 and key.feature_dim % 64 == 0:
                return QueryStateConfig(tile_m=128, tile_k=64, warps=4, stages=4)
            return QueryStateConfig(tile_m=tile_m, tile_k=32, warps=4, stages=3)
        return QueryStateConfig(tile_m=64, tile_k=32, warps=4, stages=3)

    def default_config_for(self, key: QueryStateKey, arch: str | None) -> QueryStateConfig:
        """On Hopper, for the layouts it takes, the wgmma kernel: H200 2026-12-02 (benchmarks/bench_impls.py,
        d=64, T=8, merge mode) shape A 0.862 -> 0.509 ms, shape B 0.794 -> 0.472 ms against the tuned
        mma_sync config (tile_m=128, warps=4, stages=3: three CTAs per SM; 4-6 stages were slower)."""
        from vidrial.core.arch import arch_limits

        if (arch is None or arch_limits(arch).capability != 90 or key.deg != 2 or key.d_tile != 8
                or key.head_dim not in WGMMA_HEAD_DIMS):
            return self.default_config(key)
        return QueryStateConfig(impl="wgmma", tile_m=128, tile_k=64, warps=4 if key.head_dim == 64 else 8, stages=3)

    def render_context(self, key: QueryStateKey, config: QueryStateConfig) -> dict[str, Any]:
        from vidrial.kernels.power_retention.sympow import layout

        lay = layout(key.head_dim, key.deg, key.d_tile)
        return dict(d=key.head_dim, D=lay.feature_dim, d_tile=key.d_tile, deg=key.deg, block_size=lay.block_size,
                    in_type=C_TYPES[key.dtype], o_type=C_TYPES[key.o_dtype], tile_m=config.tile_m,
                    tile_k=config.tile_k, warps=config.warps, stages=config.stages, fast=config.feature_path == "auto",
                    min_ctas=config.min_ctas, smem_bytes=self.dynamic_smem_bytes(key, config),
                    wgmma_ns=(key.head_dim + 8,),
                    key_label=key.label(),
                    config_label=config.label())

    def threads_per_block(self, config: QueryStateConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: QueryStateKey, config: QueryStateConfig) -> int:
        return _smem_bytes(key.head_dim, config)

    def template_for(self, config: QueryStateConfig) -> str:
        return _TEMPLATES[config.impl]

    def implementation_templates(self) -> tuple[str, ...]:
        return tuple(_TEMPLATES.values())

    def target_arch(self, config: QueryStateConfig, arch: str) -> str:
        return "sm_90a" if config.impl == "wgmma" else arch

    def check(self, key: QueryStateKey, config: QueryStateConfig, arch: str) -> None:
        if config.impl == "wgmma":
            from vidrial.core.arch import arch_limits, normalize_arch

            if arch_limits(arch).capability != 90:
                raise ConfigError("impl", config.impl, f"needs a Hopper GPU (sm_90 / sm_90a); use impl='mma_sync' "
                                                       f"on {normalize_arch(arch)}")
            if key.deg != 2 or key.d_tile != 8 or key.head_dim not in WGMMA_HEAD_DIMS:
                raise ConfigError("impl", config.impl, f"takes deg=2, d_tile=8, head_dim in {WGMMA_HEAD_DIMS}, not "
                                                       f"deg={key.deg}, d_tile={key.d_tile}, head_dim={key.head_dim}; "
                                                       "use impl='mma_sync'")
            mt = config.tile_m // (16 * config.warps)
            if mt * (key.head_dim + 8) // 2 > 108:
                raise ConfigError("tile_m", config.tile_m, f"{mt * (key.head_dim + 8) // 2} fp32 accumulators per "
                                                           "thread exceed 108 (ptxas spills); use more warps or a smaller tile_m")
        super().check(key, config, arch)
        mt = config.tile_m // (16 * config.warps)
        acc = mt * key.head_dim // 8 * 4
        if acc > 128:
            raise ConfigError("tile_m", config.tile_m,
                              f"{acc} fp32 accumulators per thread (tile_m/(16*warps) * d/2) exceed 128; "
                              "use more warps or a smaller tile_m")

    def shape_keys(self) -> list[QueryStateKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        return unique(self.problem_key(dict(Q=meta(p.b, p.t, p.h, p.d), O=meta(p.b, p.t, p.h, p.d, dtype="float32"),
                                            deg=p.deg, d_tile=p.d_tile, chunk_size=p.chunk_size))
                      for p in training_problems())

    def standard_keys(self) -> list[QueryStateKey]:
        from vidrial.kernels.power_retention.sympow import default_d_tile

        keys = self.shape_keys()
        for d, p in ((32, 2), (64, 2), (128, 2), (32, 4)):
            for dt in ("bfloat16", "float16"):
                keys.append(QueryStateKey(head_dim=d, deg=p, d_tile=default_d_tile(d, p), dtype=dt, o_dtype="float32"))
        from vidrial.kernels.power_retention.standard_shapes import unique

        return unique(keys)

    def corner_configs(self, key: QueryStateKey) -> list[QueryStateConfig]:
        out = [self.default_config(key), QueryStateConfig(tile_m=16, tile_k=16, warps=1, stages=2),
               QueryStateConfig(tile_m=64, tile_k=32, warps=4, stages=3, feature_path="generic")]
        big_m = 128 if key.head_dim <= 64 else 64
        out.append(QueryStateConfig(tile_m=big_m * 2 if key.head_dim <= 64 else big_m, tile_k=64, warps=8 if key.head_dim <= 64 else 4, stages=4))
        return out

    # ---- launch path ---------------------------------------------------------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """Q [b,t,hq,d]; Sbar [b,n',h,D,d] bf16 or fp32 and sbar [b,n',h,D] fp32 with n' = n or n+1;
        O [b,t,hq,d], l, m [b,t,hq] (merge) or all None; log_G [b,t,h] or None; deg, d_tile, scale,
        chunk_size, zero_first_state (see query_state)."""
        import torch

        from vidrial.kernels.power_retention.sympow import layout

        Q, Sbar, sbar, O, l, m, log_G = (x.get(k) for k in ("Q", "Sbar", "sbar", "O", "l", "m", "log_G"))
        deg, d_tile = x["deg"], x["d_tile"]
        check_tensor("Q", Q, dtypes=IN_DTYPES, ndim=4, what="[batch, time, q_heads, head_dim]")
        b, t, hq, d = Q.shape
        dev = Q.device
        if deg not in (2, 4):
            raise InputError("deg", deg, "2 or 4")
        D = layout(d, deg, d_tile).feature_dim
        c = x["chunk_size"]
        if not isinstance(c, int) or c <= 0:
            raise InputError("chunk_size", c, "a positive integer")
        n = -(-t // c)
        check_tensor("Sbar", Sbar, dtypes=("bfloat16", "float32"), ndim=5, device=dev,
                     what="[batch, chunks, kv_heads, D, d]")
        bS, nS, h, DS, dS = Sbar.shape
        if bS != b or DS != D or dS != d or nS not in (n, n + 1) or h == 0 or hq % h:
            raise InputError("Sbar", tuple(Sbar.shape),
                             f"[{b}, {n} or {n + 1}, h, {D}, {d}] with hq={hq} a multiple of h (D={D} for "
                             f"deg={deg}, d_tile={d_tile})")
        check_tensor("sbar", sbar, dtypes=("float32",), ndim=4, device=dev)
        if tuple(sbar.shape) not in ((b, n, h, D), (b, n + 1, h, D)):
            raise InputError("sbar", tuple(sbar.shape), f"[{b}, {n} or {n + 1}, {h}, {D}]")
        if O is not None:
            check_tensor("O", O, dtypes=("bfloat16", "float16", "float32"), shape=(b, t, hq, d), device=dev)
            check_tensor("l", l, dtypes=("float32",), shape=(b, t, hq), device=dev)
            check_tensor("m", m, dtypes=("float32",), shape=(b, t, hq), device=dev)
            O, l, m = O.contiguous(), l.contiguous(), m.contiguous()
        elif l is not None or m is not None:
            raise InputError("O", None, "O, l and m given together (merge) or all None")
        if log_G is not None:
            check_tensor("log_G", log_G, dtypes=("float32",), shape=(b, t, h), device=dev,
                         what="[batch, time, kv_heads]")
            log_G = log_G.contiguous()
        if -(-c // 16) * hq * b * n >= 2**31:
            raise InputError("Q", tuple(Q.shape), "fewer than 2^31 query tiles")
        scale = x.get("scale") or 1.0 / math.sqrt(d)
        return dict(Q=Q.contiguous(), Sbar=Sbar.to(torch.bfloat16).contiguous(), sbar=sbar.contiguous(), O=O, l=l,
                    m=m, log_G=log_G, deg=deg, d_tile=d_tile, scale=float(scale), chunk_size=c,
                    zero_first_state=bool(x.get("zero_first_state", False)))

    def problem_key(self, x: dict[str, Any]) -> QueryStateKey:
        """chunk and b*t bucketed to powers of two (the tuner's make_inputs must give the key it tunes)."""
        Q, O = x["Q"], x.get("O")
        b, t, _, d = Q.shape
        return QueryStateKey(head_dim=d, deg=x["deg"], d_tile=x["d_tile"], dtype=dtype_name(Q.dtype),
                             o_dtype=dtype_name((O if O is not None else Q).dtype),
                             chunk_size=pow2_bucket(x["chunk_size"]), tokens=pow2_bucket(b * t))

    def outputs(self, key: QueryStateKey, config: QueryStateConfig, x: dict[str, Any]) -> dict[str, Any]:
        import torch

        return {"Y": torch.empty_like(x["Q"])}

    def launches(self, key: QueryStateKey, config: QueryStateConfig, x: dict[str, Any], out: dict[str, Any]):
        from vidrial.kernels.power_retention.sympow import block_table

        Q, Sbar, sbar, c = x["Q"], x["Sbar"], x["sbar"], x["chunk_size"]
        b, t, hq, d = Q.shape
        h, n = Sbar.shape[2], -(-t // c)
        if Q.numel() == 0:
            return
        table = block_table(d, key.deg, key.d_tile, Q.device)
        keep = ()
        if config.impl == "wgmma":  # the kernel reads zq's operand as bf16 pairs (one 4-byte copy per row)
            import torch

            sbar = sbar.to(torch.bfloat16)
            keep = (sbar,)
        yield Launch((-(-c // config.tile_m) * hq * b * n, 1, 1),
                     (Q.data_ptr(), ptr(x["log_G"]), Sbar.data_ptr(), sbar.data_ptr(), ptr(x["O"]), ptr(x["l"]),
                      ptr(x["m"]), out["Y"].data_ptr(), t, n, c, hq, hq // h, Sbar.shape[1], sbar.shape[1],
                      int(x["zero_first_state"]), x["scale"], table.data_ptr()), keep)

    # ---- tuner protocol ------------------------------------------------------------------
    def make_inputs(self, key: QueryStateKey, device: Any, seed: int) -> dict[str, Any]:
        """One problem at the key's own size (what the winner is dispatched for): b=1, t = tokens - 3
        (same bucket, a partial last chunk; shorter only past the tuner's input cap), 8 query heads on
        4 KV heads, the states as the forward passes them: bf16 (discumsum's copy; an fp32 state would
        add its conversion to every timing) with Sbar_0 = 0 (no initial state: run() lets the kernel
        skip chunk 0's GEMM, as ops.power_retention does). reference() checks a slice."""
        import torch

        from vidrial.core.protocol import size_in_bucket

        hq, h, d, c, D = 8, 4, key.head_dim, key.chunk_size, key.feature_dim
        o_bytes = 4 if key.o_dtype == "float32" else 2
        per_token = hq * d * (2 + o_bytes) + hq * 8 + h * 4 + h * D * (2 * d + 4) / c  # + Sbar bf16, sbar fp32
        t = max(key.tokens // 2 + 1, size_in_bucket(key.tokens, per_token, field="tokens") - 3)
        x = make_test_inputs(key, b=1, t=t, hq=hq, h=h, chunk_size=c, gating=True, device=device, seed=seed)
        x["Sbar"] = x["Sbar"].to(torch.bfloat16)
        x["Sbar"][:, 0] = 0
        x["sbar"][:, 0] = 0
        return x

    def inputs_key(self, inputs: dict[str, Any], key: QueryStateKey) -> QueryStateKey:
        """The key the public op computes for `inputs`."""
        return self.problem_key(dict(inputs, deg=key.deg, d_tile=key.d_tile))

    def run(self, key: QueryStateKey, config: QueryStateConfig, inputs: dict[str, Any]) -> Any:
        return query_state(inputs["Q"], inputs["Sbar"], inputs["sbar"], inputs["O"], inputs["l"], inputs["m"],
                           inputs["log_G"], deg=key.deg, d_tile=key.d_tile, scale=inputs["scale"],
                           chunk_size=inputs["chunk_size"], config=config, zero_first_state=True)

    def reference(self, key: QueryStateKey, inputs: dict[str, Any]) -> Any:
        """float64 on the first two chunks of the first KV head (each chunk reads only its own state,
        so the slice is exact); check_outputs compares that leading slice."""
        from vidrial.reference.forward import query_state_reference

        x = inputs
        c = x["chunk_size"]
        t = min(x["Q"].shape[1], 2 * c)
        r = x["Q"].shape[2] // x["Sbar"].shape[2]
        n = -(-t // c)
        rows = (slice(None), slice(0, t), slice(0, r))
        return query_state_reference(x["Q"][rows], x["Sbar"][:, :n, :1], x["sbar"][:, :n, :1], x["O"][rows],
                                     x["l"][rows], x["m"][rows],
                                     x["log_G"][:, :t, :1] if x["log_G"] is not None else None, deg=key.deg,
                                     d_tile=key.d_tile, scale=x["scale"], chunk_size=c)


FAMILY = register(QueryStateFamily())


def make_test_inputs(key: QueryStateKey, *, b, t, hq, h, chunk_size, gating, device, seed=0, state_scale=1.0):
    """Random inputs of query_state: Q, log_G, states (fp32, any scale) and an (O, l, m) triple."""
    import torch

    from vidrial.core.protocol import generator
    from vidrial.reference.forward import phi

    gen = generator(device, seed)  # drawn on `device` (shapes only on 'meta')
    d = key.head_dim
    n = -(-t // chunk_size)
    dt = getattr(torch, key.dtype)
    Q = torch.randn(b, t, hq, d, generator=gen, device=device).to(dt)
    log_G = -torch.rand(b, t, h, generator=gen, device=device) * 0.1 if gating else None
    # states that are sums of phi(k) v^T like real ones (so phi(q).sbar >= 0), 16 keys per chunk
    Kf = torch.randn(b, n, 16, h, d, generator=gen, device=device, dtype=torch.float64)
    Vf = torch.randn(b, n, 16, h, d, generator=gen, device=device, dtype=torch.float64)
    pk = phi(Kf, key.deg, key.d_tile)  # [b, n, 16, h, D]
    Sbar = (torch.einsum("bnchD,bnche->bnhDe", pk, Vf) * state_scale).float()
    sbar = (pk.sum(2) * state_scale).float()
    del pk
    O = torch.randn(b, t, hq, d, generator=gen, device=device).to(getattr(torch, key.o_dtype))
    m = torch.randn(b, t, hq, generator=gen, device=device)
    l = 1.0 + torch.rand(b, t, hq, generator=gen, device=device) * 3
    return dict(Q=Q, log_G=log_G, Sbar=Sbar, sbar=sbar, O=O, l=l, m=m, scale=1.0 / math.sqrt(d),
                chunk_size=chunk_size)


def query_state(Q, Sbar, sbar, O, l, m, log_G=None, *, deg, d_tile, scale=None, chunk_size, config=None,
                zero_first_state: bool = False):
    """Y [b,t,hq,d] in Q's dtype: the state half of the chunked forward merged with (O, l, m).

    Q [b,t,hq,d] bf16/fp16 (t need not be a multiple of chunk_size: the last chunk is partial);
    Sbar [b,n',h,D,d] with n' = n or n+1 (n = ceil(t / chunk_size); the first n are the states at
    the start of each chunk): bf16 (used as is, e.g. discumsum's bf16 copy) or fp32 (converted);
    sbar [b,n',h,D] fp32; O [b,t,hq,d] (bf16/fp16/fp32), l, m [b,t,hq] fp32 from
    intra_chunk_attention (merge mode) or all None (state only: Y = Yq / zq);
    log_G [b,t,h] fp32 per-step log gates or None. zero_first_state=True promises Sbar_0 = 0
    (no initial state) and skips that chunk's GEMM."""
    return FAMILY(config, Q=Q, Sbar=Sbar, sbar=sbar, O=O, l=l, m=m, log_G=log_G, deg=deg, d_tile=d_tile, scale=scale,
                  chunk_size=int(chunk_size), zero_first_state=zero_first_state)["Y"]
