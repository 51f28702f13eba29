"""Fused decode step (MATH.md section 5): one launch per generated token answers the new query
(or the few new queries) from the recurrent state and the short KV cache.

Per (batch, KV head) the state S [D, d] is read exactly once: its D rows are split across
`ceil(D / tile_f)` "state CTAs" (b*h = 8..512 heads alone are too few CTAs to saturate HBM), each
forming phi(s q) for its D-slice on the fly (all R = GROUP * TQ query rows of a GQA group share
the one state read) and writing a partial numerator [R, d] and denominator [R]. The cache is split
into tiles of `cache_tile` tokens ("cache CTAs"), each writing a max-shifted partial attention
(O, l, m). The last CTA of the (batch, KV head) to finish (threadfence reduction with a counter
that it resets to 0) merges the partials in a fixed order under a shared stabiliser and writes Y:
deterministic, no host sync, capturable in a CUDA graph (see templates/decode_step.cu.j2).

State dtype (part of the state's layout, like d_tile): fp32 (what power_retention's
return_final_state gives; exact accumulation across many absorptions) or bf16 (half the bytes of
the memory-bound read; retention keeps its inference state in the input dtype). Both are compiled
variants of the same kernel (key field `state_dtype`).

Absorption (the cache reaching switch_over_seq_len) is not part of this kernel: vidrial.inference
runs update_state over the cache plus a gated sum (a few more launches, once per switch_over_seq_len
tokens, still no host sync).

Workspace: per (device, b*h, rows, head_dim, state CTAs, cache-CTA capacity) one float32 buffer of
partials and one int32 counter per (b, h) (zeroed once; the kernel leaves it at 0). It is
allocated on the first call with that shape and then reused, so a CUDA graph captured after one
warm-up call performs no allocation besides Y (the caching allocator's). Two decode steps of the
same shape class must not run concurrently on different streams of one device (they would share
the buffer); a graph and its eager warm-up run on one stream at a time, which is the normal use.
"""
from __future__ import annotations

import math
from functools import cache
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily
from vidrial.core.rules import Between, MultipleOf, OneOf, PowerOfTwo, Rule
from vidrial.kernels import register
from vidrial.kernels.power_retention.sympow import SUPPORTED_DEGREES, default_d_tile, layout

__all__ = ["DecodeConfig", "DecodeKey", "DecodeFamily", "family", "decode_step", "MAX_ROWS",
           "block_table_values", "workspace"]

HEAD_DIMS = (32, 64, 128)
TILE_FS = (32, 64, 128, 256, 512, 1024)
WARP_CHOICES = (2, 4, 8)
CACHE_TILES = (32, 64, 128)
UNROLLS = (1, 2, 4, 8, 16)
LOAD_BYTES = (8, 16)
MAX_ROWS = 16  # GQA group x new tokens per KV head handled by one kernel
# target number of CTAs of the state read (several waves of 132 SMs x 2-3 resident CTAs: short tails)
_TARGET_CTAS = 1024
# registers per thread we allow for accumulators + loads in flight (ptxas spills above ~200)
REGISTER_BUDGET = 168


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length() if n > 1 else 1


