"""query_state backward (docs/MATH.md section 4): the rows pass as this family's kernel, the state pass on
the forward update_state kernel (qs_bwd_state_update.py).

Rows pass (CTA = 32 * warps query rows of one batch, query head, chunk): with q~ = q exp(g/p),
B = s^p phi(q~).sbar_nu, the stabiliser M = max(m, log B), Den = l e^(m-M) + B e^-M:

    dAh = dY/Den, dBh = -(dY.Y)/Den, dO = dAh e^(m-M) = alpha dY, dl = dBh e^(m-M), qh = q exp((g-M)/p)
    dphi = s^p (Sbar_nu dAh + sbar_nu dBh),  dq = chain(qh, dphi) exp((g-M)/p)
    dg_row = phi(qh).dphi + dO.O + dl (l - 1e-6)

as one loop over the features (reference.backward.qs_bwd_rows_mma16): dphi' = Sbar dY - (dY.Y) sbar on
bf16 tensor cores (mma.sync m16n8k16, dY's fragments in registers, Sbar tiles by cp.async) and the
sympow chain rule on the CUDA cores, one row per thread (templates/query_state_bwd.cu.j2 on
templates/common/feature_bwd.cuh). impl="wgmma" (templates/query_state_bwd_wgmma.cu.j2, Hopper, sm_90a,
p = 2, d_tile = 8, head_dim = 64): the same loop with the GEMM on warpgroup MMA (dY the register A
operand, one 64-feature Sbar block per stage through a 128-byte-swizzled descriptor) and the chain on
its accumulators in registers (common/wgmma_chain.cuh) while the next block's GEMM runs.

State pass (per batch, KV head, chunk; sums the r query heads):
    dSbar_nu = s^p sum_rows phi(qh) dAh^T,  dsbar_nu = s^p sum_rows phi(qh) dBh,
run by qs_bwd_state_update.state_pass_update_state on the forward update_state kernel (dispatched with
update_state's own key and tuned configs) plus a moment GEMM.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vidrial.core.arch import is_hopper
from vidrial.core.config import ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.tensors import C_TYPES, dtype_name, pow2_bucket, ptr
from vidrial.kernels import register
from vidrial.kernels.power_retention.bwd_tuning import SliceCheck
from vidrial.kernels.power_retention._feature_bwd import (
    FeatureBwdConfig,
    FeatureBwdFamily,
    check_layout,
    padded_row,
    scratch_floats,
    state_tile_floats,
    wgmma_applies,
    wgmma_smem_bytes,
)
from vidrial.kernels.power_retention.sympow import block_table, feature_dim

__all__ = ["QueryStateBwdConfig", "QueryStateBwdKey", "FAMILY", "query_state_bwd", "query_state_bwd_rows",
           "mma16_config"]


class QueryStateBwdConfig(FeatureBwdConfig):
    """Tiles of the rows pass."""


def mma16_config(key: "QueryStateBwdKey") -> QueryStateBwdConfig:
    """The rows pass's default tiles for `key` (2 warps at head_dim 128: fits sm_80)."""
    return QueryStateBwdConfig(warps=4 if key.head_dim <= 64 else 2, tile_f=64, stages=2)


def mma16_smem_bytes(head_dim: int, config: QueryStateBwdConfig) -> int:
    """Dynamic shared memory of templates/query_state_bwd.cu.j2 (its static_assert checks it):
    state tiles | q rows (16-bit) | u rows (fp32, stride d+4) | per-warp scratch | 4 row scalars."""
    rows = 32 * config.warps
    floats = (state_tile_floats(head_dim, config.tile_f, config.stages) + rows * padded_row(head_dim) // 2
              + rows * (head_dim + 4) + config.warps * scratch_floats(head_dim) + 4 * rows)
    return 4 * floats


class QueryStateBwdKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "d_tile", "dtype")
    head_dim: int = 64
    deg: int = 2
    d_tile: int = 8
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    tokens: int = Field(65536, description="bucket (power of two) of batch * time * query heads")

    @model_validator(mode="after")
    def _valid(self):
        from vidrial.kernels.power_retention.sympow import layout

        layout(self.head_dim, self.deg, self.d_tile)
        if self.head_dim % 32 or not 32 <= self.head_dim <= 256:
            raise ConfigError("head_dim", self.head_dim, "a multiple of 32 between 32 and 256")
        return self


