"""update_state backward (docs/MATH.md section 4): dK, dV and the gate term from the chunk-state gradients.

Per chunk nu, KV head, key row tau (k~ = k exp((L - g_tau)/p), L = g at the chunk's last step):

    dphi = dS_nu v_tau + ds_nu,   dv_tau = phi(k~)^T dS_nu,
    dk_tau = chain(k~, dphi) exp((L - g_tau)/p),   e_tau = phi(k~).dphi

(``e``: the gate's share, dg_tau -= e_tau, dL_nu += sum_tau e_tau). Both GEMMs run on bf16 tensor
cores in one loop over the features (templates/update_state_bwd.cu.j2 on common/feature_bwd.cuh):
dphi = dS v + ds (mma.sync m16n8k16, V's fragments in registers), the chain rule at the raw k on the
CUDA cores (one row per thread), which also writes phi(k) as bf16, and dV += phi(k)^T dS (m16n8k16 on
the same dS tile); every gate factor is applied once per row at the end (phi is homogeneous of degree
p). CTA = 32 * warps key rows of one chunk. The launcher hands it a bf16 copy of dS (see
update_state_bwd for the accuracy).

Two implementations, the config's `impl`: "mma_sync" (the above, any sm_80+ GPU) and "wgmma"
(templates/update_state_bwd_wgmma.cu.j2, Hopper, sm_90a, p = 2, d_tile = 8, head_dim = 64): both GEMMs
on warpgroup MMA, V and phi(k) as register A operands, one 64-feature sympow block of dS per cp.async
stage read by both GEMMs through 128-byte-swizzled descriptors (K-major for dphi, N-major for dV), the
chain rule on GEMM 1's accumulators in registers while the tensor cores run the next block; CTA = 64
rows per warpgroup.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from vidrial.core.arch import is_hopper
from vidrial.core.config import ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.tensors import C_TYPES, InDType, dtype_name, pow2_bucket, ptr
from vidrial.kernels import register
from vidrial.kernels.power_retention.bwd_tuning import SliceCheck
from vidrial.kernels.power_retention._feature_bwd import (
    FeatureBwdConfig,
    FeatureBwdFamily,
    chain_chunk,
    check_layout,
    padded_row,
    scratch_floats,
    state_tile_floats,
    wgmma_applies,
    wgmma_smem_bytes,
)
from vidrial.kernels.power_retention.sympow import block_table, feature_dim

__all__ = ["UpdateStateBwdConfig", "UpdateStateBwdKey", "FAMILY", "update_state_bwd", "mma16_config"]

class UpdateStateBwdConfig(FeatureBwdConfig):
    pass


def mma16_config(key: "UpdateStateBwdKey") -> UpdateStateBwdConfig:
    """The default tiles for `key`: 4 warps (2 CTAs per SM at d=64), 2 at head_dim
    128 (V's fragments move to shared memory there; fits sm_80)."""
    return UpdateStateBwdConfig(warps=4 if key.head_dim <= 64 else 2, tile_f=64, stages=2)


def mma16_smem_bytes(head_dim: int, config: UpdateStateBwdConfig) -> int:
    """Dynamic shared memory of templates/update_state_bwd.cu.j2 (its static_assert checks it):
    state tiles | k rows (16-bit) | v rows (bf16, head_dim > 64 only) | u rows (fp32, stride d+4) |
    per-warp scratch | row scales."""
    rows = 32 * config.warps
    row16 = rows * padded_row(head_dim) // 2
    floats = (state_tile_floats(head_dim, config.tile_f, config.stages) + row16 * (1 if head_dim <= 64 else 2)
              + rows * (head_dim + 4) + config.warps * scratch_floats(head_dim) + rows)
    return 4 * floats


def check_mma16_layout(key: "UpdateStateBwdKey") -> None:
    """feature_bwd.cuh's layouts, and whole 16-feature groups per chain chunk (phi written in place)."""
    check_layout(key.head_dim, key.d_tile)
    chunk = chain_chunk(key.head_dim, key.deg, key.d_tile)
    if chunk % 16:
        raise ConfigError("d_tile", key.d_tile, f"chain chunks of a multiple of 16 features (phi for the dV GEMM is "
                                           f"written in place per chunk); d_tile={key.d_tile}, deg={key.deg} "
                                           f"gives {chunk}")


class UpdateStateBwdKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "d_tile", "dtype")
    head_dim: int = 64
    deg: int = 2
    d_tile: int = 8
    dtype: InDType = "bfloat16"
    tokens: int = Field(65536, description="bucket (power of two) of batch * time * kv heads")

    @model_validator(mode="after")
    def _valid(self):
        from vidrial.kernels.power_retention.sympow import layout

        layout(self.head_dim, self.deg, self.d_tile)
        if self.head_dim % 8 or not 8 <= self.head_dim <= 256:
            raise ConfigError("head_dim", self.head_dim, "a multiple of 8 between 8 and 256")
        return self