class DecodeConfig(KernelConfig):
    """tile_f: state rows (features) per state CTA; warps: warps per CTA; cache_tile: cache tokens
    per cache CTA; unroll: state loads in flight per thread; load_bytes: bytes per state load;
    min_ctas: __launch_bounds__ minimum CTAs per SM (caps registers per thread, raises occupancy)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "min_ctas": Between(1, 4, "__launch_bounds__ minimum CTAs per SM"),
        "tile_f": OneOf(TILE_FS), "warps": OneOf(WARP_CHOICES), "cache_tile": OneOf(CACHE_TILES),
        "unroll": OneOf(UNROLLS), "load_bytes": OneOf(LOAD_BYTES),
    }

    tile_f: int = 128
    warps: int = 8
    cache_tile: int = 64
    unroll: int = 8
    load_bytes: int = 16
    min_ctas: int = 1


class DecodeKey(ProblemKey):
    """Compile-time: layout (head_dim, deg, d_tile, state_dtype), Q/K/V dtype, GQA group, new tokens
    per step (q_len), gating. Runtime bucket: b * kv_heads."""

    RULES: ClassVar[dict[str, Rule]] = {
        "head_dim": OneOf(HEAD_DIMS), "deg": OneOf(SUPPORTED_DEGREES), "bh_bucket": PowerOfTwo(),
    }

    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "d_tile", "dtype", "state_dtype", "group",
                                                 "q_len", "gating")

    head_dim: int
    deg: int = 2
    d_tile: int = 8
    dtype: Literal["bf16", "fp16"] = "bf16"
    state_dtype: Literal["fp32", "bf16"] = "fp32"
    group: int = 1
    q_len: int = 1
    gating: bool = True
    bh_bucket: int = 64

    @model_validator(mode="after")
    def _valid(self) -> "DecodeKey":
        if self.d_tile < 1 or self.head_dim % self.d_tile:
            divisors = [t for t in range(1, self.head_dim + 1) if self.head_dim % t == 0]
            raise ConfigError("d_tile", self.d_tile, f"a divisor of head_dim={self.head_dim}: {divisors}")
        if self.group < 1 or self.q_len < 1 or self.group * self.q_len > MAX_ROWS:
            raise ConfigError("group", (self.group, self.q_len),
                              f"group * q_len (query rows per KV head) between 1 and {MAX_ROWS}")
        return self

    @property
    def feature_dim(self) -> int:
        return layout(self.head_dim, self.deg, self.d_tile).feature_dim

    @property
    def rows(self) -> int:
        return self.group * self.q_len

    @property
    def state_bytes(self) -> int:
        return 4 if self.state_dtype == "fp32" else 2


def _shape(key: DecodeKey, config: DecodeConfig) -> dict[str, int]:
    vec = config.load_bytes // key.state_bytes
    cpr = key.head_dim // vec
    threads = config.warps * 32
    rpp = threads // cpr if threads % cpr == 0 else 0
    npass = config.tile_f // rpp if rpp and config.tile_f % rpp == 0 else 0
    u = min(config.unroll, npass) if npass else 0
    return dict(vec=vec, cpr=cpr, rpp=rpp, npass=npass, u=u, ns=math.ceil(key.feature_dim / config.tile_f))


class DecodeFamily(KernelFamily[DecodeKey, DecodeConfig]):
    name = "decode_step"
    template = "decode_step.cu.j2"
    Config = DecodeConfig
    Key = DecodeKey
    # Q K V G S z blocks Y ws counters | heads cache_len n_state nc_cap | scale | 20 strides
    signature = ("ptr",) * 10 + ("i32",) * 4 + ("f32",) + ("i64",) * 20

    def default_config(self, key: DecodeKey) -> DecodeConfig:
        load_bytes = 16 if key.rows * (16 // key.state_bytes) <= 64 else 8
        D = key.feature_dim
        tile_f = 64
        for t in (1024, 512, 256, 128, 64):
            if key.bh_bucket * math.ceil(D / t) >= _TARGET_CTAS:
                tile_f = t
                break
        cfg = DecodeConfig(tile_f=tile_f, warps=8, cache_tile=64, unroll=8, load_bytes=load_bytes)
        for t in (tile_f, 128, 256, 512, 1024):  # smallest tile that satisfies check()
            try:
                c2 = cfg.model_copy(update={"tile_f": t})
                self.check(key, c2, "sm_80")
                return c2
            except ConfigError:
                continue
        return cfg

    def corner_configs(self, key: DecodeKey) -> list[DecodeConfig]:
        out = [self.default_config(key)]
        for cfg in (DecodeConfig(tile_f=1024, warps=8, cache_tile=128, unroll=16, load_bytes=8),
                    DecodeConfig(tile_f=256, warps=2, cache_tile=32, unroll=1, load_bytes=16),
                    DecodeConfig(tile_f=512, warps=4, cache_tile=128, unroll=4, load_bytes=8)):
            try:
                self.check(key, cfg, "sm_80")
            except ConfigError:
                continue
            if cfg not in out:
                out.append(cfg)
        return out

    def check(self, key: DecodeKey, config: DecodeConfig, arch: str) -> None:
        sh = _shape(key, config)
        if not sh["rpp"]:
            raise ConfigError("warps", config.warps, f"{config.warps * 32} threads must cover whole state rows of "
                                                     f"{sh['cpr']} loads")
        if not sh["npass"]:
            raise ConfigError("tile_f", config.tile_f, f"a multiple of the {sh['rpp']} state rows per pass "
                                                       f"(warps={config.warps}, load_bytes={config.load_bytes})")
        if sh["npass"] % sh["u"]:
            raise ConfigError("unroll", config.unroll, f"must divide the {sh['npass']} passes of tile_f")
        regs = key.rows * (sh["vec"] + 1) + sh["u"] * (config.load_bytes // 4 + 1)
        if regs > REGISTER_BUDGET:
            raise ConfigError("load_bytes", config.load_bytes,
                              f"rows={key.rows} x {sh['vec']} columns + {sh['u']} loads in flight need ~{regs} "
                              f"registers per thread (> {REGISTER_BUDGET}): use load_bytes=8 or a smaller unroll")
        super().check(key, config, arch)

    def threads_per_block(self, config: DecodeConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: DecodeKey, config: DecodeConfig) -> int:
        R, HD, CT = key.rows, key.head_dim, config.cache_tile
        qs = R * HD * 4
        red = R * (HD + 1) * 4
        if config.warps * red <= 16384:  # one partial per warp (template: RED_BY_WARP)
            red *= config.warps
        kv = CT * (HD + 8) * 2
        cache_b = 2 * kv + R * CT * 4 + CT * 4 + 4 * R * 4 + 64 * 4
        return qs + max(red, cache_b)

    def render_context(self, key: DecodeKey, config: DecodeConfig) -> dict[str, Any]:
        return dict(head_dim=key.head_dim, deg=key.deg, d_tile=key.d_tile, feature_dim=key.feature_dim,
                    group=key.group, q_len=key.q_len, gating=key.gating, dtype=key.dtype,
                    state_dtype=key.state_dtype, tile_f=config.tile_f, warps=config.warps,
                    cache_tile=config.cache_tile, unroll=config.unroll, load_bytes=config.load_bytes,
                    min_ctas=config.min_ctas,
                    smem_bytes=self.dynamic_smem_bytes(key, config))

    def shape_keys(self) -> list[DecodeKey]:
        from vidrial.kernels.power_retention.standard_shapes import decode_problems, meta, unique

        return unique(problem_key(meta(p.b, 1, p.h, p.d), meta(p.b, 1, p.h, p.d), meta(p.b, 1, p.h, dtype="float32"),
                                  meta(p.b, p.h, p.feature_dim, p.d, dtype=p.state_dtype), p.deg, p.d_tile)
                      for p in decode_problems())

    def standard_keys(self) -> list[DecodeKey]:
        keys = self.shape_keys()
        for d in HEAD_DIMS:
            for sd in ("fp32", "bf16"):
                for gating in (True, False):
                    keys.append(DecodeKey(head_dim=d, deg=2, d_tile=default_d_tile(d, 2), dtype="bf16",
                                          state_dtype=sd, gating=gating))
        keys.append(DecodeKey(head_dim=64, deg=2, d_tile=8, dtype="bf16", state_dtype="fp32", group=4, gating=True))
        keys.append(DecodeKey(head_dim=64, deg=2, d_tile=16, dtype="fp16", state_dtype="bf16", gating=True))
        keys.append(DecodeKey(head_dim=32, deg=4, d_tile=4, dtype="bf16", state_dtype="fp32", gating=True))
        from vidrial.kernels.power_retention.standard_shapes import unique

        return unique(keys)

    def workspace_floats(self, key: DecodeKey, config: DecodeConfig, nc_cap: int) -> int:
        R, HD = key.rows, key.head_dim
        ns = math.ceil(key.feature_dim / config.tile_f)
        spart = (ns * R * (HD + 1) + 3) // 4 * 4
        total = spart + nc_cap * R * (HD + 2) + R
        return (total + 3) // 4 * 4

    # ---- tuner protocol ------------------------------------------------------------------------
    def make_inputs(self, key: DecodeKey, device: Any, seed: int) -> dict[str, Any]:
        """One step of the key's own bucket: b * h = bh_bucket (up to 8 KV heads; fewer heads only past
        the tuner's input cap), a 200-token cache, a state from a short float64 history, on `device`."""
        import torch

        from vidrial.core.protocol import generator, size_in_bucket
        from vidrial.reference.forward import update_state_reference

        L, d, D = 200, key.head_dim, key.feature_dim
        per_head = D * d * key.state_bytes + D * 4 + L * (4 * d + 4)  # state, sum of keys, K/V/log_G cache
        bh = size_in_bucket(key.bh_bucket, per_head, field="bh_bucket")
        h = math.gcd(bh, 8)
        b = bh // h
        g = generator(device, seed)
        dt = torch.bfloat16 if key.dtype == "bf16" else torch.float16
        sdt = torch.float32 if key.state_dtype == "fp32" else torch.bfloat16

        def randn(*shape: int) -> Any:
            return torch.randn(*shape, generator=g, device=device)

        out = dict(Q=randn(b, key.q_len, h * key.group, d).to(dt), K=randn(b, L, h, d).to(dt),
                   V=randn(b, L, h, d).to(dt),
                   log_G=torch.nn.functional.logsigmoid(4 + randn(b, L, h)) if key.gating else None)
        # a realistic state (non-negative phi(q).z): the float64 update over a short random history
        S, z = update_state_reference(randn(b, 32, h, d), randn(b, 32, h, d), None, key.deg, key.d_tile, 32)
        out["state"] = S[:, 0].to(sdt).contiguous()
        out["sum_of_keys"] = z[:, 0].float().contiguous()
        return out

    def inputs_key(self, inputs: dict[str, Any], key: DecodeKey) -> DecodeKey:
        """The key the public op computes for `inputs`."""
        x = inputs
        return problem_key(x["Q"], x["K"], x["log_G"], x["state"], key.deg, key.d_tile)

    def run(self, key: DecodeKey, config: DecodeConfig, inputs: dict[str, Any]) -> Any:
        return decode_step(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], inputs["state"],
                           inputs["sum_of_keys"], deg=key.deg, d_tile=key.d_tile, scale=None, config=config)

    def reference(self, key: DecodeKey, inputs: dict[str, Any]) -> Any:
        from vidrial.reference.forward import power_retention_inference_reference

        Y, _, _ = power_retention_inference_reference(
            inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], inputs["state"].double(),
            inputs["sum_of_keys"].double(), deg=key.deg, scale=None, switch_over_seq_len=None, d_tile=key.d_tile)
        return Y.to(inputs["Q"].dtype)