# the rows pass's outputs (what run() returns); reference() gives the same from reference.backward.qs_bwd_rows
# (alpha = |dO_i| / |dY_i|, dgs = dg - dO.O - dl (l - 1e-6))
ROW_OUTPUTS = ("dQ", "alpha", "dl", "dAh", "dBh", "qscale", "dg", "dgs")


class QueryStateBwdFamily(SliceCheck, FeatureBwdFamily, KernelFamily[QueryStateBwdKey, QueryStateBwdConfig]):
    name = "query_state_bwd"
    template = "query_state_bwd.cu.j2"
    templates = {"mma_sync": "query_state_bwd.cu.j2", "wgmma": "query_state_bwd_wgmma.cu.j2"}
    Config = QueryStateBwdConfig
    Key = QueryStateBwdKey
    signature = ("ptr",) * 18 + ("i32",) * 8 + ("f32",)

    def default_config(self, key: QueryStateBwdKey) -> QueryStateBwdConfig:
        return mma16_config(key)

    signature_input = "Q"  # the tensor problem_key reads the sizes off

    def smem_bytes(self, head_dim: int, config: FeatureBwdConfig) -> int:
        if config.impl == "wgmma":
            return wgmma_smem_bytes(head_dim, config, row_scalars=5)  # dY.Y, dY.O, Bq, fq, inv
        return mma16_smem_bytes(head_dim, config)

    def default_config_for(self, key: QueryStateBwdKey, arch: str | None) -> QueryStateBwdConfig:
        """wgmma on Hopper where it applies: 1.03x the mma_sync rows pass at shape A on an H200 (2026-12-02,
        benchmarks/bench_impls.py --family query_state_bwd: 1.229 vs 1.268 ms; the tuner's winner too)."""
        if is_hopper(arch) and wgmma_applies(key):
            return self.wgmma_config(key)
        return self.default_config(key)

    def corner_configs(self, key: QueryStateBwdKey) -> list[QueryStateBwdConfig]:
        out = [self.default_config(key)]
        for cfg, arch in [(QueryStateBwdConfig(warps=2, tile_f=128, stages=4), "sm_80"),
                          (QueryStateBwdConfig(warps=8, tile_f=64, stages=2), "sm_80")] + [
                (c, "sm_90a") for c in self.wgmma_corners(key)]:
            try:
                self.check(key, cfg, arch)
                out.append(cfg)
            except ConfigError:
                pass
        return out

    # ---- launch path: the rows pass (vidrial.autograd has checked the forward's inputs) ----------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """Q, Y, dY [b,t,hq,d] bf16/fp16 (t a multiple of chunk_size), G [b,t,h] fp32 or None, Sbar16
        [b,>=n,h,D,d] bf16, sbar [b,>=n,h,D] fp32, O [b,t,hq,d], l, m [b,t,hq] fp32; deg, d_tile, scale,
        chunk_size."""
        import torch

        Q, Sbar16, c = x["Q"], x["Sbar16"], int(x["chunk_size"])
        b, t, hq, d = Q.shape
        if t % c:
            raise InputError("Q", tuple(Q.shape), f"a time length that is a multiple of chunk_size={c}")
        n, D = t // c, feature_dim(d, x["deg"], x["d_tile"])
        if Sbar16.dtype != torch.bfloat16 or Sbar16.shape[1] < n or tuple(Sbar16.shape[3:]) != (D, d):
            raise InputError("Sbar16", (tuple(Sbar16.shape), str(Sbar16.dtype)),
                             f"bfloat16 [{b}, >={n}, {Sbar16.shape[2]}, {D}, {d}]")
        y = {k: x[k].contiguous() for k in ("Q", "Y", "dY", "O", "l", "m", "Sbar16", "sbar")}
        G = x.get("G")
        return dict(y, G=G.contiguous() if G is not None else None, deg=x["deg"], d_tile=x["d_tile"],
                    scale=float(x["scale"]), chunk_size=c)

    def problem_key(self, x: dict[str, Any]) -> QueryStateBwdKey:
        """b*t*hq bucketed to a power of two."""
        b, t, hq, d = x["Q"].shape
        return QueryStateBwdKey(head_dim=d, deg=x["deg"], d_tile=x["d_tile"], dtype=dtype_name(x["Q"].dtype),
                                tokens=pow2_bucket(b * t * hq))

    def outputs(self, key: QueryStateBwdKey, config: QueryStateBwdConfig, x: dict[str, Any]) -> dict[str, Any]:
        """dQ, dAh [b,t,hq,d], alpha, dl, dBh, qscale, dg, dgs [b,t,hq], fp32."""
        import torch

        b, t, hq, d = x["Q"].shape
        new = lambda *shape: torch.empty(shape, device=x["Q"].device, dtype=torch.float32)  # noqa: E731
        return dict(dQ=new(b, t, hq, d), alpha=new(b, t, hq), dAh=new(b, t, hq, d), dl=new(b, t, hq),
                    dBh=new(b, t, hq), qscale=new(b, t, hq), dg=new(b, t, hq), dgs=new(b, t, hq))

    def launches(self, key: QueryStateBwdKey, config: QueryStateBwdConfig, x: dict[str, Any], out: dict[str, Any]):
        Q, Sbar16, c = x["Q"], x["Sbar16"], x["chunk_size"]
        b, t, hq, d = Q.shape
        if Q.numel() == 0:
            return
        n, h, rt = t // c, Sbar16.shape[2], -(-c // config.rows)
        table = block_table(d, key.deg, key.d_tile, Q.device)
        yield Launch((b * hq * n * rt, 1, 1),
                     (Q.data_ptr(), ptr(x["G"]), Sbar16.data_ptr(), x["sbar"].data_ptr(), x["O"].data_ptr(),
                      x["l"].data_ptr(), x["m"].data_ptr(), x["Y"].data_ptr(), x["dY"].data_ptr(), table.data_ptr(),
                      *(out[k].data_ptr() for k in ("dQ", "alpha", "dl", "dAh", "dBh", "qscale", "dg", "dgs")),
                      t, n, c, hq,
                      hq // h, Sbar16.shape[1], x["sbar"].shape[1], rt, x["scale"] ** key.deg))

    # ---- tuner protocol (shared pieces and the checked slice: bwd_tuning.py) ----------------------
    def make_inputs(self, key: QueryStateBwdKey, device: Any, seed: int) -> dict[str, Any]:
        """b = 1, `key.tokens` split into up to 8 heads (no GQA) of chunks of TUNE_CHUNK[deg]:
        bwd_tuning.query_state_problem (states, (O, l, m) and Y as the forward leaves them)."""
        from vidrial.kernels.power_retention import bwd_tuning as bt

        t, h, c = bt.split_tokens(key.tokens, bt.TUNE_CHUNK[key.deg])
        return bt.query_state_problem(t=t, hq=h, h=h, d=key.head_dim, deg=key.deg, d_tile=key.d_tile, c=c,
                                      dtype=bt.DTYPES[key.dtype], device=device, seed=seed)

    def run(self, key: QueryStateBwdKey, config: QueryStateBwdConfig, inputs: dict[str, Any]) -> Any:
        """The rows pass only: ROW_OUTPUTS in order."""
        x = inputs
        out = query_state_bwd_rows(x["Q"], x["G"], x["Sbar16"], x["sbar"], x["O"], x["l"], x["m"], x["Y"], x["dY"],
                                   deg=key.deg, d_tile=key.d_tile, scale=x["scale"], chunk_size=x["chunk_size"],
                                   config=config)
        return tuple(out[k] for k in ROW_OUTPUTS)

    def reference(self, key: QueryStateBwdKey, inputs: dict[str, Any]) -> Any:
        """The rows pass's float64 emulation on KV head 0 (its r query heads), first chunks."""
        from vidrial.reference import backward as em
        from vidrial.kernels.power_retention import bwd_tuning as bt

        x, c = inputs, inputs["chunk_size"]
        b, t, hq, _ = x["Q"].shape
        r = hq // x["kv_heads"]
        nm = bt.check_slice(t // c)
        rows = slice(0, nm * c)
        q = {k: x[k][:1, rows, :r].double() for k in ("Q", "O", "l", "m", "Y", "dY")}
        return rows_reference_outputs(em.qs_bwd_rows(q["Q"], x["G"][:1, rows, :1].double(),
                                                     x["Sbar16"][:1, :nm, :1].double(), x["sbar"][:1, :nm, :1].double(),
                                                     q["O"], q["l"], q["m"], q["Y"], q["dY"], key.deg, key.d_tile,
                                                     x["scale"], c), q["dY"], q["O"], q["l"])

    def check_outputs(self, key: QueryStateBwdKey, inputs: dict[str, Any], outputs: Any, expected: Any) -> float:
        """As SliceCheck; the row gate gradient dg = phi.dphi + dO.O + dl (l - 1e-6) is a sum of
        terms that cancel (exactly, up to 1e-6, for a consistent Y), so its error is measured against
        the size of the terms, ||dl l||, as in tests/gpu/test_backward_gpu.py."""
        from vidrial.kernels.power_retention import bwd_tuning as bt

        i_dg, i_dl = ROW_OUTPUTS.index("dg"), ROW_OUTPUTS.index("dl")
        rest = [j for j in range(len(ROW_OUTPUTS)) if j != i_dg]
        err = bt.slice_error([outputs[j] for j in rest], [expected[j] for j in rest])
        dg = expected[i_dg]
        terms = expected[i_dl] * bt.leading(inputs["l"], dg.shape).to(dg)
        return max(err, bt.rel_err(outputs[i_dg], dg, norm=terms if terms.norm() > dg.norm() else dg))


FAMILY = register(QueryStateBwdFamily())


def rows_reference_outputs(ref, dY, O, l):
    """ROW_OUTPUTS from reference.backward.qs_bwd_rows's (dq, dO, dl, dAh, dBh, qscale, dg): alpha = |dO_i| /
    |dY_i| (dO is alpha dY row by row), dgs = dg - dO.O - dl (l - 1e-6) (dg without the intra row term)."""
    import torch

    dq, dO, dl, dAh, dBh, qscale, dg = ref
    nrm = dY.norm(dim=-1)
    alpha = torch.where(nrm > 0, dO.norm(dim=-1) / nrm, torch.zeros_like(nrm))
    dgs = dg - (dO * O).sum(-1) - dl * (l - 1e-6)
    return dq, alpha, dl, dAh, dBh, qscale, dg, dgs


def query_state_bwd_rows(Q, G, Sbar16, sbar, O, l, m, Y, dY, *, deg: int, d_tile: int, scale: float,
                         chunk_size: int, config=None):
    """The row pass alone (inputs as query_state_bwd). Returns dict dQ, dAh [b,t,hq,d], alpha, dl, dBh,
    qscale, dg, dgs [b,t,hq] (fp32; dO = alpha dY, dgs = dg without the intra row term dO.O + dl (l - 1e-6)).
    Current stream, no host sync."""
    return FAMILY(config, Q=Q, G=G, Sbar16=Sbar16, sbar=sbar, O=O, l=l, m=m, Y=Y, dY=dY, deg=deg, d_tile=d_tile,
                  scale=scale, chunk_size=chunk_size)


def query_state_bwd(Q, G, Sbar16, sbar, O, l, m, Y, dY, *, deg: int, d_tile: int, scale: float, chunk_size: int,
                    config=None, state_config=None, state: bool = True):
    """Both passes. Q, Y, dY [b,t,hq,d] bf16/fp16 (t a multiple of chunk_size), G [b,t,h] fp32 chunk-local
    cumulative log gates or None, Sbar16 [b,n',h,D,d] bf16 (n' >= n: states at the start of each chunk),
    sbar [b,n'',h,D] fp32, O [b,t,hq,d], l, m [b,t,hq] fp32 (intra-chunk attention, merge mode).
    Returns dict dQ, dAh [b,t,hq,d], alpha, dl, dBh, qscale, dg, dgs [b,t,hq], dSbar [b,n,h,D,d], dsbar [b,n,h,D]
    (all fp32; state=False: the rows pass's outputs only). config: the rows pass's; state_config: the
    state pass's (an UpdateStateConfig; None: update_state's dispatcher). Current stream, no host sync."""
    from vidrial.kernels.power_retention.qs_bwd_state_update import check_supported, state_pass_update_state

    h = Sbar16.shape[2]
    if state:
        check_supported(Q.shape[3], Q.shape[2] // h, int(chunk_size))
    Q = Q.contiguous()  # once for both passes
    out = query_state_bwd_rows(Q, G, Sbar16, sbar, O, l, m, Y, dY, deg=deg, d_tile=d_tile, scale=scale,
                               chunk_size=chunk_size, config=config)
    if not state:  # the rows pass only
        return out
    if Q.numel() == 0:
        import torch

        b, t, hq, d = Q.shape
        n, D = t // int(chunk_size), feature_dim(d, deg, d_tile)
        f32 = dict(device=Q.device, dtype=torch.float32)
        out.update(dSbar=torch.empty(b, n, h, D, d, **f32), dsbar=torch.empty(b, n, h, D, **f32))
        return out
    out["dSbar"], out["dsbar"] = state_pass_update_state(Q, out["qscale"], out["dAh"], out["dBh"], h, deg=deg,
                                                         d_tile=d_tile, scale=scale, chunk_size=chunk_size,
                                                         config=state_config)
    return out