class UpdateStateBwdFamily(SliceCheck, FeatureBwdFamily, KernelFamily[UpdateStateBwdKey, UpdateStateBwdConfig]):
    name = "update_state_bwd"
    template = "update_state_bwd.cu.j2"
    templates = {"mma_sync": "update_state_bwd.cu.j2", "wgmma": "update_state_bwd_wgmma.cu.j2"}
    Config = UpdateStateBwdConfig
    Key = UpdateStateBwdKey
    signature = ("ptr",) * 9 + ("i32",) * 5

    def default_config(self, key: UpdateStateBwdKey) -> UpdateStateBwdConfig:
        return mma16_config(key)

    signature_input = "K"  # the tensor problem_key reads the sizes off

    def smem_bytes(self, head_dim: int, config: UpdateStateBwdConfig) -> int:
        if config.impl == "wgmma":
            return wgmma_smem_bytes(head_dim, config, row_scalars=1)  # the row scale
        return mma16_smem_bytes(head_dim, config)

    def check_key(self, key: UpdateStateBwdKey) -> None:
        check_mma16_layout(key)

    def default_config_for(self, key: UpdateStateBwdKey, arch: str | None) -> UpdateStateBwdConfig:
        """wgmma on Hopper where it applies: 1.23x the mma_sync kernel at shapes A and B on an H200
        (2026-12-02, benchmarks/bench_impls.py: 1.365 vs 1.671 ms at A, 1.352 vs 1.668 ms at B)."""
        if is_hopper(arch) and wgmma_applies(key):
            return self.wgmma_config(key)
        return self.default_config(key)

    def corner_configs(self, key: UpdateStateBwdKey) -> list[UpdateStateBwdConfig]:
        out = [self.default_config(key)]
        for cfg, arch in [(UpdateStateBwdConfig(warps=2, tile_f=64, stages=3), "sm_80")] + [
                (c, "sm_90a") for c in self.wgmma_corners(key)]:
            try:
                self.check(key, cfg, arch)
                out.append(cfg)
            except ConfigError:
                pass
        return out

    # ---- launch path (vidrial.autograd has checked the forward's inputs) ---------------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """K, V [b,t,h,d] bf16/fp16 with t a multiple of chunk_size; G [b,t,h] fp32 chunk-local cumulative
        log gates or None; dS [b,n,h,D,d], ds [b,n,h,D] fp32; deg, d_tile, chunk_size."""
        import torch

        K, dS, c = x["K"], x["dS"], int(x["chunk_size"])
        b, t, h, d = K.shape
        if t % c:
            raise InputError("K", tuple(K.shape), f"a time length that is a multiple of chunk_size={c}")
        D = feature_dim(d, x["deg"], x["d_tile"])
        if tuple(dS.shape) != (b, t // c, h, D, d) or dS.dtype not in (torch.float32, torch.bfloat16):
            raise InputError("dS", (tuple(dS.shape), str(dS.dtype)), f"float32 or bfloat16 {(b, t // c, h, D, d)}")
        G = x.get("G")
        # the kernel reads dS as bf16 (update_state_bwd says why that is accurate enough; the backward
        # has discumsum_bwd write it so)
        return dict(K=K.contiguous(), V=x["V"].contiguous(), G=G.contiguous() if G is not None else None,
                    dS=dS.to(torch.bfloat16).contiguous(), ds=x["ds"].contiguous(), deg=x["deg"], d_tile=x["d_tile"],
                    chunk_size=c)

    def problem_key(self, x: dict[str, Any]) -> UpdateStateBwdKey:
        """b*t*h bucketed to a power of two."""
        b, t, h, d = x["K"].shape
        return UpdateStateBwdKey(head_dim=d, deg=x["deg"], d_tile=x["d_tile"], dtype=dtype_name(x["K"].dtype),
                                 tokens=pow2_bucket(b * t * h))

    def outputs(self, key: UpdateStateBwdKey, config: UpdateStateBwdConfig, x: dict[str, Any]) -> dict[str, Any]:
        import torch

        new = lambda *shape: torch.empty(shape, device=x["K"].device, dtype=torch.float32)  # noqa: E731
        b, t, h, d = x["K"].shape
        return {"dK": new(b, t, h, d), "dV": new(b, t, h, d), "E": new(b, t, h) if x["G"] is not None else None}

    def launches(self, key: UpdateStateBwdKey, config: UpdateStateBwdConfig, x: dict[str, Any],
                 out: dict[str, Any]):
        K, c = x["K"], x["chunk_size"]
        b, t, h, d = K.shape
        if K.numel() == 0:
            return
        n, rt = t // c, -(-c // config.rows)
        table = block_table(d, key.deg, key.d_tile, K.device)
        yield Launch((b * h * n * rt, 1, 1),
                     (K.data_ptr(), x["V"].data_ptr(), ptr(x["G"]), x["dS"].data_ptr(), x["ds"].data_ptr(),
                      table.data_ptr(), out["dK"].data_ptr(), out["dV"].data_ptr(), ptr(out["E"]), t, n, c, h, rt))

    # ---- tuner protocol (shared pieces and the checked slice: bwd_tuning.py) ----------------------
    def make_inputs(self, key: UpdateStateBwdKey, device: Any, seed: int) -> dict[str, Any]:
        """b = 1, `key.tokens` split into up to 8 heads of chunks of TUNE_CHUNK[deg]; real gates;
        Gaussian chunk-state gradients dS, ds (ds scaled by sqrt(d) so that both terms of
        dphi = dS v + ds count, as in training where dsbar carries dY.Y)."""
        from vidrial.kernels.power_retention import bwd_tuning as bt
        from vidrial.kernels.power_retention.sympow import feature_dim

        t, h, c = bt.split_tokens(key.tokens, bt.TUNE_CHUNK[key.deg])
        n, d, D = t // c, key.head_dim, feature_dim(key.head_dim, key.deg, key.d_tile)
        gen = bt.generator(device, seed)
        dt = bt.DTYPES[key.dtype]
        K, V = bt.randn((1, t, h, d), gen, device, dt), bt.randn((1, t, h, d), gen, device, dt)
        _, g = bt.chunk_gates(1, t, h, c, gen, device)
        return dict(K=K, V=V, G=g, dS=bt.randn((1, n, h, D, d), gen, device),
                    ds=bt.randn((1, n, h, D), gen, device, scale=d**0.5), chunk_size=c)

    def run(self, key: UpdateStateBwdKey, config: UpdateStateBwdConfig, inputs: dict[str, Any]) -> Any:
        return update_state_bwd(inputs["K"], inputs["V"], inputs["G"], inputs["dS"], inputs["ds"], deg=key.deg,
                                d_tile=key.d_tile, chunk_size=inputs["chunk_size"], config=config)

    def reference(self, key: UpdateStateBwdKey, inputs: dict[str, Any]) -> Any:
        """(dK, dV, E) of KV head 0, first chunks (chunks and heads are independent), float64."""
        from vidrial.reference import backward as em
        from vidrial.kernels.power_retention import bwd_tuning as bt

        c = inputs["chunk_size"]
        nm = bt.check_slice(inputs["K"].shape[1] // c)
        rows = nm * c
        f64 = {k: inputs[k][:1, :rows, :1].double() for k in ("K", "V", "G")}
        return em.update_state_bwd(f64["K"], f64["V"], f64["G"], inputs["dS"][:1, :nm, :1].double(),
                                   inputs["ds"][:1, :nm, :1].double(), key.deg, key.d_tile, c)


FAMILY = register(UpdateStateBwdFamily())


def update_state_bwd(K, V, G, dS, ds, *, deg: int, d_tile: int, chunk_size: int, config=None):
    """dK, dV [b,t,h,d] fp32 and E [b,t,h] fp32 (phi(k~).dphi, None without gating).

    K, V [b,t,h,d] bf16/fp16 with t a multiple of chunk_size; G [b,t,h] fp32 chunk-local cumulative
    log gates or None; dS [b,n,h,D,d] fp32 or bf16, ds [b,n,h,D] fp32. Current stream, no host sync.

    The kernel reads dS as bf16 (one conversion here unless it is given in bf16; ds stays fp32): 8
    significant bits per entry, relative rounding <= 2^-9, and both GEMMs sum D >= hundreds of products
    in fp32 with independent rounding errors, so dK, dV and E stay within ~1e-3 of float64
    (tests/test_us_bwd_mma16_cpu.py measures it) -- well inside the project's bf16 tolerance of ~1e-2. Rounding phi(k) to bf16 for the
    dV GEMM is the same size; V is exact (bf16 input), fp16 V is rounded to bf16."""
    out = FAMILY(config, K=K, V=V, G=G, dS=dS, ds=ds, deg=deg, d_tile=d_tile, chunk_size=chunk_size)
    return out["dK"], out["dV"], out["E"]
