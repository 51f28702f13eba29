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

``impl="mma16"`` (rows pass only; the default, GPU-verified on the H200) runs the rows pass as one
loop over the features (bwd_emulation.qs_bwd_rows_mma16): dphi' = Sbar dY - (dY.Y) sbar on bf16 tensor
cores (mma.sync m16n8k16, dY's fragments in registers, Sbar tiles by cp.async) and the sympow chain rule
on the CUDA cores, one row per thread (templates/common/feature_bwd.cuh); CTA = 32 * warps rows.

The state pass has a second implementation on the forward update_state kernel (``state_impl="update_state"``,
qs_bwd_state_update.py; the default where it applies, GPU-verified on the H200).
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
    RowLoopConfig,
    SliceCheck,
    check_row_loop,
    ptr,
    row_loop_context,
    row_loop_geometry,
    row_loop_smem_floats,
)
from vidrial.kernels.power_retention._feature_bwd import (
    MMA16_TILE_F,  # noqa: F401  (re-exported: the rows pass's choices)
    MMA16_WARPS,  # noqa: F401
    Mma16Config,
    default_for,
    check_layout,
    padded_row,
    scratch_floats,
    state_tile_floats,
)
from vidrial.kernels.power_retention._fwd_util import DTYPE_NAMES, block_table, compile_key, pow2_bucket

__all__ = ["QueryStateBwdConfig", "QueryStateBwdKey", "FAMILY", "query_state_bwd", "query_state_bwd_rows",
           "query_state_bwd_state", "state_pass_kernel", "mma16_config", "STATE_IMPLS"]




# The rows pass's default implementation: "mma16" (bf16 tensor cores; GPU-verified on the H200 2026-11-28,
# 1.26 ms vs 12.8 ms for the row loop at shape A); "rowloop" where mma16's check rejects the key.
ROWS_IMPL_DEFAULT = "mma16"


STATE_IMPLS = ("kernel", "update_state")
# The state pass query_state_bwd runs when the caller does not choose: "update_state" (the forward
# update_state kernel + a moment GEMM; 1.2 ms vs 21 ms for "kernel" at shape A on the H200, GPU-verified
# 2026-11-28), falling back to "kernel" (this family's state stage) where update_state cannot run the
# problem. VIDRIAL_QS_BWD_STATE=kernel (or this attribute) chooses the state stage everywhere.
STATE_IMPL_DEFAULT = os.environ.get("VIDRIAL_QS_BWD_STATE", "update_state")


class QueryStateBwdConfig(Mma16Config):
    """impl applies to the rows pass; the state pass is always 'rowloop'."""


def mma16_config(key: "QueryStateBwdKey") -> QueryStateBwdConfig:
    """The tensor-core rows pass's default tiles for `key` (2 warps at head_dim 128: fits sm_80)."""
    return QueryStateBwdConfig(impl="mma16", warps=4 if key.head_dim <= 64 else 2, tile_f=64, stages=2)


def mma16_smem_bytes(head_dim: int, config: QueryStateBwdConfig) -> int:
    """Dynamic shared memory of templates/query_state_bwd_mma16.cu.j2 (its static_assert checks it):
    state tiles | q rows (16-bit) | u rows (fp32, stride d+4) | per-warp scratch | 5 row scalars."""
    rows = 32 * config.warps
    floats = (state_tile_floats(head_dim, config.tile_f, config.stages) + rows * padded_row(head_dim) // 2
              + rows * (head_dim + 4) + config.warps * scratch_floats(head_dim) + 5 * rows)
    return 4 * floats


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


# the row pass's outputs in the order of bwd_emulation.qs_bwd_rows (what run() returns for stage "rows")
ROW_OUTPUTS = ("dQ", "dO", "dl", "dAh", "dBh", "qscale", "dg")


