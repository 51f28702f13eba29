"""discumsum (docs/MATH.md section 3 step 2): discounted cumulative sum of chunk states.

    Sbar_0 = initial_state (or 0),   Sbar_{nu+1} = exp(L_nu) Sbar_nu + S_nu      (same for s)

S [b,n,h,D,d] fp32, s [b,n,h,D] fp32, L [b,n,h] fp32 chunk gates (g[nu, c-1]; None: no decay)
-> Sbar [b,n+1,h,D,d], sbar [b,n+1,h,D] fp32; index n is the final state.

Memory-bound. One CTA owns a slice of `threads * vec * vecs` elements of one (batch, head)
state and walks the chunks serially, loading the next chunk before accumulating the current
one (16-byte vectors with vec=4). The sum of keys s rides in extra CTAs with scalar accesses.
Optionally the kernel also writes a bf16 copy of Sbar_0..Sbar_{n-1} (the MMA operand of
query_state) and/or only the final fp32 state instead of all n+1 (the forward op needs only
the bf16 copy, sbar and the final state, which halves the bytes written).
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.rules import PowerOfTwo, Rule
from vidrial.core.tensors import check_tensor, pow2_bucket, ptr
from vidrial.kernels import register

__all__ = ["DiscumsumConfig", "DiscumsumKey", "DiscumsumFamily", "FAMILY", "discumsum", "discumsum_forward"]


class DiscumsumConfig(KernelConfig):
    threads: int = Field(256, description="threads per CTA")
    vec: int = Field(4, description="floats per vector access (4 = 16-byte loads)")
    vecs: int = Field(4, description="vectors per thread per chunk (loads in flight = 2 * vecs)")

    @model_validator(mode="after")
    def _valid(self):
        if self.threads not in (32, 64, 128, 256, 512, 1024):
            raise ConfigError("threads", self.threads, "one of 32, 64, 128, 256, 512, 1024")
        if self.vec not in (1, 2, 4):
            raise ConfigError("vec", self.vec, "one of 1, 2, 4 (floats per access)")
        if not 1 <= self.vecs <= 16:
            raise ConfigError("vecs", self.vecs, "between 1 and 16")
        return self

    @property
    def elements_per_thread(self) -> int:
        return self.vec * self.vecs


class DiscumsumKey(ProblemKey):
    # buckets are what problem_key() gives: another value could never be dispatched to (nor tuned)
    RULES: ClassVar[dict[str, Rule]] = {"batch_heads": PowerOfTwo(), "chunks": PowerOfTwo()}
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "feature_dim")
    head_dim: int = Field(64, description="d")
    feature_dim: int = Field(2304, description="D (features of the state)")
    batch_heads: int = Field(8, description="bucket (power of two) of batch * kv heads")
    chunks: int = Field(64, description="bucket (power of two) of the number of chunks")

    @model_validator(mode="after")
    def _valid(self):
        if self.head_dim <= 0 or self.feature_dim <= 0:
            raise ConfigError("head_dim/feature_dim", (self.head_dim, self.feature_dim), "positive integers")
        return self


class DiscumsumFamily(KernelFamily[DiscumsumKey, DiscumsumConfig]):
    name = "discumsum"
    template = "discumsum.cu.j2"
    Config = DiscumsumConfig
    Key = DiscumsumKey
    signature = ("ptr",) * 9 + ("i32", "i32", "i32")

    def default_config(self, key: DiscumsumKey) -> DiscumsumConfig:
        vec = 4 if (key.head_dim * key.feature_dim) % 4 == 0 else 1
        return DiscumsumConfig(threads=256, vec=vec, vecs=4)

    def render_context(self, key: DiscumsumKey, config: DiscumsumConfig) -> dict[str, Any]:
        return dict(threads=config.threads, vec=config.vec, vecs=config.vecs, D=key.feature_dim, d=key.head_dim,
                    key_label=key.label(), config_label=config.label())

    def threads_per_block(self, config: DiscumsumConfig) -> int:
        return config.threads

    def dynamic_smem_bytes(self, key: DiscumsumKey, config: DiscumsumConfig) -> int:
        return 0

    def check(self, key: DiscumsumKey, config: DiscumsumConfig, arch: str) -> None:
        super().check(key, config, arch)
        if (key.head_dim * key.feature_dim) % config.vec:
            raise ConfigError("vec", config.vec, f"must divide D*d = {key.feature_dim * key.head_dim}")
        # accumulators + current + next chunk in registers, under the per-thread register cap
        cap = min(255, 65536 // config.threads)
        if 3 * config.elements_per_thread + 24 > cap:
            raise ConfigError("vecs", config.vecs,
                              f"{config.threads} threads allow {cap} registers per thread; vec*vecs="
                              f"{config.elements_per_thread} needs ~{3 * config.elements_per_thread + 24}")

    def shape_keys(self) -> list[DiscumsumKey]:
        from vidrial.kernels.power_retention.standard_shapes import meta, training_problems, unique

        return unique(self.problem_key(dict(S=meta(p.b, p.chunks, p.h, p.feature_dim, p.d, dtype="float32")))
                      for p in training_problems())

    def corner_configs(self, key: DiscumsumKey) -> list[DiscumsumConfig]:
        return [self.default_config(key), DiscumsumConfig(threads=32, vec=1, vecs=1),
                DiscumsumConfig(threads=1024, vec=4, vecs=2),
                DiscumsumConfig(threads=128, vec=4, vecs=16)]

    # ---- launch path ---------------------------------------------------------------------
    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        """S [b,n,h,D,d], s [b,n,h,D], chunk_gates [b,n,h] (or None), initial_state [b,h,D,d] and
        sum_of_keys [b,h,D] (both or neither), all fp32; the output options fp32_states, bf16_copy,
        final_state."""
        S, s, L, S0, s0 = (x.get(k) for k in ("S", "s", "chunk_gates", "initial_state", "sum_of_keys"))
        check_tensor("S", S, dtypes=("float32",), ndim=5, what="[batch, chunks, heads, D, d]")
        b, n, h, D, d = S.shape
        dev = S.device
        check_tensor("s", s, dtypes=("float32",), shape=(b, n, h, D), device=dev, what="[batch, chunks, heads, D]")
        if L is not None:
            check_tensor("chunk_gates", L, dtypes=("float32",), shape=(b, n, h), device=dev,
                         what="[batch, chunks, heads] (sum of log_G per chunk)")
        if (S0 is None) != (s0 is None):
            raise InputError("sum_of_keys", None if s0 is None else tuple(s0.shape),
                             "given together with initial_state (both or neither)")
        if S0 is not None:
            check_tensor("initial_state", S0, dtypes=("float32",), shape=(b, h, D, d), device=dev,
                         what="[batch, heads, D, d]")
            check_tensor("sum_of_keys", s0, dtypes=("float32",), shape=(b, h, D), device=dev, what="[batch, heads, D]")
        if b * h > 65535:
            raise InputError("S", f"batch*heads={b * h}", "batch * heads <= 65535")
        contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
        return dict(S=S.contiguous(), s=s.contiguous(), chunk_gates=contiguous(L), initial_state=contiguous(S0),
                    sum_of_keys=contiguous(s0), fp32_states=x.get("fp32_states", True),
                    bf16_copy=x.get("bf16_copy", False), final_state=x.get("final_state", False))

    def problem_key(self, x: dict[str, Any]) -> DiscumsumKey:
        b, n, h, D, d = x["S"].shape
        return DiscumsumKey(head_dim=d, feature_dim=D, batch_heads=pow2_bucket(b * h), chunks=pow2_bucket(n))

    def outputs(self, key: DiscumsumKey, config: DiscumsumConfig, x: dict[str, Any]) -> dict[str, Any]:
        """'Sbar' [b,n+1,h,D,d] fp32 (if fp32_states), 'sbar' [b,n+1,h,D] fp32 (always), 'Sbar16'
        [b,n,h,D,d] bf16 = Sbar_0..Sbar_{n-1} (if bf16_copy), 'S_final' [b,h,D,d] fp32 (if final_state)."""
        import torch

        b, n, h, D, d = x["S"].shape
        new = lambda *shape, dtype=torch.float32: torch.empty(shape, device=x["S"].device, dtype=dtype)  # noqa: E731
        out = {"sbar": new(b, n + 1, h, D)}
        if x["fp32_states"]:
            out["Sbar"] = new(b, n + 1, h, D, d)
        if x["bf16_copy"]:
            out["Sbar16"] = new(b, n, h, D, d, dtype=torch.bfloat16)
        if x["final_state"]:
            out["S_final"] = new(b, h, D, d)
        return out

    def launches(self, key: DiscumsumKey, config: DiscumsumConfig, x: dict[str, Any], out: dict[str, Any]):
        b, n, h, D, d = x["S"].shape
        if b * h == 0:
            return
        # the S tiles first, then the CTAs of the sum of keys s (scalar accesses)
        blocks_S = -(-(D * d) // (config.threads * config.vec * config.vecs))
        blocks_s = -(-D // (config.threads * config.vecs))
        yield Launch((blocks_S + blocks_s, b * h, 1),
                     (x["S"].data_ptr(), x["s"].data_ptr(), ptr(x["chunk_gates"]), ptr(x["initial_state"]),
                      ptr(x["sum_of_keys"]), ptr(out.get("Sbar")), out["sbar"].data_ptr(), ptr(out.get("Sbar16")),
                      ptr(out.get("S_final")), n, h, blocks_S))

    # ---- tuner protocol ------------------------------------------------------------------
    def make_inputs(self, key: DiscumsumKey, device: Any, seed: int) -> dict[str, Any]:
        """One problem of the key's own buckets: b = 1, batch_heads heads, `chunks` chunks (fewer, but
        more than chunks/2, where the fp32 states would pass the tuner's input cap: d=32, p=4 keeps
        48 of 64), drawn on `device`."""
        import torch

        from vidrial.core.protocol import generator, size_in_bucket

        bh, D, d = key.batch_heads, key.feature_dim, key.head_dim
        n = size_in_bucket(key.chunks, bh * (D * d + D + 1) * 4, field="chunks")
        gen = generator(device, seed)
        S = torch.randn(1, n, bh, D, d, generator=gen, device=device)
        s = torch.randn(1, n, bh, D, generator=gen, device=device)
        L = -torch.rand(1, n, bh, generator=gen, device=device)
        return dict(S=S, s=s, chunk_gates=L)

    def inputs_key(self, inputs: dict[str, Any], key: DiscumsumKey) -> DiscumsumKey:
        """The key the public op computes for `inputs`."""
        return self.problem_key(inputs)

    def run(self, key: DiscumsumKey, config: DiscumsumConfig, inputs: dict[str, Any]) -> Any:
        """The call the chunked forward makes (ops._chunked_states): the bf16 copy of Sbar_0..n-1 and
        sbar, no fp32 states (twice the bytes written: another problem for a memory-bound kernel)."""
        out = discumsum_forward(inputs["S"], inputs["s"], inputs["chunk_gates"], config=config, fp32_states=False,
                                bf16_copy=True)
        return out["Sbar16"], out["sbar"]

    def reference(self, key: DiscumsumKey, inputs: dict[str, Any]) -> Any:
        """float64 on head 0, all chunks (heads never mix, and the scan needs every chunk): a leading
        slice of run()'s (Sbar16, sbar), which check_outputs compares."""
        from vidrial.reference.forward import discumsum_reference

        Sbar, sbar = discumsum_reference(inputs["S"][:, :, :1], inputs["s"][:, :, :1], inputs["chunk_gates"][:, :, :1])
        return Sbar[:, :-1], sbar


