"""intra-chunk attention backward (MATH.md section 4), flash style with the forward's saved m.

Inside each chunk (the quadratic path: one chunk of the whole sequence), j <= i:

    x = s q_i.k_j,  P = (|x| + 1e-7)^p e^(g_i - g_j - m_i),  dP = dO_i.v_j + dl_i
    dv_j += P dO_i,  ds = s p sign(x) (|x|+1e-7)^(p-1) e^(g_i-g_j-m_i) dP,  dq_i += ds k_j,
    dk_j += ds q_i,  dg_j -= P dP

(dO, dl: gradients w.r.t. the shifted O, l from the query_state backward; m is a constant because
O e^m and l e^m do not depend on it). Two passes of one template: ``stage="dkv"`` (key-stationary,
loops over the r query heads: GQA sums without atomics) and ``stage="dq"`` (query-stationary).
fp32 SIMT, P recomputed in each pass.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily
from vidrial.kernels import register
from vidrial.kernels.power_retention._bwd_util import launchable, pick, ptr, stream_of
from vidrial.kernels.power_retention._fwd_util import DTYPE_NAMES, compile_key, pow2_bucket

__all__ = ["IntraBwdConfig", "IntraBwdKey", "FAMILY", "intra_chunk_attention_bwd"]


class IntraBwdConfig(KernelConfig):
    tile: int = Field(64, description="queries and keys per tile (256 threads, (tile/16)^2 scores per thread)")
    mma: bool = Field(False, description="the five GEMMs on tensor cores (mma.sync m16n8k8 tf32)")

    @model_validator(mode="after")
    def _valid(self):
        if self.tile not in (32, 64):
            raise ConfigError("tile", self.tile, "32 or 64")
        return self


class IntraBwdKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "dtype", "stage")
    head_dim: int = 64
    deg: int = 2
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    stage: Literal["dkv", "dq"] = "dkv"
    chunk_size: int = Field(1024, description="bucket (power of two) of the chunk size")
    tokens: int = Field(65536, description="bucket (power of two) of batch * time * heads")

    @model_validator(mode="after")
    def _valid(self):
        if self.head_dim % 16 or not 16 <= self.head_dim <= 256:
            raise ConfigError("head_dim", self.head_dim, "a multiple of 16 between 16 and 256")
        if self.deg not in (2, 4):
            raise ConfigError("deg", self.deg, "2 or 4")
        return self


def _smem_floats(d: int, tile: int) -> int:
    return 4 * tile * (d + 4) + 3 * tile * (tile + 4) + 4 * tile + 16 * tile


class IntraBwdFamily(KernelFamily[IntraBwdKey, IntraBwdConfig]):
    name = "intra_chunk_attention_bwd"
    template = "intra_chunk_attention_bwd.cu.j2"
    Config = IntraBwdConfig
    Key = IntraBwdKey
    signature = ("ptr",) * 11 + ("i32",) * 6 + ("f32",)

    def default_config(self, key: IntraBwdKey) -> IntraBwdConfig:
        from vidrial.kernels.power_retention import _bwd_util

        return IntraBwdConfig(tile=64 if key.head_dim <= 64 else 32, mma=_bwd_util.MMA_DEFAULT)

    def render_context(self, key: IntraBwdKey, config: IntraBwdConfig) -> dict[str, Any]:
        # 64-tiles: 1 CTA per SM minimum (registers up to 255: no spills); 32-tiles: 2
        return dict(head_dim=key.head_dim, deg=key.deg, tile=config.tile, in_type=DTYPE_NAMES[key.dtype],
                    min_ctas=1 if config.tile == 64 else 2, mma=config.mma,
                    pass_=key.stage, key_label=key.label(), config_label=config.label())

    def threads_per_block(self, config: IntraBwdConfig) -> int:
        return 256

    def dynamic_smem_bytes(self, key: IntraBwdKey, config: IntraBwdConfig) -> int:
        return 4 * _smem_floats(key.head_dim, config.tile)

    def check(self, key: IntraBwdKey, config: IntraBwdConfig, arch: str) -> None:
        acc = (config.tile // 16) * (key.head_dim // 16) * (2 if key.stage == "dkv" else 1)
        if acc > 64:
            raise ConfigError("tile", config.tile, f"{acc} accumulators per thread exceed 64 for head_dim="
                                                   f"{key.head_dim}; use tile=32")
        super().check(key, config, arch)

    def standard_keys(self) -> list[IntraBwdKey]:
        return [IntraBwdKey(head_dim=d, deg=p, dtype=dt, stage=st)
                for d, p in ((32, 2), (64, 2), (128, 2), (32, 4)) for dt in ("bfloat16", "float16")
                for st in ("dkv", "dq")]

    def corner_configs(self, key: IntraBwdKey) -> list[IntraBwdConfig]:
        out = []
        for cfg in (self.default_config(key), IntraBwdConfig(tile=32), IntraBwdConfig(tile=64),
                    self.default_config(key).model_copy(update={"mma": True})):
            try:
                self.check(key, cfg, "sm_80")
                out.append(cfg)
            except ConfigError:
                pass
        return list(dict.fromkeys(out))


FAMILY = register(IntraBwdFamily())


def intra_chunk_attention_bwd(Q, K, V, G, m, dO, dl, *, deg: int, scale: float, chunk_size: int | None,
                              want_dg: bool = True, config=None, dq_config=None):
    """Q [b,t,hq,d], K, V [b,t,h,d] bf16/fp16; G [b,t,h] fp32 cumulative log gates (chunk-local; global for
    chunk_size None) or None; m, dl [b,t,hq], dO [b,t,hq,d] fp32. t need not be a multiple of the chunk.
    Returns dQ [b,t,hq,d], dK, dV [b,t,h,d], dgcol [b,t,h] (or None) fp32. Current stream, no host sync."""
    import torch

    b, t, hq, d = Q.shape
    h = K.shape[2]
    if h < 1 or hq % h:
        raise InputError("Q", tuple(Q.shape), f"query heads a multiple of the KV heads {h}")
    r = hq // h
    c = int(chunk_size) if chunk_size else t
    n = -(-t // c) if t else 0
    dt = str(Q.dtype).replace("torch.", "")
    key_kv = IntraBwdKey(head_dim=d, deg=deg, dtype=dt, stage="dkv", chunk_size=pow2_bucket(c),
                         tokens=pow2_bucket(b * t * hq))
    key_q = key_kv.model_copy(update={"stage": "dq"})
    dev = Q.device
    if config is None:
        config = pick(FAMILY, key_kv, dev)
    if dq_config is None:
        dq_config = pick(FAMILY, key_q, dev)
    Q, K, V, m, dO, dl = (x.contiguous() for x in (Q, K, V, m, dO, dl))
    G = G.contiguous() if G is not None else None
    f32 = dict(device=dev, dtype=torch.float32)
    dQ = torch.empty(b, t, hq, d, **f32)
    dK = torch.empty(b, t, h, d, **f32)
    dV = torch.empty(b, t, h, d, **f32)
    dg = torch.empty(b, t, h, **f32) if (want_dg and G is not None) else None
    if Q.numel() == 0:
        return dQ, dK, dV, dg
    for key, cfg, heads in ((key_kv, config, h), (key_q, dq_config, hq)):
        tiles = -(-c // cfg.tile)
        grid = b * heads * n * tiles
        if grid >= 2**31:
            raise InputError("Q", tuple(Q.shape), "fewer than 2^31 tiles")
        kernel = launchable(FAMILY, compile_key(key), cfg, dev)
        kernel.launch((grid, 1, 1), (256, 1, 1),
                      (Q.data_ptr(), K.data_ptr(), V.data_ptr(), ptr(G), m.data_ptr(), dO.data_ptr(), dl.data_ptr(),
                       dQ.data_ptr(), dK.data_ptr(), dV.data_ptr(), ptr(dg), t, n, c, hq, r, tiles, float(scale)),
                      dev.index, stream_of(dev))
    return dQ, dK, dV, dg