def _state_smem_floats(d: int, F: int, rows: int) -> int:
    """S_PHI + F * SPS of the state pass (templates/query_state_bwd.cu.j2)."""
    return -(-(rows * (d + 1)) // 4) * 4 + rows * (d + 8) + rows + F * (rows + 4)


class QueryStateBwdFamily(SliceCheck, KernelFamily[QueryStateBwdKey, QueryStateBwdConfig]):
    name = "query_state_bwd"
    template = "query_state_bwd.cu.j2"
    Config = QueryStateBwdConfig
    Key = QueryStateBwdKey
    # rows: 17 pointers + 8 ints + f32; state: 7 pointers + 6 ints + f32 (one signature per stage)
    signature = ("ptr",) * 17 + ("i32",) * 8 + ("f32",)
    state_signature = ("ptr",) * 7 + ("i32",) * 6 + ("f32",)

    def default_config(self, key: QueryStateBwdKey) -> QueryStateBwdConfig:
        if key.stage == "state":
            from vidrial.kernels.power_retention import _bwd_util

            return QueryStateBwdConfig(tile_f=64 if key.head_dim <= 64 else 32, warps=8, rows_per_lane=2,
                                       mma=_bwd_util.MMA_DEFAULT)
        return default_for(self, key, ROWS_IMPL_DEFAULT, mma16_config(key))

    def render_context(self, key: QueryStateBwdKey, config: QueryStateBwdConfig) -> dict[str, Any]:
        if config.impl == "mma16":
            from vidrial.kernels.power_retention.sympow import layout

            return dict(impl="mma16", pass_=key.stage, head_dim=key.head_dim, deg=key.deg, d_tile=key.d_tile,
                        n_blocks=layout(key.head_dim, key.deg, key.d_tile).n_blocks, warps=config.warps,
                        tile_f=config.tile_f, stages=config.stages, in_type=DTYPE_NAMES[key.dtype],
                        smem_bytes=mma16_smem_bytes(key.head_dim, config), key_label=key.label(),
                        config_label=config.label())
        return row_loop_context(key, config) | dict(state_tile_f=config.tile_f, pass_=key.stage, impl="rowloop")

    def threads_per_block(self, config: QueryStateBwdConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: QueryStateBwdKey, config: QueryStateBwdConfig) -> int:
        if config.impl == "mma16":
            return mma16_smem_bytes(key.head_dim, config)
        geo = row_loop_geometry(key.head_dim, key.deg, key.d_tile, config)
        if key.stage == "state":
            return 4 * _state_smem_floats(key.head_dim, config.tile_f, config.rows)
        return 4 * (row_loop_smem_floats(key.head_dim, geo["F"], config.warps, config.rows) + 6 * config.rows)

    def check(self, key: QueryStateBwdKey, config: QueryStateBwdConfig, arch: str) -> None:
        config.check_fields()  # again: model_copy(update=...) skips the validators
        if config.impl == "mma16":
            if key.stage != "rows":
                raise ConfigError("impl", "mma16", "the rows pass only (stage='rows'); the state pass is 'rowloop'")
            check_layout(key.head_dim, key.d_tile, "impl", "mma16")
        elif key.stage == "state":
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

    def shape_keys(self, dtype: str = "bfloat16") -> list[QueryStateBwdKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        return unique(k for p in training_problems() for k in _keys(meta(p.b, p.t, p.h, p.d, dtype=dtype), p.deg,
                                                                     p.d_tile))

    def standard_keys(self) -> list[QueryStateBwdKey]:
        return self.shape_keys() + self.shape_keys("float16")

    def corner_configs(self, key: QueryStateBwdKey) -> list[QueryStateBwdConfig]:
        out = [self.default_config(key)]
        mma16 = [mma16_config(key), QueryStateBwdConfig(impl="mma16", warps=2, tile_f=128, stages=4),
                 QueryStateBwdConfig(impl="mma16", warps=8, tile_f=64, stages=2)]
        for cfg in (QueryStateBwdConfig(tile_f=32, warps=4, rows_per_lane=1),
                    self.default_config(key).model_copy(update={"mma": True}), *mma16):
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

    # ---- tuner protocol (shared pieces and the checked slice: bwd_tuning.py) ----------------------
    def make_inputs(self, key: QueryStateBwdKey, device: Any, seed: int) -> dict[str, Any]:
        """b = 1, `key.tokens` split into up to 8 heads (no GQA) of chunks of TUNE_CHUNK[deg].
        rows: bwd_tuning.query_state_problem (states, (O, l, m) and Y as the forward leaves them).
        state: the row pass's outputs at their typical size, qscale = exp((g - M)/p) with a row shift
        M in [1, 3), Gaussian dAh, dBh (the pass is linear in them)."""
        from vidrial.kernels.power_retention import bwd_tuning as bt

        t, h, c = bt.split_tokens(key.tokens, bt.TUNE_CHUNK[key.deg])
        d, dt = key.head_dim, bt.DTYPES[key.dtype]
        if key.stage == "rows":
            return bt.query_state_problem(t=t, hq=h, h=h, d=d, deg=key.deg, d_tile=key.d_tile, c=c, dtype=dt,
                                          device=device, seed=seed)
        gen = bt.generator(device, seed)
        Q = bt.randn((1, t, h, d), gen, device, dt)
        _, g = bt.chunk_gates(1, t, h, c, gen, device)
        qscale = ((g - 1.0 - 2.0 * bt.rand((1, t, h), gen, device)) / key.deg).exp()
        return dict(Q=Q, qscale=qscale, dAh=bt.randn((1, t, h, d), gen, device), dBh=bt.randn((1, t, h), gen, device),
                    scale=d**-0.5, chunk_size=c, kv_heads=h)

    def run(self, key: QueryStateBwdKey, config: QueryStateBwdConfig, inputs: dict[str, Any]) -> Any:
        """This stage's pass only: rows -> ROW_OUTPUTS in order; state -> (dSbar, dsbar)."""
        x = inputs
        kw = dict(deg=key.deg, d_tile=key.d_tile, scale=x["scale"], chunk_size=x["chunk_size"], config=config)
        if key.stage == "rows":
            out = query_state_bwd_rows(x["Q"], x["G"], x["Sbar16"], x["sbar"], x["O"], x["l"], x["m"], x["Y"],
                                       x["dY"], **kw)
            return tuple(out[k] for k in ROW_OUTPUTS)
        return query_state_bwd_state(x["Q"], x["qscale"], x["dAh"], x["dBh"], kv_heads=x["kv_heads"], **kw)

    def reference(self, key: QueryStateBwdKey, inputs: dict[str, Any]) -> Any:
        """The pass's float64 emulation on KV head 0 (its r query heads), first chunks."""
        from vidrial.reference import backward as em
        from vidrial.kernels.power_retention import bwd_tuning as bt

        x, c = inputs, inputs["chunk_size"]
        b, t, hq, _ = x["Q"].shape
        r = hq // x["kv_heads"]
        nm = bt.check_slice(t // c)
        rows = slice(0, nm * c)
        if key.stage == "state":
            q = {k: x[k][:1, rows, :r].double() for k in ("Q", "qscale", "dAh", "dBh")}
            return em.qs_bwd_state(q["Q"], q["qscale"], q["dAh"], q["dBh"], 1, key.deg, key.d_tile, x["scale"], c)
        q = {k: x[k][:1, rows, :r].double() for k in ("Q", "O", "l", "m", "Y", "dY")}
        return em.qs_bwd_rows(q["Q"], x["G"][:1, rows, :1].double(), x["Sbar16"][:1, :nm, :1].double(),
                              x["sbar"][:1, :nm, :1].double(), q["O"], q["l"], q["m"], q["Y"], q["dY"], key.deg,
                              key.d_tile, x["scale"], c)

    def check_outputs(self, key: QueryStateBwdKey, inputs: dict[str, Any], outputs: Any, expected: Any) -> float:
        """As SliceCheck; the row gate gradient dg = phi.dphi + dO.O + dl (l - 1e-6) is a sum of
        terms that cancel (exactly, up to 1e-6, for a consistent Y), so its error is measured against
        the size of the terms, ||dl l||, as in tests/gpu/test_backward_gpu.py."""
        from vidrial.kernels.power_retention import bwd_tuning as bt

        if key.stage == "state":
            return bt.slice_error(outputs, expected)
        i_dg, i_dl = ROW_OUTPUTS.index("dg"), ROW_OUTPUTS.index("dl")
        rest = [j for j in range(len(ROW_OUTPUTS)) if j != i_dg]
        err = bt.slice_error([outputs[j] for j in rest], [expected[j] for j in rest])
        dg = expected[i_dg]
        terms = expected[i_dl] * bt.leading(inputs["l"], dg.shape).to(dg)
        return max(err, bt.rel_err(outputs[i_dg], dg, norm=terms if terms.norm() > dg.norm() else dg))


FAMILY = register(QueryStateBwdFamily())


def state_ftiles(D: int, config: QueryStateBwdConfig) -> int:
    """CTAs per (batch, KV head, chunk) of the state pass: features in tiles of tile_f."""
    return -(-D // config.tile_f)


def _state_impl(state_impl: str | None) -> str:
    impl = STATE_IMPL_DEFAULT if state_impl is None else state_impl
    if impl not in STATE_IMPLS:
        where = "state_impl" if state_impl is not None else "VIDRIAL_QS_BWD_STATE"
        raise InputError(where, repr(impl), f"one of {STATE_IMPLS}")
    return impl


def _keys(Q, deg: int, d_tile: int) -> tuple[QueryStateBwdKey, QueryStateBwdKey]:
    b, t, hq, d = Q.shape
    key_r = QueryStateBwdKey(head_dim=d, deg=deg, d_tile=d_tile, dtype=str(Q.dtype).replace("torch.", ""),
                             stage="rows", tokens=pow2_bucket(b * t * hq))
    return key_r, key_r.model_copy(update={"stage": "state"})


def query_state_bwd_rows(Q, G, Sbar16, sbar, O, l, m, Y, dY, *, deg: int, d_tile: int, scale: float,
                         chunk_size: int, config=None):
    """The row pass alone (inputs as query_state_bwd). Returns dict dQ, dO, dAh [b,t,hq,d], dl, dBh,
    qscale, dg [b,t,hq] (fp32). Current stream, no host sync."""
    import torch

    b, t, hq, d = Q.shape
    h = Sbar16.shape[2]
    c = int(chunk_size)
    if t % c:
        raise InputError("Q", tuple(Q.shape), f"a time length that is a multiple of chunk_size={c}")
    n = t // c
    D = row_loop_geometry(d, deg, d_tile, RowLoopConfig())["D"]
    if Sbar16.dtype != torch.bfloat16 or Sbar16.shape[1] < n or tuple(Sbar16.shape[3:]) != (D, d):
        raise InputError("Sbar16", (tuple(Sbar16.shape), str(Sbar16.dtype)), f"bfloat16 [{b}, >={n}, {h}, {D}, {d}]")
    key = _keys(Q, deg, d_tile)[0]
    dev = Q.device
    if config is None:
        config = pick(FAMILY, key, dev)
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
    rt = -(-c // config.rows)
    kernel = launchable(FAMILY, compile_key(key), config, dev)
    kernel.launch((b * hq * n * rt, 1, 1), (config.warps * 32, 1, 1),
                  (Q.data_ptr(), ptr(G), Sbar16.data_ptr(), sbar.data_ptr(), O.data_ptr(), l.data_ptr(), m.data_ptr(),
                   Y.data_ptr(), dY.data_ptr(), block_table(d, deg, d_tile, dev).data_ptr(), out["dQ"].data_ptr(),
                   out["dO"].data_ptr(), out["dl"].data_ptr(), out["dAh"].data_ptr(), out["dBh"].data_ptr(),
                   out["qscale"].data_ptr(), out["dg"].data_ptr(), t, n, c, hq, hq // h, Sbar16.shape[1],
                   sbar.shape[1], rt, float(scale) ** deg),
                  dev.index, stream_of(dev))
    return out


def query_state_bwd_state(Q, qscale, dAh, dBh, *, kv_heads: int, deg: int, d_tile: int, scale: float,
                          chunk_size: int, config=None):
    """The state pass alone, from the row pass's qscale, dAh, dBh: (dSbar [b,n,h,D,d], dsbar [b,n,h,D])
    fp32 with h = kv_heads. Current stream, no host sync."""
    import torch

    b, t, hq, d = Q.shape
    h, c = int(kv_heads), int(chunk_size)
    if h < 1 or hq % h:
        raise InputError("kv_heads", kv_heads, f"a divisor of the query heads {hq}")
    if t % c:
        raise InputError("Q", tuple(Q.shape), f"a time length that is a multiple of chunk_size={c}")
    n = t // c
    D = row_loop_geometry(d, deg, d_tile, RowLoopConfig())["D"]
    key = _keys(Q, deg, d_tile)[1]
    dev = Q.device
    if config is None:
        config = pick(FAMILY, key, dev)
    Q, qscale, dAh, dBh = (x.contiguous() for x in (Q, qscale, dAh, dBh))
    dSbar = torch.empty(b, n, h, D, d, device=dev, dtype=torch.float32)
    dsbar = torch.empty(b, n, h, D, device=dev, dtype=torch.float32)
    if Q.numel() == 0:
        return dSbar, dsbar
    ftiles = state_ftiles(D, config)
    kernel = launchable(FAMILY, compile_key(key), config, dev)
    kernel.launch((b * h * n * ftiles, 1, 1), (config.warps * 32, 1, 1),
                  (Q.data_ptr(), qscale.data_ptr(), dAh.data_ptr(), dBh.data_ptr(),
                   block_table(d, deg, d_tile, dev).data_ptr(), dSbar.data_ptr(), dsbar.data_ptr(), t, n, c, hq,
                   hq // h, ftiles, float(scale) ** deg),
                  dev.index, stream_of(dev))
    return dSbar, dsbar


def state_pass_kernel(Q, qscale, dAh, dBh, h: int, *, deg: int, d_tile: int, scale: float, chunk_size: int,
                      config: QueryStateBwdConfig | None = None):
    """This family's state stage with the signature of qs_bwd_state_update.state_pass_update_state."""
    return query_state_bwd_state(Q, qscale, dAh, dBh, kv_heads=h, deg=deg, d_tile=d_tile, scale=scale,
                                 chunk_size=chunk_size, config=config)


def query_state_bwd(Q, G, Sbar16, sbar, O, l, m, Y, dY, *, deg: int, d_tile: int, scale: float, chunk_size: int,
                    config=None, state_config=None, state: bool = True, state_impl: str | None = None):
    """Both passes. Q, Y, dY [b,t,hq,d] bf16/fp16 (t a multiple of chunk_size), G [b,t,h] fp32 chunk-local
    cumulative log gates or None, Sbar16 [b,n',h,D,d] bf16 (n' >= n: states at the start of each chunk),
    sbar [b,n'',h,D] fp32, O [b,t,hq,d], l, m [b,t,hq] fp32 (intra-chunk attention, merge mode).
    Returns dict dQ, dO, dAh [b,t,hq,d], dl, dBh, qscale, dg [b,t,hq], dSbar [b,n,h,D,d], dsbar [b,n,h,D]
    (all fp32; state=False: the rows pass's outputs only). state_impl: "kernel" or "update_state" (None:
    STATE_IMPL_DEFAULT); state_config is the chosen state pass's config (QueryStateBwdConfig /
    UpdateStateConfig). Current stream, no host sync."""
    impl = _state_impl(state_impl)
    if impl == "update_state" and state:
        from vidrial.kernels.power_retention.qs_bwd_state_update import check_supported

        try:
            check_supported(Q.shape[3], Q.shape[2] // Sbar16.shape[2], int(chunk_size))
        except InputError:
            if state_impl is not None:  # asked for by name: say why it cannot run
                raise
            impl = "kernel"  # the default falls back where update_state cannot run the problem
    Q = Q.contiguous()  # once for both passes
    out = query_state_bwd_rows(Q, G, Sbar16, sbar, O, l, m, Y, dY, deg=deg, d_tile=d_tile, scale=scale,
                               chunk_size=chunk_size, config=config)
    if not state:  # the rows pass only
        return out
    if impl == "update_state":
        from vidrial.kernels.power_retention.qs_bwd_state_update import state_pass_update_state as state_pass
    else:
        state_pass = state_pass_kernel
    out["dSbar"], out["dsbar"] = state_pass(Q, out["qscale"], out["dAh"], out["dBh"], Sbar16.shape[2], deg=deg,
                                            d_tile=d_tile, scale=scale, chunk_size=chunk_size, config=state_config)
    return out