family: DecodeFamily = register(DecodeFamily())  # type: ignore[assignment]


# ---- block table (same packing as common/sympow.cuh expects) ----------------------------------
def block_table_values(head_dim: int, deg: int, d_tile: int) -> list[int]:
    """One u32 per feature block, byte j = tile index i_{j+1} (sympow.py's order)."""
    out = []
    for blk in layout(head_dim, deg, d_tile).blocks:
        packed = 0
        for j, tile in enumerate(blk):
            packed |= int(tile) << (8 * j)
        out.append(packed)
    return out


_TABLES: dict[tuple[int, int, int, int], Any] = {}


def _block_table(head_dim: int, deg: int, d_tile: int, device) -> Any:
    import torch

    memo = (head_dim, deg, d_tile, device.index)
    table = _TABLES.get(memo)
    if table is None:
        vals = [v - (1 << 32) if v >= 1 << 31 else v for v in block_table_values(head_dim, deg, d_tile)]
        table = _TABLES[memo] = torch.tensor(vals, dtype=torch.int32, device=device)
    return table


# ---- workspace ---------------------------------------------------------------------------------
_WORKSPACES: dict[tuple, tuple[Any, Any]] = {}


def workspace(key: DecodeKey, config: DecodeConfig, bh: int, nc_cap: int, device) -> tuple[Any, Any]:
    """(partials float32 [bh, stride], counters int32 [bh] zeroed): allocated once per (device,
    shape class) and reused; the kernel leaves the counters at 0."""
    import torch

    floats = family.workspace_floats(key, config, nc_cap)
    memo = (device.index, bh, floats)
    ws = _WORKSPACES.get(memo)
    if ws is None:
        ws = _WORKSPACES[memo] = (torch.empty((bh, floats), dtype=torch.float32, device=device),
                                  torch.zeros((bh,), dtype=torch.int32, device=device))
    return ws


