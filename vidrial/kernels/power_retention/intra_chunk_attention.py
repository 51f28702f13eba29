"""Intra-chunk power attention (docs/MATH.md section 3 step 3, and section 1 for the quadratic path).

Causal inside each chunk of ``chunk_size`` tokens (``chunk_size`` None/0: the whole sequence is
one causal block), gated, GQA (query head i reads KV head i // r), flash-style on mma.sync
(templates/intra_chunk_attention.cu.j2). The weights are

    w_ij = (|s q_i.k_j| + 1e-7)^p * exp(G_i - G_j),   j <= i in the same chunk,

with G the cumulative log gate (inside the chunk; the same differences as the global cumsum).
Two output modes, chosen at compile time (``normalize``):

* merge (``normalize=False``): ``(O, l, m)``, all float32, exactly the definition of
  ``reference.intra_chunk_attention_reference``:

      m_i = max_j log w_ij                        [b,t,hq]   (natural log, row shift)
      O_i = sum_j w_ij v_j * exp(-m_i)            [b,t,hq,d]
      l_i = sum_j w_ij * exp(-m_i) + 1e-6         [b,t,hq]   (>= 1: the max term is 1)

  so ``O / l`` is the chunk-local output and ``O e^m``, ``(l - 1e-6) e^m`` the true sums, for the
  merge with the state half (query_state).
* normalised (``normalize=True``): ``Y = O / l`` in the input dtype [b,t,hq,d].

Batch, time and heads are runtime arguments; head_dim, degree, dtype, chunk size, gating and the
mode are compile-time (the problem key).
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
from vidrial.core.tensors import C_TYPES, HEAD_DIMS, IN_DTYPES, InDType, check_tensor, dtype_name, pow2_bucket, ptr
from vidrial.kernels import register
from vidrial.kernels.power_retention.sympow import SUPPORTED_DEGREES

TILE_MS = (16, 32, 64, 128, 256)
TILE_NS = (16, 32, 64, 128)
WARP_CHOICES = (1, 2, 4, 8)
MAX_M_FRAGS = 4
# The gate vector of the quadratic path is padded to a multiple of this (>= every tile_m).
G_PAD = 256
# Rough register budget for accumulators + fragments (the rest: addresses, temporaries), calibrated
# on ptxas (NVRTC 13.0, sm_80/sm_90): S counts 1.5x (it also lives on as P and the masked path).
REGISTER_BUDGET = 230
# the spelling the template tests (`dtype == "bf16"`)
_TEMPLATE_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}


class IntraChunkAttentionConfig(KernelConfig):
    """Tiles of the intra-chunk attention kernel.

    tile_m: queries per CTA (= 16 * warps * m_frags; each warp owns whole 16-row MMA tiles);
    tile_n: keys per pipeline step (divides tile_m); warps: warps per CTA; stages: cp.async
    depth of the K/V pipeline; rescale_log2: log2 of the threshold by which a row maximum must
    grow before O and l are rescaled (P = w / shift stays <= 2^rescale_log2; 0 = always rescale);
    min_ctas: __launch_bounds__ minimum CTAs per SM (caps registers at 65536 / (threads * min_ctas));
    q_in_regs: keep the Q fragments in registers for the whole key loop (else re-read them from
    shared memory at every k-step: fewer registers, more shared-memory traffic)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "tile_m": OneOf(TILE_MS), "tile_n": OneOf(TILE_NS, "16-key MMA steps"), "warps": OneOf(WARP_CHOICES),
        "stages": Between(2, 4, "cp.async pipeline depth"),
        "rescale_log2": Between(0, 12, "P <= 2^rescale_log2 must fit fp16"), "min_ctas": Between(1, 4),
    }

    tile_m: int = 128
    tile_n: int = 64
    warps: int = 4
    stages: int = 2
    rescale_log2: int = 8
    min_ctas: int = 1
    q_in_regs: bool = True

    @model_validator(mode="after")
    def _split(self) -> "IntraChunkAttentionConfig":
        if self.tile_m % (16 * self.warps):
            raise ConfigError("tile_m", self.tile_m,
                              f"a multiple of 16 * warps = {16 * self.warps} (each warp owns whole 16-row MMA tiles)")
        if self.m_frags > MAX_M_FRAGS:
            raise ConfigError("tile_m", self.tile_m,
                              f"at most {MAX_M_FRAGS} 16-row fragments per warp (tile_m <= {16 * MAX_M_FRAGS} * warps)")
        if self.tile_m % self.tile_n:
            raise ConfigError("tile_n", self.tile_n, f"a divisor of tile_m={self.tile_m}")
        if self.tile_n > 32 * self.warps:
            raise ConfigError("tile_n", self.tile_n, f"at most the thread count 32 * warps = {32 * self.warps}")
        return self

    @property
    def m_frags(self) -> int:
        return self.tile_m // (16 * self.warps)


