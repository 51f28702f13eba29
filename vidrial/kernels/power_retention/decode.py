"""Fused decode step (docs/MATH.md section 5): one launch per generated token answers the new query
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
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.rules import Between, MultipleOf, OneOf, PowerOfTwo, Rule
from vidrial.core.tensors import HEAD_DIMS, InDType, dtype_name, pow2_bucket, ptr
from vidrial.kernels import register
from vidrial.kernels.power_retention.sympow import SUPPORTED_DEGREES, block_table, default_d_tile, layout

__all__ = ["DecodeConfig", "DecodeKey", "DecodeFamily", "FAMILY", "family", "decode_step", "MAX_ROWS", "workspace"]

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
    dtype: InDType = "bfloat16"
    state_dtype: Literal["float32", "bfloat16"] = "float32"
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
        return 4 if self.state_dtype == "float32" else 2


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
                    group=key.group, q_len=key.q_len, gating=key.gating, dtype=_TEMPLATE_DTYPE[key.dtype],
                    state_dtype=_TEMPLATE_DTYPE[key.state_dtype], tile_f=config.tile_f, warps=config.warps,
                    cache_tile=config.cache_tile, unroll=config.unroll, load_bytes=config.load_bytes,
                    min_ctas=config.min_ctas,
                    smem_bytes=self.dynamic_smem_bytes(key, config))

    def shape_keys(self) -> list[DecodeKey]:
        from vidrial.kernels.power_retention.standard_shapes import decode_problems, meta, unique

        return unique(self.problem_key(dict(Q=meta(p.b, 1, p.h, p.d), K=meta(p.b, 1, p.h, p.d),
                                            log_G=meta(p.b, 1, p.h, dtype="float32"),
                                            state=meta(p.b, p.h, p.feature_dim, p.d, dtype=p.state_dtype),
                                            deg=p.deg, d_tile=p.d_tile))
                      for p in decode_problems())

    def standard_keys(self) -> list[DecodeKey]:
        keys = self.shape_keys()
        for d in HEAD_DIMS:
            for sd in ("float32", "bfloat16"):
                for gating in (True, False):
                    keys.append(DecodeKey(head_dim=d, deg=2, d_tile=default_d_tile(d, 2), dtype="bfloat16",
                                          state_dtype=sd, gating=gating))
        keys.append(DecodeKey(head_dim=64, deg=2, d_tile=8, dtype="bfloat16", state_dtype="float32", group=4, gating=True))
        keys.append(DecodeKey(head_dim=64, deg=2, d_tile=16, dtype="float16", state_dtype="bfloat16", gating=True))
        keys.append(DecodeKey(head_dim=32, deg=4, d_tile=4, dtype="bfloat16", state_dtype="float32", gating=True))
        from vidrial.kernels.power_retention.standard_shapes import unique

        return unique(keys)

    def workspace_floats(self, key: DecodeKey, config: DecodeConfig, nc_cap: int) -> int:
        R, HD = key.rows, key.head_dim
        ns = math.ceil(key.feature_dim / config.tile_f)
        spart = (ns * R * (HD + 1) + 3) // 4 * 4
        total = spart + nc_cap * R * (HD + 2) + R
        return (total + 3) // 4 * 4

    # ---- launch path (vidrial.inference validates the inputs) --------------------------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """Q [b,tq,hq,d]; K, V [b,L,h,d] (the cache including the new tokens) or None; log_G [b,L,h]
        fp32 or None; state [b,h,D,d] fp32/bf16 + sum_of_keys [b,h,D] fp32 or None; deg, d_tile
        (None: the default), scale (None/0: 1/sqrt(d))."""
        Q, K, state = x["Q"], x.get("K"), x.get("state")
        d = Q.shape[-1]
        L = 0 if K is None else K.shape[1]
        if state is None and L == 0:
            raise InputError("initial_state", None, "a state or a non-empty KV cache")
        h = state.shape[1] if state is not None else K.shape[2]
        if Q.shape[0] * h > 65535:
            raise InputError("Q", f"batch*kv_heads={Q.shape[0] * h}", "at most 65535 (grid y); split the batch")
        d_tile = x.get("d_tile") or default_d_tile(d, x["deg"])
        return dict(x, K=K if L else None, V=x.get("V") if L else None, log_G=x.get("log_G") if L else None,
                    state=state, sum_of_keys=x.get("sum_of_keys"), d_tile=d_tile,
                    scale=float(x.get("scale") or 1.0 / math.sqrt(d)))

    def problem_key(self, x: dict[str, Any]) -> DecodeKey:
        """b*h bucketed to a power of two (the tuner's make_inputs must give the key it tunes)."""
        Q, K, state = x["Q"], x.get("K"), x.get("state")
        b, tq, hq, d = Q.shape
        h = state.shape[1] if state is not None else K.shape[2]
        cached = K is not None and K.shape[1] > 0
        sdt = dtype_name(state.dtype) if state is not None else "float32"
        return _key(d, x["deg"], x["d_tile"], dtype_name(Q.dtype), sdt, hq // h, tq,
                    x.get("log_G") is not None and cached, pow2_bucket(b * h))

    def outputs(self, key: DecodeKey, config: DecodeConfig, x: dict[str, Any]) -> dict[str, Any]:
        import torch

        return {"Y": torch.empty(x["Q"].shape, dtype=x["Q"].dtype, device=x["Q"].device)}

    def launches(self, key: DecodeKey, config: DecodeConfig, x: dict[str, Any], out: dict[str, Any]):
        Q, K, V, G, S, z, Y = x["Q"], x["K"], x["V"], x["log_G"], x["state"], x["sum_of_keys"], out["Y"]
        b, h = Q.shape[0], S.shape[1] if S is not None else K.shape[2]
        L = 0 if K is None else K.shape[1]
        ns = math.ceil(key.feature_dim / config.tile_f) if S is not None else 0
        nc = math.ceil(L / config.cache_tile)
        nc_cap = pow2_bucket(nc)
        ws, counters = workspace(key, config, b * h, nc_cap, Q.device)
        table = block_table(key.head_dim, key.deg, key.d_tile, Q.device)
        strides = lambda t, n: t.stride()[:n] if t is not None else (0,) * n  # noqa: E731
        yield Launch((ns + nc, b * h, 1),
                     (Q.data_ptr(), ptr(K), ptr(V), ptr(G), ptr(S), ptr(z), table.data_ptr(), Y.data_ptr(),
                      ws.data_ptr(), counters.data_ptr(), h, L, ns, nc_cap, x["scale"], *Q.stride()[:3],
                      *strides(K, 3), *strides(V, 3), *strides(G, 3), *strides(S, 2), *strides(z, 2),
                      *Y.stride()[:3], ws.stride(0)))

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
        dt, sdt = getattr(torch, key.dtype), getattr(torch, key.state_dtype)

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
        return self.problem_key(dict(inputs, deg=key.deg, d_tile=key.d_tile))

    def run(self, key: DecodeKey, config: DecodeConfig, inputs: dict[str, Any]) -> Any:
        return decode_step(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], inputs["state"],
                           inputs["sum_of_keys"], deg=key.deg, d_tile=key.d_tile, scale=None, config=config)

    def reference(self, key: DecodeKey, inputs: dict[str, Any]) -> Any:
        from vidrial.reference.forward import power_retention_inference_reference

        Y, _, _ = power_retention_inference_reference(
            inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], inputs["state"].double(),
            inputs["sum_of_keys"].double(), deg=key.deg, scale=None, switch_over_seq_len=None, d_tile=key.d_tile)
        return Y.to(inputs["Q"].dtype)


