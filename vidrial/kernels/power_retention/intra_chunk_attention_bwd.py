"""intra-chunk attention backward (docs/MATH.md section 4), flash style with the forward's saved m.

Inside each chunk (the quadratic path: one chunk of the whole sequence), j <= i:

    x = s q_i.k_j,  P = (|x| + 1e-7)^p e^(g_i - g_j - m_i),  dP = dO_i.v_j + dl_i
    dv_j += P dO_i,  ds = s p sign(x) (|x|+1e-7)^(p-1) e^(g_i-g_j-m_i) dP,  dq_i += ds k_j,
    dk_j += ds q_i,  dg_j -= P dP

(dO, dl: gradients w.r.t. the shifted O, l from the query_state backward; m is a constant because
O e^m and l e^m do not depend on it). Two passes of one template, FlashAttention-2 style on bf16 (fp16)
tensor cores (templates/intra_chunk_attention_bwd.cu.j2), P recomputed in each pass: ``stage="dkv"``
(key-stationary, loops over the r query heads: GQA sums without atomics) and ``stage="dq"``
(query-stationary). The dq pass can also return dgrow_i = sum_j P dP, the row part of the gate gradient
from the same bf16-operand P and dP as its dgcol (``want_dgrow``): vidrial.autograd uses it in place of
the fp32 row term dO.O + dl (l - 1e-6), which does not cancel against a dgcol made from the bf16-rounded dO.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.tensors import C_TYPES, dtype_name, pow2_bucket, ptr
from vidrial.kernels import register
from vidrial.kernels.power_retention.bwd_tuning import SliceCheck

__all__ = ["IntraBwdConfig", "IntraBwdKey", "FAMILY", "intra_chunk_attention_bwd", "intra_chunk_attention_bwd_pass"]


FLASH_HEAD_DIMS = (16, 32, 64, 128)
# Accumulator floats per thread above which a flash config spills on sm_80/sm_90 (ptxas, 255 registers).
FLASH_MAX_ACC = 160
# what flash_default stays under: the per-row scalars (dl, alpha, gates) need registers next to the
# accumulators; at 160 the d=128 dkv pass spills 4 bytes on sm_80 (255 registers) since alpha came in
FLASH_DEFAULT_ACC = 144


class IntraBwdConfig(KernelConfig):
    tile: int = Field(64, description="stationary rows per CTA (keys in dkv, queries in dq)")
    step: int = Field(64, description="rows of the other side per pipeline step")
    warps: int = Field(4, description="warps per CTA, each owns tile / warps stationary rows")

    @model_validator(mode="after")
    def _valid(self):
        if self.tile not in (32, 64, 128):
            raise ConfigError("tile", self.tile, "32, 64 or 128")
        if self.step not in (16, 32, 64):
            raise ConfigError("step", self.step, "16, 32 or 64")
        if self.warps not in (1, 2, 4, 8):
            raise ConfigError("warps", self.warps, "1, 2, 4 or 8")
        if self.tile % (16 * self.warps) or self.tile // (16 * self.warps) > 2:
            raise ConfigError("warps", self.warps, f"16 or 32 rows per warp: tile={self.tile} = 16 * warps * (1 or 2)")
        return self

    @property
    def row_blocks(self) -> int:
        """16-row blocks per warp."""
        return self.tile // (16 * self.warps)


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


def _flash_smem_bytes(key: IntraBwdKey, cfg: IntraBwdConfig) -> int:
    """templates/intra_chunk_attention_bwd.cu.j2: bf16 R1, R2 [tile][d], C1, C2 [2][step][d]; fp32 stats."""
    nstat = 3 if key.stage == "dkv" else 1
    return 2 * key.head_dim * (2 * cfg.tile + 4 * cfg.step) + 4 * 2 * nstat * cfg.step


def flash_accumulators(key: IntraBwdKey, cfg: IntraBwdConfig) -> int:
    """fp32 accumulators per thread of a config: scores s1, s2 and dK, dV (dkv) or dQ (dq)."""
    outs = 2 if key.stage == "dkv" else 1
    return cfg.row_blocks * (cfg.step + outs * key.head_dim // 2)


class IntraBwdFamily(SliceCheck, KernelFamily[IntraBwdKey, IntraBwdConfig]):
    name = "intra_chunk_attention_bwd"
    template = "intra_chunk_attention_bwd.cu.j2"
    Config = IntraBwdConfig
    Key = IntraBwdKey
    signature = ("ptr",) * 12 + ("i32",) * 6 + ("f32",)

    def default_config(self, key: IntraBwdKey) -> IntraBwdConfig:
        return flash_default(key)

    def render_context(self, key: IntraBwdKey, config: IntraBwdConfig) -> dict[str, Any]:
        # impl: picks this kernel in the wrapper template while the row loop's branch is still there
        return dict(impl="flash", head_dim=key.head_dim, deg=key.deg, tile=config.tile, step=config.step,
                    warps=config.warps, in_type=C_TYPES[key.dtype], pass_=key.stage, key_label=key.label(),
                    config_label=config.label())

    def threads_per_block(self, config: IntraBwdConfig) -> int:
        return 32 * config.warps

    def dynamic_smem_bytes(self, key: IntraBwdKey, config: IntraBwdConfig) -> int:
        return _flash_smem_bytes(key, config)

    def check(self, key: IntraBwdKey, config: IntraBwdConfig, arch: str) -> None:
        if config.tile > max(key.chunk_size, 32):  # (keeps dispatch's nearest key from handing a tuned tile to
            # smaller chunks; 32 is the smallest tile)
            raise ConfigError("tile", config.tile, f"at most max(chunk_size, 32) = {max(key.chunk_size, 32)} (a "
                                                   "larger tile mostly computes masked scores)")
        if key.head_dim not in FLASH_HEAD_DIMS:
            raise ConfigError("head_dim", key.head_dim, f"one of {FLASH_HEAD_DIMS}")
        acc = flash_accumulators(key, config)
        if acc > FLASH_MAX_ACC:
            raise ConfigError("step", config.step, f"{acc} fp32 accumulators per thread exceed {FLASH_MAX_ACC} "
                                                   f"(head_dim={key.head_dim}, {key.stage}): use a smaller step "
                                                   "or 16 rows per warp")
        super().check(key, config, arch)

    def shape_keys(self, dtype: str = "bfloat16") -> list[IntraBwdKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        return unique(self.problem_key(dict(stage=stage, Q=meta(p.b, p.t, p.h, p.d, dtype=dtype),
                                            K=meta(p.b, p.t, p.h, p.d, dtype=dtype), chunk_size=p.chunk_size,
                                            deg=p.deg))
                      for p in training_problems() for stage in ("dkv", "dq"))

    def standard_keys(self) -> list[IntraBwdKey]:
        return self.shape_keys() + self.shape_keys("float16")

    def corner_configs(self, key: IntraBwdKey) -> list[IntraBwdConfig]:
        return [self.default_config(key)]  # (only the default: the CI compiles every corner on two archs)

    # ---- launch path: one pass (vidrial.autograd has checked the forward's inputs) -------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """stage "dkv" or "dq"; Q [b,t,hq,d], K, V [b,t,h,d] bf16/fp16; G [b,t,h] fp32 or None; m, dl
        [b,t,hq], dO [b,t,hq,d] fp32; deg, scale, chunk_size (None: the whole sequence); want_dg,
        want_dgrow; dY or flash_operands (see intra_chunk_attention_bwd_pass)."""
        Q, K = x["Q"], x["K"]
        if x["stage"] not in ("dkv", "dq"):
            raise InputError("stage", repr(x["stage"]), "'dkv' or 'dq'")
        h, hq = K.shape[2], Q.shape[2]
        if h < 1 or hq % h:
            raise InputError("Q", tuple(Q.shape), f"query heads a multiple of the KV heads {h}")
        y = {k: x[k].contiguous() for k in ("Q", "K", "V", "m", "dl")}
        G = x.get("G")
        operands = x.get("flash_operands")
        if Q.numel() and operands is None:
            operands = flash_dO_operands(x["dO"], x.get("dY"), Q.dtype)
        if operands is not None:  # cp.async needs 16-byte aligned rows
            operands = (operands[0] if operands[0].data_ptr() % 16 == 0 else operands[0].clone(), operands[1])
            for k in ("Q", "K", "V"):
                y[k] = y[k] if y[k].data_ptr() % 16 == 0 else y[k].clone()
        c = int(x["chunk_size"]) if x.get("chunk_size") else Q.shape[1]
        return dict(y, stage=x["stage"], G=G.contiguous() if G is not None else None, deg=x["deg"],
                    scale=float(x["scale"]), chunk_size=c, want_dg=x.get("want_dg", True),
                    want_dgrow=x.get("want_dgrow", False), flash_operands=operands)

    def problem_key(self, x: dict[str, Any]) -> IntraBwdKey:
        """The pass, the chunk and b*t*hq bucketed to powers of two (chunk_size None: the sequence)."""
        b, t, hq, d = x["Q"].shape
        c = int(x["chunk_size"]) if x.get("chunk_size") else t
        return IntraBwdKey(head_dim=d, deg=x["deg"], dtype=dtype_name(x["Q"].dtype), stage=x["stage"],
                           chunk_size=pow2_bucket(c), tokens=pow2_bucket(b * t * hq))

    def outputs(self, key: IntraBwdKey, config: IntraBwdConfig, x: dict[str, Any]) -> dict[str, Any]:
        """dkv: dK, dV [b,t,h,d], dg (the column gate term [b,t,h], want_dg); dq: dQ [b,t,hq,d], dg (the
        row term sum_j P dP [b,t,hq], want_dgrow). fp32; dg None without gates."""
        import torch

        b, t, hq, d = x["Q"].shape
        h, gated = x["K"].shape[2], x["G"] is not None
        new = lambda *shape: torch.empty(shape, device=x["Q"].device, dtype=torch.float32)  # noqa: E731
        if key.stage == "dkv":
            return dict(dQ=None, dK=new(b, t, h, d), dV=new(b, t, h, d),
                        dg=new(b, t, h) if x["want_dg"] and gated else None)
        return dict(dQ=new(b, t, hq, d), dK=None, dV=None, dg=new(b, t, hq) if x["want_dgrow"] and gated else None)

    def launches(self, key: IntraBwdKey, config: IntraBwdConfig, x: dict[str, Any], out: dict[str, Any]):
        Q, K, c = x["Q"], x["K"], x["chunk_size"]
        b, t, hq, d = Q.shape
        if Q.numel() == 0:
            return
        h, n, tiles = K.shape[2], -(-t // c), -(-c // config.tile)
        heads = h if key.stage == "dkv" else hq
        if b * heads * n * tiles >= 2**31:
            raise InputError("Q", tuple(Q.shape), "fewer than 2^31 tiles")
        dYin, alpha = x["flash_operands"]
        yield Launch((b * heads * n * tiles, 1, 1),
                     (*(ptr(y) for y in (Q, K, x["V"], x["G"], x["m"], dYin, x["dl"], alpha)), ptr(out["dQ"]),
                      ptr(out["dK"]), ptr(out["dV"]), ptr(out["dg"]), t, n, c, hq, hq // h, tiles, x["scale"]))

    # ---- tuner protocol (shared pieces and the checked slice: bwd_tuning.py) ----------------------
    def make_inputs(self, key: IntraBwdKey, device: Any, seed: int) -> dict[str, Any]:
        """b = 1, `key.tokens` split into up to 8 heads (no GQA) of chunks of `key.chunk_size`; real gates,
        the forward's row shift m (exact, float64: bwd_tuning.intra_forward), Gaussian dO, dl
        (the passes are linear in them)."""
        from vidrial.kernels.power_retention import bwd_tuning as bt

        t, h, c = bt.split_tokens(key.tokens, key.chunk_size)
        d, dt = key.head_dim, bt.DTYPES[key.dtype]
        gen = bt.generator(device, seed)
        Q, K, V = (bt.randn((1, t, h, d), gen, device, dt) for _ in range(3))
        log_G, g = bt.chunk_gates(1, t, h, c, gen, device)
        _, _, m = bt.intra_forward(Q, K, V, log_G, key.deg, d**-0.5, c)
        return dict(Q=Q, K=K, V=V, G=g, m=m.float(), dO=bt.randn((1, t, h, d), gen, device),
                    dl=bt.randn((1, t, h), gen, device), scale=d**-0.5, chunk_size=c)

    def run(self, key: IntraBwdKey, config: IntraBwdConfig, inputs: dict[str, Any]) -> Any:
        """This stage's pass only: dkv -> (dK, dV, dgcol), dq -> (dQ,)."""
        x = inputs
        out = intra_chunk_attention_bwd_pass(key.stage, x["Q"], x["K"], x["V"], x["G"], x["m"], x["dO"], x["dl"],
                                             deg=key.deg, scale=x["scale"], chunk_size=x["chunk_size"],
                                             config=config)
        return out if key.stage == "dkv" else (out,)

    def reference(self, key: IntraBwdKey, inputs: dict[str, Any]) -> Any:
        """The float64 emulation on KV head 0 (its r query heads), first chunks."""
        from vidrial.reference import backward as em
        from vidrial.kernels.power_retention import bwd_tuning as bt

        x, c = inputs, inputs["chunk_size"]
        t, hq = x["Q"].shape[1:3]
        r = hq // x["K"].shape[2]
        rows = slice(0, bt.check_slice(t // c) * c)
        q = {k: x[k][:1, rows, :r].double() for k in ("Q", "m", "dO", "dl")}
        kv = {k: x[k][:1, rows, :1].double() for k in ("K", "V", "G")}
        dQ, dK, dV, dg = em.intra_bwd(q["Q"], kv["K"], kv["V"], kv["G"], q["m"], q["dO"], q["dl"], key.deg,
                                      x["scale"], c)
        return (dK, dV, dg) if key.stage == "dkv" else (dQ,)


def flash_default(key: IntraBwdKey) -> IntraBwdConfig:
    """The config used when nothing is tuned: 64 stationary rows over 4 warps; 64-row steps, shorter
    (32, 16) where d = 128 would exceed the default's register budget (FLASH_DEFAULT_ACC)."""
    cfg = IntraBwdConfig(tile=64, step=64, warps=4)
    if key.chunk_size < 64:  # a tile within the chunk: 32 rows over 2 warps
        cfg = IntraBwdConfig(tile=32, step=32, warps=2)
    for step in (32, 16):
        if flash_accumulators(key, cfg) <= FLASH_DEFAULT_ACC:
            break
        cfg = cfg.model_copy(update={"step": step})
    return cfg


FAMILY = register(IntraBwdFamily())


def pass_config(stage: str, Q, K, *, deg: int, chunk_size: int | None, config=None) -> IntraBwdConfig:
    """The config a pass runs with: `config`, else the dispatched one for this problem."""
    key = FAMILY.problem_key(dict(stage=stage, Q=Q, K=K, deg=deg, chunk_size=chunk_size))
    return FAMILY.config_for(key, Q.device, config)


def flash_dO_operands(dO, dY, dtype):
    """(dY in `dtype`, alpha [b,t,hq] fp32) with dO = alpha dY row by row: the flash kernel's dP GEMM takes
    the incoming gradient exactly, in the input type, and the row scalar in fp32 (why: the template's header).
    dY given (dO = dY times a row scalar, as the backward makes it): alpha = |dO_i| / |dY_i| (exact to fp32
    rounding). dY None: rows of dO scaled to max |.| = 1 and rounded to `dtype` (a fallback for callers that
    only have dO, e.g. the tuner's random problems)."""
    import torch

    # reductions without fp32 copies of the [b,t,hq,d] tensors, one write of the operand at most: this runs
    # on every training step (two fp32 temporaries of dO cost 0.36 ms at shape A on an H200)
    if dY is not None:
        nrm = torch.linalg.vector_norm(dY, dim=-1, dtype=torch.float32)
        alpha = torch.where(nrm > 0, torch.linalg.vector_norm(dO, dim=-1) / nrm, torch.zeros_like(nrm))
        return (dY if dY.dtype == dtype else dY.to(dtype)).contiguous(), alpha
    amax = torch.linalg.vector_norm(dO, ord=float("inf"), dim=-1)
    alpha = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.div(dO, alpha.unsqueeze(-1), out=torch.empty(dO.shape, device=dO.device, dtype=dtype)), alpha


def intra_chunk_attention_bwd_pass(stage: str, Q, K, V, G, m, dO, dl, *, deg: int, scale: float,
                                   chunk_size: int | None, want_dg: bool = True, config=None,
                                   want_dgrow: bool = False, dY=None, flash_operands=None):
    """One pass (inputs as intra_chunk_attention_bwd): stage "dkv" returns (dK, dV [b,t,h,d], dgcol [b,t,h]
    or None), stage "dq" returns dQ [b,t,hq,d] (fp32), or with `want_dgrow` (dQ, dgrow [b,t,hq] fp32 =
    sum_j P dP, None without G). Current stream, no host sync.
    flash_operands: flash_dO_operands(dO, dY, Q.dtype) when the caller made them once for both passes."""
    out = FAMILY(config, stage=stage, Q=Q, K=K, V=V, G=G, m=m, dO=dO, dl=dl, deg=deg, scale=scale,
                 chunk_size=chunk_size, want_dg=want_dg, want_dgrow=want_dgrow, dY=dY, flash_operands=flash_operands)
    if stage == "dkv":
        return out["dK"], out["dV"], out["dg"]
    return (out["dQ"], out["dg"]) if want_dgrow else out["dQ"]


def intra_chunk_attention_bwd(Q, K, V, G, m, dO, dl, *, deg: int, scale: float, chunk_size: int | None,
                              want_dg: bool = True, config=None, dq_config=None, want_dgrow: bool = False, dY=None,
                              alpha=None):
    """Q [b,t,hq,d], K, V [b,t,h,d] bf16/fp16; G [b,t,h] fp32 cumulative log gates (chunk-local; global for
    chunk_size None) or None; m, dl [b,t,hq], dO [b,t,hq,d] fp32. t need not be a multiple of the chunk.
    Returns dQ [b,t,hq,d], dK, dV [b,t,h,d], dgcol [b,t,h] (or None) fp32. Current stream, no host sync.
    `config` (dkv pass) and `dq_config` (dq pass): each pass's tiles.
    want_dgrow: also return dgrow [b,t,hq] fp32 = sum_j P dP (5th value), the row part of the gate gradient
    consistent with dgcol (None without gates).
    dY [b,t,hq,d] (input type): the gradient that dO is a row-scaled copy of (dO_i = alpha_i dY_i), when the
    caller has it; the kernels then take it exactly (flash_dO_operands).
    alpha [b,t,hq] fp32 with dY: the row factors (dO_i = alpha_i dY_i) when the caller knows them (the
    backward: query_state_bwd's rows pass writes them); dO is then not read and may be None."""
    Q, K, V, m, dl = (x.contiguous() for x in (Q, K, V, m, dl))  # once for both passes
    G = G.contiguous() if G is not None else None
    kw = dict(deg=deg, scale=scale, chunk_size=chunk_size, dY=dY)
    config = pass_config("dkv", Q, K, deg=deg, chunk_size=chunk_size, config=config)
    dq_config = pass_config("dq", Q, K, deg=deg, chunk_size=chunk_size, config=dq_config)
    if alpha is not None:
        if dY is None:
            raise InputError("alpha", "given without dY", "alpha together with dY (dO = alpha dY row by row)")
        kw["flash_operands"] = ((dY if dY.dtype == Q.dtype else dY.to(Q.dtype)).contiguous(), alpha.contiguous())
    elif Q.numel():  # the operands once for both passes
        kw["flash_operands"] = flash_dO_operands(dO.contiguous(), dY, Q.dtype)
    dK, dV, dg = intra_chunk_attention_bwd_pass("dkv", Q, K, V, G, m, dO, dl, want_dg=want_dg, config=config, **kw)
    dq_out = intra_chunk_attention_bwd_pass("dq", Q, K, V, G, m, dO, dl, config=dq_config, want_dgrow=want_dgrow,
                                            **kw)
    if not want_dgrow:
        return dq_out, dK, dV, dg
    dQ, dgrow = dq_out
    return dQ, dK, dV, dg, dgrow