@cache
def _arch(device_index: int) -> str:
    from vidrial.core.arch import device_arch

    return device_arch(device_index)


@cache
def _key(head_dim, deg, d_tile, dtype, state_dtype, group, q_len, gating, bucket) -> DecodeKey:
    return DecodeKey(head_dim=head_dim, deg=deg, d_tile=d_tile, dtype=dtype, state_dtype=state_dtype, group=group,
                     q_len=q_len, gating=gating, bh_bucket=bucket)


def select_config(key: DecodeKey, device_index: int) -> DecodeConfig:
    try:
        from vidrial import dispatch
    except ImportError:
        return family.default_config(key)
    try:
        return dispatch.select_config(family, key, dispatch.current_gpu(device_index))
    except Exception:  # a dispatch problem must never break decoding: fall back to the default
        return family.default_config(key)


_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def problem_key(Q: Any, K: Any, log_G: Any, state: Any, deg: int, d_tile: int) -> DecodeKey:
    """The dispatch key of a step (b*h bucketed to a power of two); the tuner's make_inputs must
    produce inputs whose key is the key it tunes."""
    b, tq, hq, d = Q.shape
    L = 0 if K is None else K.shape[1]
    h = state.shape[1] if state is not None else K.shape[2]
    sdt = _DTYPES[str(state.dtype)] if state is not None else "fp32"
    return _key(d, deg, d_tile, _DTYPES[str(Q.dtype)], sdt, hq // h, tq, log_G is not None and L > 0,
                _pow2_bucket(b * h))


