"""discumsum backward (docs/MATH.md section 4): reverse scan over the chunks.

    acc = dSbar_n (gradient of the final state, or 0)
    nu = n-1 .. 0:  dS_nu = acc,  dL_nu = e^L_nu (<Sbar_nu, acc> + <sbar_nu, acc_s>),
                    acc = dSbar_nu + e^L_nu acc
    d initial_state = acc

The kernel overwrites its input dSbar/dsbar with dS/ds (in place, no second state-sized buffer);
dL comes as per-warp partial sums (no atomics, no barrier) reduced here. Sbar_nu is read from the
forward's bf16 copy (the only state copy the forward keeps). templates/discumsum_bwd.cu.j2 keeps the next
chunk's loads in flight while one is processed, with 16-byte state vectors; it replaced a plain scan (one
chunk of loads at a time, a barrier per chunk) that was 3.5-4.3x slower at shapes A and B on an H200
(docs/PERF_NOTES.md, 2026-12-02).
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.tensors import pow2_bucket, ptr
from vidrial.kernels import register
from vidrial.kernels.power_retention.bwd_tuning import SliceCheck

__all__ = ["DiscumsumBwdConfig", "DiscumsumBwdKey", "FAMILY", "discumsum_bwd"]


class DiscumsumBwdConfig(KernelConfig):
    threads: int = Field(128, description="threads per CTA")
    per_thread: int = Field(4, description="state elements per thread (16-byte vectors strided by threads: "
                                           "coalesced)")

    @model_validator(mode="after")
    def _valid(self):
        if self.threads not in (64, 128, 256, 512, 1024):
            raise ConfigError("threads", self.threads, "one of 64, 128, 256, 512, 1024")
        if not 4 <= self.per_thread <= 32 or self.per_thread % 4:
            raise ConfigError("per_thread", self.per_thread, "a multiple of 4 between 4 and 32 (16-byte vectors)")
        return self

    @property
    def dl_parts_per_cta(self) -> int:
        """dL partial sums per CTA: one per warp."""
        return self.threads // 32


class DiscumsumBwdKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "feature_dim")
    head_dim: int = 64
    feature_dim: int = 2304
    batch_heads: int = Field(8, description="bucket (power of two) of batch * kv heads")
    chunks: int = Field(64, description="bucket (power of two) of the number of chunks")

    @model_validator(mode="after")
    def _valid(self):
        if self.head_dim <= 0 or self.feature_dim <= 0:
            raise ConfigError("head_dim/feature_dim", (self.head_dim, self.feature_dim), "positive integers")
        return self


class DiscumsumBwdFamily(SliceCheck, KernelFamily[DiscumsumBwdKey, DiscumsumBwdConfig]):
    name = "discumsum_bwd"
    template = "discumsum_bwd.cu.j2"
    Config = DiscumsumBwdConfig
    Key = DiscumsumBwdKey
    signature = ("ptr",) * 11 + ("i32",) * 4

    def default_config(self, key: DiscumsumBwdKey) -> DiscumsumBwdConfig:
        return DiscumsumBwdConfig(threads=128, per_thread=4)  # best at shape A, within 4% of the best at B

    def render_context(self, key: DiscumsumBwdKey, config: DiscumsumBwdConfig) -> dict[str, Any]:
        return dict(threads=config.threads, per_thread=config.per_thread, D=key.feature_dim, d=key.head_dim,
                    key_label=key.label(), config_label=config.label())

    def threads_per_block(self, config: DiscumsumBwdConfig) -> int:
        return config.threads

    def dynamic_smem_bytes(self, key: DiscumsumBwdKey, config: DiscumsumBwdConfig) -> int:
        return 0

    def check(self, key: DiscumsumBwdKey, config: DiscumsumBwdConfig, arch: str) -> None:
        super().check(key, config, arch)
        cap = min(255, 65536 // config.threads)
        need = 5 * config.per_thread + 32  # two chunks of loads in flight
        if need > cap:
            raise ConfigError("per_thread", config.per_thread,
                              f"{config.threads} threads allow {cap} registers per thread; per_thread="
                              f"{config.per_thread} needs ~{need}")

    def shape_keys(self) -> list[DiscumsumBwdKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        return unique(self.problem_key(dict(dSbar=meta(p.b, p.chunks, p.h, p.feature_dim, p.d, dtype="float32")))
                      for p in training_problems())

    def corner_configs(self, key: DiscumsumBwdKey) -> list[DiscumsumBwdConfig]:
        return [self.default_config(key), DiscumsumBwdConfig(threads=64, per_thread=4),
                DiscumsumBwdConfig(threads=1024, per_thread=4), DiscumsumBwdConfig(threads=256, per_thread=8),
                DiscumsumBwdConfig(threads=512, per_thread=16)]

    # ---- launch path -------------------------------------------------------------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """dSbar [b,n,h,D,d] / dsbar [b,n,h,D] fp32 contiguous (updated in place), Sbar16 [b,n,h,D,d] bf16,
        sbar [b,>=n,h,D] fp32, chunk_gates [b,n,h] or None, dS_final / ds_final or None, want_initial,
        dS_dtype (float32: dS in place of dSbar; bfloat16: dS into a new bf16 tensor, dSbar only read)."""
        import torch

        dSbar, dsbar, Sbar16, sbar = x["dSbar"], x["dsbar"], x["Sbar16"], x["sbar"]
        b, n, h, D, d = dSbar.shape
        for name, y in (("dSbar", dSbar), ("dsbar", dsbar)):
            if y.dtype != torch.float32 or not y.is_contiguous():
                raise InputError(name, (str(y.dtype), y.is_contiguous()), "a contiguous float32 tensor (updated in place)")
        if tuple(dsbar.shape) != (b, n, h, D):
            raise InputError("dsbar", tuple(dsbar.shape), f"{(b, n, h, D)}")
        if Sbar16.dtype != torch.bfloat16 or tuple(Sbar16.shape) != (b, n, h, D, d):
            raise InputError("Sbar16", (tuple(Sbar16.shape), str(Sbar16.dtype)), f"bfloat16 {(b, n, h, D, d)}")
        if sbar.dtype != torch.float32 or sbar.shape[1] < n or tuple(sbar.shape[::2]) != (b, h):
            raise InputError("sbar", (tuple(sbar.shape), str(sbar.dtype)), f"float32 [{b}, >={n}, {h}, {D}]")
        if b * h > 65535:
            raise InputError("dSbar", f"batch*heads={b * h}", "batch * heads <= 65535")
        contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
        dS_dtype = x.get("dS_dtype", torch.float32)
        if dS_dtype not in (torch.float32, torch.bfloat16):
            raise InputError("dS_dtype", dS_dtype, "torch.float32 (in place) or torch.bfloat16")
        return dict(dSbar=dSbar, dsbar=dsbar, Sbar16=Sbar16.contiguous(), sbar=sbar.contiguous(),
                    chunk_gates=contiguous(x.get("chunk_gates")), dS_final=contiguous(x.get("dS_final")),
                    ds_final=contiguous(x.get("ds_final")), want_initial=bool(x.get("want_initial", False)),
                    dS_dtype=dS_dtype)

    def problem_key(self, x: dict[str, Any]) -> DiscumsumBwdKey:
        """b*h and n bucketed to powers of two."""
        b, n, h, D, d = x["dSbar"].shape
        return DiscumsumBwdKey(head_dim=d, feature_dim=D, batch_heads=pow2_bucket(b * h), chunks=pow2_bucket(n))

    def outputs(self, key: DiscumsumBwdKey, config: DiscumsumBwdConfig, x: dict[str, Any]) -> dict[str, Any]:
        """dS (dSbar overwritten, or a new bf16 tensor), ds (dsbar, overwritten), dL_parts [b*h, n, CTAs]
        (gated), d_initial [b,h,D,d] and d_sum_of_keys [b,h,D] (want_initial)."""
        import torch

        b, n, h, D, d = x["dSbar"].shape
        tile = config.threads * config.per_thread
        parts = (-(-(D * d) // tile) + -(-D // tile)) * config.dl_parts_per_cta
        new = lambda *shape: torch.empty(shape, device=x["dSbar"].device, dtype=torch.float32)  # noqa: E731
        bf16 = x["dS_dtype"] == torch.bfloat16
        return dict(dS=torch.empty_like(x["dSbar"], dtype=torch.bfloat16) if bf16 else x["dSbar"], ds=x["dsbar"],
                    dL_parts=new(b * h, n, parts) if x["chunk_gates"] is not None else None,
                    d_initial=new(b, h, D, d) if x["want_initial"] else None,
                    d_sum_of_keys=new(b, h, D) if x["want_initial"] else None)

    def launches(self, key: DiscumsumBwdKey, config: DiscumsumBwdConfig, x: dict[str, Any], out: dict[str, Any]):
        b, n, h, D, d = x["dSbar"].shape
        if b * h == 0 or n == 0:
            return
        tile = config.threads * config.per_thread
        blocks_S, blocks_s = -(-(D * d) // tile), -(-D // tile)
        yield Launch((blocks_S + blocks_s, b * h, 1),
                     (x["dSbar"].data_ptr(), x["dsbar"].data_ptr(), x["Sbar16"].data_ptr(), x["sbar"].data_ptr(),
                      ptr(x["chunk_gates"]), ptr(x["dS_final"]), ptr(x["ds_final"]), ptr(out["d_initial"]),
                      ptr(out["d_sum_of_keys"]), ptr(out["dL_parts"]),
                      out["dS"].data_ptr() if out["dS"] is not x["dSbar"] else 0, n, h, x["sbar"].shape[1], blocks_S))

    # ---- tuner protocol (shared pieces: bwd_tuning.py) -------------------------------------------
    def make_inputs(self, key: DiscumsumBwdKey, device: Any, seed: int) -> dict[str, Any]:
        """b = 1, h = batch_heads, n = chunks; Gaussian gradients and states (the scan is linear in the
        gradients and only reads the states), chunk gates that vary across chunks (docs/MATH.md section 4:
        a constant gate hides index bugs). The kernel works in place: dSbar0/dsbar0 keep head 0's
        original gradients, the checked slice."""
        from vidrial.kernels.power_retention import bwd_tuning as bt

        b, n, h, D, d = 1, key.chunks, key.batch_heads, key.feature_dim, key.head_dim
        gen = bt.generator(device, seed)
        dSbar, dsbar = bt.randn((b, n, h, D, d), gen, device), bt.randn((b, n, h, D), gen, device)
        L = -2.0 * bt.rand((b, n, h), gen, device)
        return dict(dSbar=dSbar, dsbar=dsbar, dSbar0=dSbar[:, :, :1].clone(), dsbar0=dsbar[:, :, :1].clone(),
                    Sbar16=bt.randn((b, n, h, D, d), gen, device, bt.DTYPES["bfloat16"]),
                    sbar=bt.randn((b, n + 1, h, D), gen, device), L=L)

    def run(self, key: DiscumsumBwdKey, config: DiscumsumBwdConfig, inputs: dict[str, Any]) -> Any:
        """(dS, ds, dL), dS in bf16 as the backward runs it (into a new tensor: dSbar is only read). ds
        overwrites dsbar in place, so head 0 of it (the checked slice) is restored first: every config's
        checked run sees the original gradients there (a copy of 1/batch_heads of dsbar per timed run, the
        same for every config); the other heads are rescanned each run (values do not change the time, and
        the strictly triangular reverse scan never overflows: it reaches 0 after n runs)."""
        import torch

        inputs["dsbar"][:, :, :1].copy_(inputs["dsbar0"])
        dS, ds, dL, _, _ = discumsum_bwd(inputs["dSbar"], inputs["dsbar"], inputs["Sbar16"], inputs["sbar"],
                                         inputs["L"], dS_dtype=torch.bfloat16, config=config)
        return dS, ds, dL

    def reference(self, key: DiscumsumBwdKey, inputs: dict[str, Any]) -> Any:
        """(dS, ds, dL) of head 0, all chunks (the scan runs over them), float64."""
        from vidrial.reference import backward as em

        n = inputs["L"].shape[1]
        dS, ds, dL, _, _ = em.discumsum_bwd(inputs["dSbar0"].double(), inputs["dsbar0"].double(),
                                            inputs["Sbar16"][:, :, :1].double(), inputs["sbar"][:, :n, :1].double(),
                                            inputs["L"][:, :, :1].double())
        return dS, ds, dL

    def tolerance(self, key: DiscumsumBwdKey) -> float:
        return 4e-3  # dS rounded to bf16 (relative 2^-9 per element); ds, dL: fp32 sums (~1e-6)


FAMILY = register(DiscumsumBwdFamily())


def discumsum_bwd(dSbar, dsbar, Sbar16, sbar, chunk_gates=None, dS_final=None, ds_final=None, *,
                  want_initial: bool = False, dS_dtype=None, config=None):
    """In place: dSbar [b,n,h,D,d] / dsbar [b,n,h,D] fp32 (gradients w.r.t. the states at the start of each
    chunk) become dS / ds (gradients w.r.t. the chunk states); with dS_dtype=torch.bfloat16, dS is written
    as a new bf16 tensor instead (what update_state_bwd reads: 2 bytes written per element instead of 4,
    and no conversion pass) and dSbar is left as it was. Sbar16 [b,n',h,D,d] bf16 (n' >= n),
    sbar [b,n'',h,D] fp32 (n'' >= n), chunk_gates [b,n,h] fp32 or None, dS_final [b,h,D,d] / ds_final
    [b,h,D] fp32 or None. Returns (dS, ds, dL [b,n,h] or None, d_initial [b,h,D,d] or None,
    d_sum_of_keys [b,h,D] or None). Current stream, no host sync."""
    import torch

    out = FAMILY(config, dSbar=dSbar, dsbar=dsbar, Sbar16=Sbar16, sbar=sbar, chunk_gates=chunk_gates,
                 dS_final=dS_final, ds_final=ds_final, want_initial=want_initial,
                 dS_dtype=dS_dtype if dS_dtype is not None else torch.float32)
    b, n, h = dSbar.shape[:3]
    dS0, ds0 = out["d_initial"], out["d_sum_of_keys"]
    if want_initial and (b * h == 0 or n == 0):  # no scan: the initial state's gradient is the final one's
        dS0.copy_(dS_final if dS_final is not None else torch.zeros_like(dS0))
        ds0.copy_(ds_final if ds_final is not None else torch.zeros_like(ds0))
    parts = out["dL_parts"]  # per-CTA partial sums (no atomics), reduced here
    dL = parts.sum(-1).view(b, h, n).transpose(1, 2) if parts is not None else None
    return out["dS"], out["ds"], dL, dS0, ds0