class IntraChunkAttentionKey(ProblemKey):
    """Compile-time constants plus buckets of the runtime work size.

    chunk_size 0 means the quadratic path (one causal block over the whole sequence)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "head_dim": OneOf(HEAD_DIMS), "deg": OneOf(SUPPORTED_DEGREES),
        "chunk_size": MultipleOf(16, allow_zero=True, why="0 is the quadratic path"),
        "bh_bucket": PowerOfTwo(), "t_bucket": PowerOfTwo(),
    }

    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "deg", "dtype", "chunk_size", "gating", "normalize")

    head_dim: int
    deg: int = 2
    dtype: InDType = "bfloat16"
    chunk_size: int = 1024
    gating: bool = True
    normalize: bool = False
    bh_bucket: int = 8  # power of two >= batch * q_heads
    t_bucket: int = 65536  # power of two >= t


def _register_estimate(key: IntraChunkAttentionKey, config: IntraChunkAttentionConfig) -> int:
    mf, d = config.m_frags, key.head_dim
    o_acc = mf * (d // 8) * 4
    s_acc = mf * (config.tile_n // 8) * 4
    q_frag = mf * (d // 16) * 4 if config.q_in_regs else mf * 4
    return o_acc + (3 * s_acc) // 2 + q_frag + mf * 12


class IntraChunkAttentionFamily(KernelFamily[IntraChunkAttentionKey, IntraChunkAttentionConfig]):
    name = "intra_chunk_attention"
    template = "intra_chunk_attention.cu.j2"
    Config = IntraChunkAttentionConfig
    Key = IntraChunkAttentionKey
    # Q, K, V, G, Out, L, M | t, hq, h, n_bh, g_len | Q/K/V strides (batch, time, head) | scale
    signature = ("ptr",) * 7 + ("i32",) * 5 + ("i64",) * 9 + ("f32",)

    # ---- configs ---------------------------------------------------------------------------
    def default_config(self, key: IntraChunkAttentionKey) -> IntraChunkAttentionConfig:
        d = key.head_dim
        tile_m = max(m for m in TILE_MS if m <= 128 and (key.chunk_size == 0 or key.chunk_size % m == 0))
        # d=128: one 16-row fragment per warp (O 64 + S 32 + Q 32 fp32 registers); smaller heads:
        # two fragments per warp, which halves the shared-memory traffic per MMA.
        warps = max(1, min(8, tile_m // 16)) if d == 128 else max(1, tile_m // 32)
        tile_n = min(64, tile_m)
        return IntraChunkAttentionConfig(tile_m=tile_m, tile_n=tile_n, warps=warps, stages=2)

    def corner_configs(self, key: IntraChunkAttentionKey) -> list[IntraChunkAttentionConfig]:
        """The smallest tiles and the largest that pass check() on sm_80."""
        out = [IntraChunkAttentionConfig(tile_m=16, tile_n=16, warps=1, stages=2)]
        large = None
        for tile_m, warps, tile_n, stages in ((256, 8, 128, 3), (256, 8, 64, 3), (128, 8, 128, 3), (128, 4, 64, 3),
                                              (128, 8, 64, 2), (64, 4, 64, 2)):
            try:
                cfg = IntraChunkAttentionConfig(tile_m=tile_m, tile_n=tile_n, warps=warps, stages=stages)
                self.check(key, cfg, "sm_80")
            except ConfigError:
                continue
            large = cfg
            break
        if large is not None and large != out[0]:
            out.append(large)
        return out

    def check(self, key: IntraChunkAttentionKey, config: IntraChunkAttentionConfig, arch: str) -> None:
        if key.chunk_size and key.chunk_size % config.tile_m:
            raise ConfigError("tile_m", config.tile_m, f"must divide chunk_size={key.chunk_size}")
        regs = _register_estimate(key, config)
        if regs > REGISTER_BUDGET:
            raise ConfigError("tile_m", config.tile_m,
                              f"{config.m_frags} fragments per warp need ~{regs} registers per thread "
                              f"(head_dim={key.head_dim}, tile_n={config.tile_n}); at most {REGISTER_BUDGET} fit "
                              "without spilling: lower tile_m or tile_n, or raise warps")
        super().check(key, config, arch)

    # ---- rendering and launch shape --------------------------------------------------------
    def threads_per_block(self, config: IntraChunkAttentionConfig) -> int:
        return config.warps * 32

    def dynamic_smem_bytes(self, key: IntraChunkAttentionKey, config: IntraChunkAttentionConfig) -> int:
        d = key.head_dim
        size = (config.tile_m * d + 2 * config.stages * config.tile_n * d) * 2
        if key.gating:
            size += (4 * config.tile_n + 4) * 4
        return size

    def render_context(self, key: IntraChunkAttentionKey, config: IntraChunkAttentionConfig) -> dict[str, Any]:
        return dict(
            head_dim=key.head_dim, deg=key.deg, dtype=_TEMPLATE_DTYPE[key.dtype], elem_type=C_TYPES[key.dtype],
            chunk_size=key.chunk_size, gating=key.gating, normalize=key.normalize,
            tile_m=config.tile_m, tile_n=config.tile_n, warps=config.warps, stages=config.stages,
            rescale_threshold=f"{float(2 ** config.rescale_log2):.1f}", min_ctas=config.min_ctas,
            q_in_regs=config.q_in_regs,
        )

    def shape_keys(self) -> list[IntraChunkAttentionKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        return unique(self.problem_key(dict(Q=meta(p.b, p.t, p.h, p.d), log_G=meta(p.b, p.t, p.h, dtype="float32"),
                                            deg=p.deg, chunk_size=p.chunk_size))
                      for p in training_problems())

    def standard_keys(self) -> list[IntraChunkAttentionKey]:
        keys = self.shape_keys()
        for d in HEAD_DIMS:
            for dtype in IN_DTYPES:
                keys.append(IntraChunkAttentionKey(head_dim=d, dtype=dtype, chunk_size=1024, gating=True))
                keys.append(IntraChunkAttentionKey(head_dim=d, dtype=dtype, chunk_size=0, gating=True, normalize=True,
                                                   t_bucket=16384))
        for d in (64,):
            keys.append(IntraChunkAttentionKey(head_dim=d, deg=4, chunk_size=1024, gating=True))
            keys.append(IntraChunkAttentionKey(head_dim=d, deg=2, chunk_size=64, gating=False))
            keys.append(IntraChunkAttentionKey(head_dim=d, deg=4, chunk_size=0, gating=False, normalize=True,
                                               t_bucket=16384))
        from vidrial.kernels.power_retention.standard_shapes import unique

        return unique(keys)

    # ---- tuner protocol (vidrial/tuning): inputs, a run, the float64 reference -------------------
    def make_inputs(self, key: IntraChunkAttentionKey, device: Any, seed: int) -> dict[str, Any]:
        """One problem at the key's own runtime sizes (what the winner is dispatched for): b=1,
        b*hq = bh_bucket query heads (GQA ratio 2 when there are two or more), t = t_bucket - 3 (same
        bucket; not a multiple of the chunk, so the partial last chunk runs; shorter only past the
        tuner's input cap), logsigmoid gates, drawn on `device`. The float64 reference covers a
        leading slice (reference())."""
        import torch

        from vidrial.core.protocol import generator, size_in_bucket

        dt = getattr(torch, key.dtype)
        r = 2 if key.bh_bucket >= 2 else 1
        b, hq, d = 1, key.bh_bucket, key.head_dim
        h = hq // r
        t_max = size_in_bucket(key.t_bucket, b * (hq * d * 2 + 2 * h * d * 2 + h * 4), field="t_bucket")
        t = max(key.t_bucket // 2 + 1, t_max - 3)
        gen = generator(device, seed)

        def randn(*shape: int) -> Any:
            return torch.randn(*shape, generator=gen, device=device).to(dt)

        Q, K, V = randn(b, t, hq, d), randn(b, t, h, d), randn(b, t, h, d)
        log_G = None
        if key.gating:
            log_G = torch.nn.functional.logsigmoid(torch.rand(b, t, h, generator=gen, device=device) * 6 - 1)
        return dict(Q=Q, K=K, V=V, log_G=log_G)

    def inputs_key(self, inputs: dict[str, Any], key: IntraChunkAttentionKey) -> IntraChunkAttentionKey:
        """The key the public op computes for `inputs` (same bucketing as the launcher)."""
        return self.problem_key(dict(inputs, deg=key.deg, chunk_size=key.chunk_size, normalize=key.normalize))

    def run(self, key: IntraChunkAttentionKey, config: IntraChunkAttentionConfig, inputs: dict[str, Any]) -> Any:
        return intra_chunk_attention(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], deg=key.deg,
                                     chunk_size=key.chunk_size or None, normalize=key.normalize, config=config)

    def reference(self, key: IntraChunkAttentionKey, inputs: dict[str, Any]) -> Any:
        """float64 on the first KV head (its query heads) and, chunked, the first two chunks: the
        attention is chunk-local, so the slice is exact; check_outputs compares that slice."""
        from vidrial.reference.forward import attention_reference, intra_chunk_attention_reference

        Q, K, V, log_G = inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"]
        r = Q.shape[2] // K.shape[2]
        t = min(Q.shape[1], 2 * key.chunk_size) if key.chunk_size else min(Q.shape[1], 4096)
        Q, K, V = Q[:, :t, :r], K[:, :t, :1], V[:, :t, :1]
        log_G = log_G[:, :t, :1] if log_G is not None else None
        if key.normalize and not key.chunk_size:
            return attention_reference(Q, K, V, log_G, key.deg)
        O, l, m = intra_chunk_attention_reference(Q, K, V, log_G, key.deg, None, key.chunk_size or Q.shape[1])
        return O / l.unsqueeze(-1) if key.normalize else (O, l, m)

    # ---- launch path ---------------------------------------------------------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """Q [b,t,hq,d], K, V [b,t,h,d] (same dtype, hq a multiple of h), log_G [b,t,h] fp32 or None,
        deg, scale, chunk_size (None/0: quadratic), normalize, out (preallocated outputs or None).
        Inputs whose strides are not 16-byte friendly are copied with .contiguous()."""
        import torch

        Q, K, V, log_G = x["Q"], x["K"], x["V"], x.get("log_G")
        what = "[batch, time, heads, head_dim]"
        check_tensor("Q", Q, dtypes=IN_DTYPES, ndim=4, what=what)
        b, t, hq, d = Q.shape
        if d not in HEAD_DIMS:
            raise InputError("Q", f"head_dim {d} (shape {tuple(Q.shape)})", f"head_dim in {HEAD_DIMS}")
        check_tensor("K", K, dtypes=IN_DTYPES, ndim=4, device=Q.device, what=what)
        check_tensor("V", V, dtypes=IN_DTYPES, ndim=4, what=what, like=("K", K))
        if K.dtype != Q.dtype:
            raise InputError("K/V", f"dtypes {K.dtype}/{V.dtype}", f"the dtype of Q ({Q.dtype})")
        if K.shape[0] != b or K.shape[1] != t or K.shape[3] != d:
            raise InputError("K", f"shape {tuple(K.shape)}", f"[{b}, {t}, kv_heads, {d}] matching Q {tuple(Q.shape)}")
        h = K.shape[2]
        if h < 1 or hq % h:
            raise InputError("Q", f"{hq} query heads", f"a multiple of the {h} KV heads of K (GQA)")
        deg, scale = x["deg"], x.get("scale")
        if deg not in SUPPORTED_DEGREES:
            raise InputError("deg", deg, f"one of {SUPPORTED_DEGREES}")
        c = x.get("chunk_size") or 0
        if isinstance(c, bool) or not isinstance(c, int) or c < 0 or c % 16:
            raise InputError("chunk_size", x.get("chunk_size"), "None/0 (quadratic) or a positive multiple of 16")
        if scale is not None and not isinstance(scale, (int, float)):
            raise InputError("scale", type(scale).__name__, "None or a float")
        s = 1.0 / math.sqrt(d) if not scale else float(scale)
        if not math.isfinite(s):
            raise InputError("scale", scale, "a finite number")
        if log_G is not None:
            check_tensor("log_G", log_G, dtypes=("float32",), shape=(b, t, h), device=Q.device,
                         what="[batch, time, kv_heads]")
        tiles = -(-t // c) * (c // 16) if c else -(-t // 16)
        if tiles * b * hq >= 2**31:
            raise InputError("Q", f"batch*heads={b * hq}, t={t}", "fewer than 2^31 query tiles; split the batch")
        Q, K, V = (y if _aligned(y) else y.contiguous() for y in (Q, K, V))
        normalize = bool(x.get("normalize", False))
        return dict(Q=Q, K=K, V=V, log_G=log_G, deg=deg, scale=s, chunk_size=c, normalize=normalize,
                    out=_checked_out(x.get("out"), Q, normalize))

    def problem_key(self, x: dict[str, Any]) -> IntraChunkAttentionKey:
        """Runtime sizes bucketed to powers of two (the tuner's make_inputs must give the key it tunes)."""
        b, t, hq, d = x["Q"].shape
        return _key(d, x["deg"], dtype_name(x["Q"].dtype), x["chunk_size"] or 0, x.get("log_G") is not None,
                    bool(x.get("normalize", False)), pow2_bucket(b * hq), pow2_bucket(t))

    def outputs(self, key: IntraChunkAttentionKey, config: IntraChunkAttentionConfig,
                x: dict[str, Any]) -> dict[str, Any]:
        """Y [b,t,hq,d] in the input dtype (normalize), else O [b,t,hq,d], l, m [b,t,hq] fp32."""
        import torch

        if x["out"] is not None:
            return x["out"]
        Q = x["Q"]
        b, t, hq, d = Q.shape
        if key.normalize:
            return {"Y": torch.empty((b, t, hq, d), device=Q.device, dtype=Q.dtype)}
        new = lambda *shape: torch.empty(shape, device=Q.device, dtype=torch.float32)  # noqa: E731
        return {"O": new(b, t, hq, d), "l": new(b, t, hq), "m": new(b, t, hq)}

    def launches(self, key: IntraChunkAttentionKey, config: IntraChunkAttentionConfig, x: dict[str, Any],
                 out: dict[str, Any]):
        Q, K, V, log_G, c = x["Q"], x["K"], x["V"], x["log_G"], key.chunk_size
        b, t, hq, d = Q.shape
        if b * hq == 0 or t == 0:
            return
        g_len, G = 0, None
        if log_G is not None:
            pad_to = c if c else G_PAD
            g_len = -(-t // pad_to) * pad_to
            G = gate_cumsum(log_G, c, g_len)
        tiles = math.ceil(t / c) * (c // config.tile_m) if c else math.ceil(t / config.tile_m)
        O = out["Y"] if key.normalize else out["O"]
        yield Launch((tiles * b * hq, 1, 1),
                     (Q.data_ptr(), K.data_ptr(), V.data_ptr(), ptr(G), O.data_ptr(), ptr(out.get("l")),
                      ptr(out.get("m")), t, hq, K.shape[2], b * hq, g_len, *Q.stride()[:3], *K.stride()[:3],
                      *V.stride()[:3], x["scale"]), keep=(G,))


FAMILY = family = register(IntraChunkAttentionFamily())


@cache
def _key(d: int, deg: int, dtype: str, chunk: int, gating: bool, normalize: bool, bh: int,
         t: int) -> IntraChunkAttentionKey:
    return IntraChunkAttentionKey(head_dim=d, deg=deg, dtype=dtype, chunk_size=chunk, gating=gating,
                                  normalize=normalize, bh_bucket=bh, t_bucket=t)


def _aligned(x) -> bool:
    return x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:3]) and x.data_ptr() % 16 == 0


def _checked_out(out: Any, Q: Any, normalize: bool) -> dict[str, Any] | None:
    """Preallocated outputs (Y, or the tuple (O, l, m)) as the outputs dict, checked."""
    import torch

    if out is None:
        return None
    b, t, hq, d = Q.shape
    outs = (out,) if normalize else tuple(out) if isinstance(out, (tuple, list)) else (out,)
    want = [((b, t, hq, d), Q.dtype)] if normalize else \
        [((b, t, hq, d), torch.float32), ((b, t, hq), torch.float32), ((b, t, hq), torch.float32)]
    if len(outs) != len(want) or any(
            not isinstance(y, torch.Tensor) or tuple(y.shape) != shp or y.dtype != dt or not y.is_contiguous()
            or y.device != Q.device for y, (shp, dt) in zip(outs, want)):
        raise InputError("out", [(tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
                                 for y in outs], f"contiguous tensors {want} on {Q.device}")
    return dict(zip(("Y",) if normalize else ("O", "l", "m"), outs))


def gate_cumsum(log_G, chunk_size: int, g_len: int):
    """[b, t, h] per-step log gates -> [b, h, g_len] float32 cumulative log gates (inside each
    chunk when chunk_size > 0, over the whole sequence otherwise), zero-padded in time.

    The scan runs along the innermost dimension of a [b, h, time] copy: torch's scan over an
    outer dimension ([b, t, h] along t) walks each of the b*h columns serially and took 0.23 ms
    at shape A (4.2 ms for b*h = 8, t = 16384) on an H200; an innermost scan is parallel."""
    import torch

    b, t, h = log_G.shape
    g = log_G.to(torch.float32).transpose(1, 2)  # [b, h, t] view
    g = torch.nn.functional.pad(g, (0, g_len - t)) if g_len > t else g.contiguous()
    if chunk_size:
        return g.view(b, h, g_len // chunk_size, chunk_size).cumsum(-1).view(b, h, g_len)
    return g.cumsum(-1)


def intra_chunk_attention(Q, K, V, log_G=None, *, deg: int, scale: float | None = None, chunk_size: int | None,
                          normalize: bool = False, config: IntraChunkAttentionConfig | None = None, out=None):
    """Causal power attention inside chunks (docs/MATH.md section 3 step 3) on the GPU.

    Q [b,t,hq,d], K, V [b,t,h,d]: bf16 or fp16 CUDA tensors (same dtype), hq a multiple of h, d in
    (32, 64, 128). log_G: [b,t,h] per-step log gates (float32, <= 0; cumsum'd here) or None.
    deg: 2 or 4. scale: None or 0 means 1/sqrt(d). chunk_size: None or 0 = the whole sequence is
    one causal block (quadratic path), else a positive multiple of 16 (t need not be a multiple:
    the last chunk is shorter). normalize=False returns (O [b,t,hq,d], l [b,t,hq], m [b,t,hq])
    float32 as in vidrial.reference.intra_chunk_attention_reference; normalize=True returns Y = O/l
    [b,t,hq,d] in the input dtype. Runs on the current stream with no host sync. Inputs whose
    strides are not 16-byte friendly (last dim contiguous, other strides multiples of 8 elements)
    are copied with .contiguous(). ``out`` (optional): preallocated contiguous outputs, Y or the
    tuple (O, l, m), of the shapes and dtypes above; they are written and returned.
    """
    res = family(config, Q=Q, K=K, V=V, log_G=log_G, deg=deg, scale=scale, chunk_size=chunk_size,
                 normalize=normalize, out=out)
    return res["Y"] if normalize else (res["O"], res["l"], res["m"])


__all__ = ["IntraChunkAttentionConfig", "IntraChunkAttentionKey", "IntraChunkAttentionFamily", "FAMILY", "family",
           "intra_chunk_attention", "gate_cumsum"]