def prepare(Q, K, V, log_G, state, sum_of_keys, *, deg: int, d_tile: int | None, scale: float | None,
            config: DecodeConfig | None = None, arch: str | None = None):
    """Everything a launch needs, without launching: (key, config, grid, block, args, Y, (ws, counters)).
    `arch` None: the device's. Shared by decode_step and the CPU execution test of the kernel."""
    import torch

    b, tq, hq, d = Q.shape
    h = state.shape[1] if state is not None else K.shape[2]
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    if not scale:
        scale = 1.0 / math.sqrt(d)
    L = 0 if K is None else K.shape[1]
    gating = log_G is not None and L > 0
    bh = b * h
    key = problem_key(Q, K, log_G, state, deg, d_tile)
    if config is None:
        dev = Q.device.index if Q.device.index is not None else torch.cuda.current_device()
        config = select_config(key, dev)
    ns = math.ceil(key.feature_dim / config.tile_f) if state is not None else 0
    nc = math.ceil(L / config.cache_tile) if L > 0 else 0
    if ns + nc == 0:
        raise InputError("initial_state", None, "a state or a non-empty KV cache")
    if bh > 65535:
        raise InputError("Q", f"batch*kv_heads={bh}", "at most 65535 (grid y); split the batch")
    nc_cap = _pow2_bucket(max(nc, 1))
    ws, counters = workspace(key, config, bh, nc_cap, Q.device)
    Y = torch.empty((b, tq, hq, d), dtype=Q.dtype, device=Q.device)
    table = _block_table(d, deg, d_tile, Q.device)
    qs = Q.stride()
    ks = K.stride() if L > 0 else (0, 0, 0)
    vs = V.stride() if L > 0 else (0, 0, 0)
    gs = log_G.stride() if gating else (0, 0, 0)
    ss = state.stride() if state is not None else (0, 0)
    zs = sum_of_keys.stride() if state is not None else (0, 0)
    ys = Y.stride()
    args = (Q.data_ptr(), K.data_ptr() if L > 0 else 0, V.data_ptr() if L > 0 else 0,
            log_G.data_ptr() if gating else 0, state.data_ptr() if state is not None else 0,
            sum_of_keys.data_ptr() if state is not None else 0, table.data_ptr(), Y.data_ptr(), ws.data_ptr(),
            counters.data_ptr(), h, L, ns, nc_cap, float(scale),
            qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], gs[0], gs[1], gs[2],
            ss[0], ss[1], zs[0], zs[1], ys[0], ys[1], ys[2], ws.stride(0))
    return key, config, (ns + nc, bh, 1), (family.threads_per_block(config), 1, 1), args, Y, (ws, counters)


def decode_step(Q, K, V, log_G, state, sum_of_keys, *, deg: int, d_tile: int | None, scale: float | None,
                config: DecodeConfig | None = None):
    """Y [b, tq, hq, d] (Q's dtype) of one decode step; no absorption (see vidrial.inference).

    Q [b, tq, hq, d]; K, V [b, L, h, d] (the cache including the new tokens) or None; log_G
    [b, L, h] float32 or None; state [b, h, D, d] float32/bfloat16 + sum_of_keys [b, h, D] float32
    or None. The caller (vidrial.inference.power_retention_inference) validates; this is the
    launcher (current stream, no sync, graph capturable after one warm-up call per shape)."""
    import torch

    from vidrial.core.launch import current_stream_handle

    key, config, grid, block, args, Y, _ = prepare(Q, K, V, log_G, state, sum_of_keys, deg=deg, d_tile=d_tile,
                                                   scale=scale, config=config)
    dev = Q.device.index if Q.device.index is not None else torch.cuda.current_device()
    family.launchable(key, config, _arch(dev)).launch(grid, block, args, dev, current_stream_handle(dev))
    return Y


