"""query_state backward (MATH.md section 4): two passes of one template.

``stage="rows"`` (CTA = 32 query rows of one batch, query head, chunk): with q~ = q exp(g/p),
B = s^p phi(q~).sbar_nu, the stabiliser M = max(m, log B), Den = l e^(m-M) + B e^-M:

    dAh = dY/Den, dBh = -(dY.Y)/Den, dO = dAh e^(m-M), dl = dBh e^(m-M), qh = q exp((g-M)/p)
    dphi = s^p (Sbar_nu dAh + sbar_nu dBh),  dq = chain(qh, dphi) exp((g-M)/p)
    dg_row = phi(qh).dphi + dO.O + dl (l - 1e-6)

``stage="state"`` (CTA = one feature tile of one batch, KV head, chunk; sums the r query heads):
    dSbar_nu = s^p sum_rows phi(qh) dAh^T,  dsbar_nu = s^p sum_rows phi(qh) dBh.

phi is formed tile by tile in shared memory, never written. The GEMMs run in fp32 on the CUDA cores,
or with ``mma=True`` on the tensor cores (mma.sync m16n8k8 tf32, fp32 accumulate).

The state pass has a second, opt-in implementation on the forward update_state kernel
(``state_impl="update_state"``, qs_bwd_state_update.py; CPU-verified, not yet on a GPU).
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vidrial.core.config import ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily
from vidrial.kernels import register
from vidrial.kernels.power_retention._bwd_util import (
    launchable,
    pick,
    stream_of,
    ROWS,
    RowLoopConfig,
    check_row_loop,
    ptr,
    row_loop_geometry,
    row_loop_smem_floats,
)
from vidrial.kernels.power_retention._fwd_util import DTYPE_NAMES, block_table, compile_key, pow2_bucket

__all__ = ["QueryStateBwdConfig", "QueryStateBwdKey", "FAMILY", "query_state_bwd", "state_pass_kernel",
           "STATE_IMPLS"]

STATE_IMPLS = ("kernel", "update_state")
# The state pass query_state_bwd runs when the caller does not choose: "kernel" (this family's state
# stage, GPU-verified) or "update_state" (the forward update_state kernel + a moment GEMM; CPU-verified
# only, hence opt-in: VIDRIAL_QS_BWD_STATE=update_state, or set this attribute).
STATE_IMPL_DEFAULT = os.environ.get("VIDRIAL_QS_BWD_STATE", "kernel")


class QueryStateBwdConfig(RowLoopConfig):
    pass


class QueryStateBwdKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "d_tile", "dtype", "stage")
    head_dim: int = 64
    deg: int = 2
    d_tile: int = 8
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    stage: Literal["rows", "state"] = "rows"
    tokens: int = Field(65536, description="bucket (power of two) of batch * time * query heads")

    @model_validator(mode="after")
    def _valid(self):
        from vidrial.kernels.power_retention.sympow import layout

        layout(self.head_dim, self.deg, self.d_tile)
        if self.head_dim % 32 or not 32 <= self.head_dim <= 256:
            raise ConfigError("head_dim", self.head_dim, "a multiple of 32 between 32 and 256")
        return self


def _state_smem_floats(d: int, F: int, rows: int) -> int:
    """S_PHI + F * SPS of the state pass (templates/query_state_bwd.cu.j2)."""
    return -(-(rows * (d + 1)) // 4) * 4 + rows * (d + 8) + rows + F * (rows + 4)


class QueryStateBwdFamily(KernelFamily[QueryStateBwdKey, QueryStateBwdConfig]):
    name = "query_state_bwd"
    template = "query_state_bwd.cu.j2"
    Config = QueryStateBwdConfig
    Key = QueryStateBwdKey
    # rows: 17 pointers + 8 ints + f32; state: 7 pointers + 6 ints + f32 (one signature per stage)
    signature = ("ptr",) * 17 + ("i32",) * 8 + ("f32",)
    state_signature = ("ptr",) * 7 + ("i32",) * 6 + ("f32",)

    def default_config(self, key: QueryStateBwdKey) -> QueryStateBwdConfig:
        from vidrial.kernels.power_retention.sympow import layout

        bs = layout(key.head_dim, key.deg, key.d_tile).block_size
        if key.stage == "state":
            from vidrial.kernels.power_retention import _bwd_util

            return QueryStateBwdConfig(tile_f=64 if key.head_dim <= 64 else 32, warps=8, rows_per_lane=2,
                                       mma=_bwd_util.MMA_DEFAULT)
        cfg = QueryStateBwdConfig(tile_f=max(64, min(bs, 256)), warps=8, rows_per_lane=2 if bs <= 64 else 1)
        from vidrial.kernels.power_retention import _bwd_util

        if _bwd_util.MMA_DEFAULT:
            mma = cfg.model_copy(update={"mma": True})
            try:
                check_row_loop(key.head_dim, key.deg, key.d_tile, mma)
                return mma
            except ConfigError:
                pass
        return cfg

    def render_context(self, key: QueryStateBwdKey, config: QueryStateBwdConfig) -> dict[str, Any]:
        geo = row_loop_geometry(key.head_dim, key.deg, key.d_tile, config)
        return dict(head_dim=key.head_dim, deg=key.deg, d_tile=key.d_tile, n_blocks=geo["n_blocks"],
                    blocks_per_tile=geo["blocks_per_tile"], warps=config.warps, rows_per_lane=config.rows_per_lane,
                    min_ctas=1 if config.rows_per_lane == 2 else 2,  # registers: 255 (no spills) / 128
                    mma=config.mma,
                    in_type=DTYPE_NAMES[key.dtype],
                    state_tile_f=config.tile_f, pass_=key.stage, key_label=key.label(), config_label=config.label())

    def threads_per_block(self, config: QueryStateBwdConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: QueryStateBwdKey, config: QueryStateBwdConfig) -> int:
        geo = row_loop_geometry(key.head_dim, key.deg, key.d_tile, config)
        if key.stage == "state":
            return 4 * _state_smem_floats(key.head_dim, config.tile_f, config.rows)
        return 4 * (row_loop_smem_floats(key.head_dim, geo["F"], config.warps, config.rows) + 6 * config.rows)

    def check(self, key: QueryStateBwdKey, config: QueryStateBwdConfig, arch: str) -> None:
        if key.stage == "state":
            if config.mma and (config.tile_f % 16 or (config.tile_f // 16) * (key.head_dim // 8) % config.warps):
                raise ConfigError("mma", True, f"tensor-core tiling needs tile_f % 16 == 0 and the 16x8 tiles "
                                               f"divided evenly over warps={config.warps}")
            acc = config.tile_f // config.warps * (key.head_dim // 32)
            if acc > 16:
                raise ConfigError("tile_f", config.tile_f,
                                  f"{acc} accumulators per thread (tile_f/warps x d/32) exceed 16; "
                                  "use more warps or a smaller tile_f")
        else:
            check_row_loop(key.head_dim, key.deg, key.d_tile, config)
        super().check(key, config, arch)

    def standard_keys(self) -> list[QueryStateBwdKey]:
        from vidrial.kernels.power_retention.sympow import default_d_tile

        return [QueryStateBwdKey(head_dim=d, deg=p, d_tile=default_d_tile(d, p), dtype=dt, stage=st)
                for d, p in ((32, 2), (64, 2), (128, 2), (32, 4)) for dt in ("bfloat16", "float16")
                for st in ("rows", "state")]

    def corner_configs(self, key: QueryStateBwdKey) -> list[QueryStateBwdConfig]:
        out = [self.default_config(key)]
        for cfg in (QueryStateBwdConfig(tile_f=32, warps=4, rows_per_lane=1), self.default_config(key).model_copy(update={"mma": True})):
            try:
                self.check(key, cfg, "sm_80")
                out.append(cfg)
            except ConfigError:
                pass
        return out

    def launchable(self, key, config, arch):
        from vidrial.core.arch import normalize_arch
        from vidrial.core.launch import LaunchableKernel

        memo_key = (key, config, arch)
        kernel = self._launchables.get(memo_key)
        if kernel is None:
            arch = normalize_arch(arch)
            sig = self.signature if key.stage == "rows" else self.state_signature
            kernel = LaunchableKernel(self.compile(key, config, arch), sig, self.dynamic_smem_bytes(key, config))
            self._launchables[memo_key] = kernel
        return kernel


FAMILY = register(QueryStateBwdFamily())


def state_ftiles(D: int, config: QueryStateBwdConfig) -> int:
    """CTAs per (batch, KV head, chunk) of the state pass: features in tiles of tile_f."""
    return -(-D // config.tile_f)


def state_pass_kernel(Q, qscale, dAh, dBh, h: int, *, deg: int, d_tile: int, scale: float, chunk_size: int,
                      config: QueryStateBwdConfig | None = None):
    """The state stage of this family: dSbar [b,n,h,D,d], dsbar [b,n,h,D] (fp32) from the rows pass's
    Q [b,t,hq,d], qscale [b,t,hq] (fp32), dAh [b,t,hq,d] (fp32), dBh [b,t,hq] (fp32), all contiguous."""
    import torch

    b, t, hq, d = Q.shape
    c = int(chunk_size)
    n, r = t // c, hq // h
    dev = Q.device
    key = QueryStateBwdKey(head_dim=d, deg=deg, d_tile=d_tile, dtype=str(Q.dtype).replace("torch.", ""),
                           stage="state", tokens=pow2_bucket(b * t * hq))
    if config is None:
        config = pick(FAMILY, key, dev)
    D = row_loop_geometry(d, deg, d_tile, RowLoopConfig())["D"]
    dSbar = torch.empty(b, n, h, D, d, device=dev, dtype=torch.float32)
    dsbar = torch.empty(b, n, h, D, device=dev, dtype=torch.float32)
    if Q.numel() == 0:
        return dSbar, dsbar
    ftiles = state_ftiles(D, config)
    ks = launchable(FAMILY, compile_key(key), config, dev)
    ks.launch((b * h * n * ftiles, 1, 1), (config.warps * 32, 1, 1),
              (Q.data_ptr(), qscale.data_ptr(), dAh.data_ptr(), dBh.data_ptr(),
               block_table(d, deg, d_tile, dev).data_ptr(), dSbar.data_ptr(), dsbar.data_ptr(), t, n, c, hq, r,
               ftiles, float(scale) ** deg),
              dev.index, stream_of(dev))
    return dSbar, dsbar


def _state_impl(state_impl: str | None) -> str:
    impl = STATE_IMPL_DEFAULT if state_impl is None else state_impl
    if impl not in STATE_IMPLS:
        where = "state_impl" if state_impl is not None else "VIDRIAL_QS_BWD_STATE"
        raise InputError(where, repr(impl), f"one of {STATE_IMPLS}")
    return impl


def query_state_bwd(Q, G, Sbar16, sbar, O, l, m, Y, dY, *, deg: int, d_tile: int, scale: float, chunk_size: int,
                    config=None, state_config=None, state_impl: str | None = None):
    """Both passes. Q, Y, dY [b,t,hq,d] bf16/fp16 (t a multiple of chunk_size), G [b,t,h] fp32 chunk-local
    cumulative log gates or None, Sbar16 [b,n',h,D,d] bf16 (n' >= n: states at the start of each chunk),
    sbar [b,n'',h,D] fp32, O [b,t,hq,d], l, m [b,t,hq] fp32 (intra-chunk attention, merge mode).
    Returns dict dQ, dO, dAh [b,t,hq,d], dl, dBh, qscale, dg [b,t,hq], dSbar [b,n,h,D,d], dsbar [b,n,h,D]
    (all fp32). state_impl: "kernel" or "update_state" (None: STATE_IMPL_DEFAULT); state_config is
    the chosen state pass's config (QueryStateBwdConfig / UpdateStateConfig). Current stream, no host sync."""
    import torch

    b, t, hq, d = Q.shape
    h = Sbar16.shape[2]
    c = int(chunk_size)
    if t % c:
        raise InputError("Q", tuple(Q.shape), f"a time length that is a multiple of chunk_size={c}")
    n = t // c
    r = hq // h
    impl = _state_impl(state_impl)
    if impl == "update_state":
        from vidrial.kernels.power_retention.qs_bwd_state_update import check_supported

        check_supported(d, r, c)
    geo0 = row_loop_geometry(d, deg, d_tile, RowLoopConfig())
    D = geo0["D"]
    if Sbar16.dtype != torch.bfloat16 or Sbar16.shape[1] < n or tuple(Sbar16.shape[3:]) != (D, d):
        raise InputError("Sbar16", (tuple(Sbar16.shape), str(Sbar16.dtype)), f"bfloat16 [{b}, >={n}, {h}, {D}, {d}]")
    dt = str(Q.dtype).replace("torch.", "")
    key_r = QueryStateBwdKey(head_dim=d, deg=deg, d_tile=d_tile, dtype=dt, stage="rows", tokens=pow2_bucket(b * t * hq))
    dev = Q.device
    if config is None:
        config = pick(FAMILY, key_r, dev)
    Q, Y, dY, O, l, m = (x.contiguous() for x in (Q, Y, dY, O, l, m))
    Sbar16, sbar = Sbar16.contiguous(), sbar.contiguous()
    G = G.contiguous() if G is not None else None
    f32 = dict(device=dev, dtype=torch.float32)
    out = dict(dQ=torch.empty(b, t, hq, d, **f32), dO=torch.empty(b, t, hq, d, **f32),
               dAh=torch.empty(b, t, hq, d, **f32), dl=torch.empty(b, t, hq, **f32), dBh=torch.empty(b, t, hq, **f32),
               qscale=torch.empty(b, t, hq, **f32), dg=torch.empty(b, t, hq, **f32))
    if Q.numel() == 0:
        out.update(dSbar=torch.empty(b, n, h, D, d, **f32), dsbar=torch.empty(b, n, h, D, **f32))
        return out
    table = block_table(d, deg, d_tile, dev)
    sp = float(scale) ** deg
    rt = -(-c // config.rows)
    kr = launchable(FAMILY, compile_key(key_r), config, dev)
    kr.launch((b * hq * n * rt, 1, 1), (config.warps * 32, 1, 1),
              (Q.data_ptr(), ptr(G), Sbar16.data_ptr(), sbar.data_ptr(), O.data_ptr(), l.data_ptr(), m.data_ptr(),
               Y.data_ptr(), dY.data_ptr(), table.data_ptr(), out["dQ"].data_ptr(), out["dO"].data_ptr(),
               out["dl"].data_ptr(), out["dAh"].data_ptr(), out["dBh"].data_ptr(), out["qscale"].data_ptr(),
               out["dg"].data_ptr(), t, n, c, hq, r, Sbar16.shape[1], sbar.shape[1], rt, sp),
              dev.index, stream_of(dev))
    if impl == "update_state":
        from vidrial.kernels.power_retention.qs_bwd_state_update import state_pass_update_state as state_pass
    else:
        state_pass = state_pass_kernel
    out["dSbar"], out["dsbar"] = state_pass(Q, out["qscale"], out["dAh"], out["dBh"], h, deg=deg, d_tile=d_tile,
                                            scale=scale, chunk_size=c, config=state_config)
    return out