FAMILY = register(DiscumsumFamily())


def discumsum_forward(S, s, chunk_gates=None, initial_state=None, sum_of_keys=None, config=None, *,
                      fp32_states: bool = True, bf16_copy: bool = False, final_state: bool = False) -> dict[str, Any]:
    """The launcher with every output option: a dict of the outputs DiscumsumFamily.outputs names."""
    return FAMILY(config, S=S, s=s, chunk_gates=chunk_gates, initial_state=initial_state, sum_of_keys=sum_of_keys,
                  fp32_states=fp32_states, bf16_copy=bf16_copy, final_state=final_state)


def discumsum(S, s, chunk_gates=None, initial_state=None, sum_of_keys=None, config=None, *, bf16_copy: bool = False):
    """Sbar [b,n+1,h,D,d], sbar [b,n+1,h,D] (fp32) from chunk states S [b,n,h,D,d], s [b,n,h,D].

    chunk_gates [b,n,h] fp32 (L_nu, None: no decay); initial_state [b,h,D,d] and sum_of_keys [b,h,D]
    (both or neither) give Sbar_0. With bf16_copy=True also returns Sbar16 [b,n,h,D,d] bf16, the
    states at the start of chunks 0..n-1 (query_state's MMA operand)."""
    out = discumsum_forward(S, s, chunk_gates, initial_state, sum_of_keys, config, bf16_copy=bf16_copy)
    return (out["Sbar"], out["sbar"], out["Sbar16"]) if bf16_copy else (out["Sbar"], out["sbar"])