# ---- CPU emulation of the kernel's algorithm (float64, any device) -----------------------------
def emulate_decode_step(Q, K, V, log_G, state, sum_of_keys, *, deg: int, d_tile: int | None = None,
                        scale: float | None = None, tile_f: int = 256, cache_tile: int = 64):
    """The decode kernel's algorithm step by step in float64 torch: the same split of D into
    state slices of `tile_f` rows (ungated partial numerators/denominators), the same cache tiles
    of `cache_tile` tokens with their own max shift, the same gate bookkeeping (G_pos from a
    prefix sum) and the same stabilised merge. Used by the CPU tests to prove the math against
    the float64 reference before any GPU run. Returns Y float64 [b, tq, hq, d]."""
    import torch

    from vidrial.reference.forward import phi

    f64 = torch.float64
    b, tq, hq, d = Q.shape
    L = 0 if K is None else K.shape[1]
    h = state.shape[1] if state is not None else K.shape[2]
    r = hq // h
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    if not scale:
        scale = 1.0 / math.sqrt(d)
    D = layout(d, deg, d_tile).feature_dim
    # rows of KV head hh: rho = i * r + gi  <->  Q[:, i, hh * r + gi]
    q = (scale * Q.to(f64)).reshape(b, tq, h, r, d).permute(0, 2, 1, 3, 4).reshape(b, h, tq * r, d)
    R = tq * r
    A = B = None
    if state is not None:
        S, z = state.to(f64), sum_of_keys.to(f64)
        pq = phi(q, deg, d_tile)  # [b, h, R, D]
        A = torch.zeros(b, h, R, d, dtype=f64, device=Q.device)
        B = torch.zeros(b, h, R, dtype=f64, device=Q.device)
        for f0 in range(0, D, tile_f):  # state CTAs, summed in order
            sl = slice(f0, min(D, f0 + tile_f))
            A = A + torch.einsum("bhrf,bhfe->bhre", pq[..., sl], S[:, :, sl])
            B = B + torch.einsum("bhrf,bhf->bhr", pq[..., sl], z[:, :, sl])
    if L == 0:
        Y = A / B[..., None]
    else:
        Kx, Vx = K.to(f64).permute(0, 2, 1, 3), V.to(f64).permute(0, 2, 1, 3)  # [b, h, L, d]
        G = log_G.to(f64).cumsum(1).permute(0, 2, 1) if log_G is not None else torch.zeros(b, h, L, dtype=f64)
        pos = torch.arange(tq).repeat_interleave(r) + (L - tq)  # [R] cache position of each row
        gq = G[:, :, pos]  # [b, h, R]
        parts = []
        for j0 in range(0, L, cache_tile):  # cache CTAs
            js = torch.arange(j0, min(L, j0 + cache_tile))
            x = torch.einsum("bhrd,bhjd->bhrj", q, Kx[:, :, js])
            a = deg * torch.log(x.abs() + 1e-7) + gq[..., None] - G[:, :, js][:, :, None, :]
            a = a.masked_fill(js[None, :] > pos[:, None], float("-inf"))
            m = a.amax(-1)
            w = torch.where(torch.isinf(m)[..., None], torch.zeros_like(a), torch.exp(a - m[..., None]))
            parts.append((w @ Vx[:, :, js], w.sum(-1), m))
        m = torch.stack([p[2] for p in parts]).amax(0)
        def rescale(mc, M):
            return torch.where(torch.isinf(mc), torch.zeros_like(mc), torch.exp(mc - M))
        l = sum(p[1] * rescale(p[2], m) for p in parts) + 1e-6
        if state is None:
            M, den, eA = m, l, None
        else:
            logB = torch.log(B.clamp_min(1e-30)) + gq
            M = torch.maximum(m, logB)
            eA = torch.exp(gq - M)
            den = l * torch.exp(m - M) + B * eA
        num = sum(p[0] * rescale(p[2], M)[..., None] for p in parts)
        if state is not None:
            num = num + A * eA[..., None]
        Y = num / den[..., None]
    return Y.reshape(b, h, tq, r, d).permute(0, 2, 1, 3, 4).reshape(b, tq, hq, d)