FAMILY = family = register(DecodeFamily())
# the spellings the template tests (`dtype == 'fp16'`, `state_dtype == 'fp32'`)
_TEMPLATE_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@cache
def _key(head_dim, deg, d_tile, dtype, state_dtype, group, q_len, gating, bucket) -> DecodeKey:
    return DecodeKey(head_dim=head_dim, deg=deg, d_tile=d_tile, dtype=dtype, state_dtype=state_dtype, group=group,
                     q_len=q_len, gating=gating, bh_bucket=bucket)


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


def decode_step(Q, K, V, log_G, state, sum_of_keys, *, deg: int, d_tile: int | None, scale: float | None,
                config: DecodeConfig | None = None):
    """Y [b, tq, hq, d] (Q's dtype) of one decode step; no absorption (see vidrial.inference).

    Q [b, tq, hq, d]; K, V [b, L, h, d] (the cache including the new tokens) or None; log_G
    [b, L, h] float32 or None; state [b, h, D, d] float32/bfloat16 + sum_of_keys [b, h, D] float32
    or None. The caller (vidrial.inference.power_retention_inference) validates; this is the
    launcher (current stream, no sync, graph capturable after one warm-up call per shape)."""
    return family(config, Q=Q, K=K, V=V, log_G=log_G, state=state, sum_of_keys=sum_of_keys, deg=deg, d_tile=d_tile,
                  scale=scale)["Y"]
