"""Tuner protocol pieces shared by the backward families (update_state_bwd, query_state_bwd,
discumsum_bwd, intra_chunk_attention_bwd; docs/HELPERS.md "Tuner protocol").

Problems: each family's make_inputs builds one problem at its key's runtime sizes (a key bucket of
tokens = batch * time * heads becomes b = 1, up to TUNE_HEADS heads, chunks of TUNE_CHUNK[deg]), from
random inputs with the properties of a training step: logsigmoid(randn + 4) gates (the benchmarks'),
states that are sums of phi(k) v^T, the true intra-chunk (O, l, m) and a merged Y (query_state_problem).
Upstream gradients (dY, dS, dSbar, dO, dl, ...) are Gaussian: the kernels are linear in them.

Check: reference() runs the float64 emulation (bwd_emulation.py) on a bounded slice, the first batch
entry, KV head 0 with its r query heads and the first CHECK_CHUNKS chunks. That is exact because
these kernels never mix chunks or KV heads (discumsum_bwd scans over chunks: it checks head 0, all
chunks). The slice is a leading block of every dimension, so slice_error compares out[:ref.shape]
with ref, and check_outputs(reference, reference) is 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from vidrial.reference.forward import intra_chunk_attention_reference, phi
from vidrial.kernels.power_retention.sympow import feature_dim

TUNE_CHUNK = {2: 1024, 4: 256}  # the keys carry no chunk size: shape A's for p=2, the forward's p=4 key's
TUNE_HEADS = 8
CHECK_CHUNKS = 2
STATE_KEYS = 32  # keys summed into each surrogate state (gates near 1 keep ~50 recent keys alive)
GATE_SHIFT = 4.0
# Relative error (2-norm over the checked slice) a correct config stays below: the tf32 tensor-core
# GEMMs (mma=True) give ~1e-3 on the H200 (tests/gpu/test_backward_gpu.py), fp32 ~1e-5; a wrong
# index or a missing tile gives O(1).
TOLERANCE = 1e-2
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def split_tokens(tokens: int, chunk: int, heads: int = TUNE_HEADS) -> tuple[int, int, int]:
    """(t, heads, chunk) for b = 1 with t * heads == tokens (powers of two): up to `heads` heads of
    CHECK_CHUNKS chunks or more where the tokens allow (the checked slice then spans a chunk with
    Sbar_0 = 0 and one with a state), chunk <= t, t a multiple of chunk."""
    c = min(chunk, tokens)
    h = max(1, min(heads, tokens // (c * CHECK_CHUNKS)))
    return tokens // h, h, c


def generator(device: Any, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: tuple[int, ...], gen: torch.Generator, device: Any, dtype: torch.dtype = torch.float32,
          scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, device=device)
    return (x * scale if scale != 1.0 else x).to(dtype)


def rand(shape: tuple[int, ...], gen: torch.Generator, device: Any) -> torch.Tensor:
    """Uniform in [0, 1), float32."""
    return torch.rand(shape, generator=gen, device=device)


def chunk_gates(b: int, t: int, h: int, c: int, gen: torch.Generator, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_G [b,t,h] per-step log gates, g [b,t,h] their chunk-local cumulative sums), float32."""
    log_G = torch.nn.functional.logsigmoid(randn((b, t, h), gen, device) + GATE_SHIFT)
    return log_G, log_G.view(b, t // c, c, h).cumsum(2).view(b, t, h)


def intra_forward(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: torch.Tensor, deg: int, scale: float,
                  c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, l, m) of the intra-chunk forward (float64 reference), one KV head at a time: its [chunks, c, c]
    float64 temporaries stay at 1/h of the whole (~3 GB per head at shape A, t = 65536, c = 1024)."""
    h, r = K.shape[2], Q.shape[2] // K.shape[2]
    parts = [intra_chunk_attention_reference(Q[:, :, i * r:(i + 1) * r], K[:, :, i:i + 1], V[:, :, i:i + 1],
                                             log_G[:, :, i:i + 1], deg, scale, c) for i in range(h)]
    return tuple(torch.cat([p[j] for p in parts], 2) for j in range(3))  # type: ignore[return-value]


def query_state_problem(*, t: int, hq: int, h: int, d: int, deg: int, d_tile: int, c: int, dtype: torch.dtype,
                        device: Any, seed: int) -> dict[str, Any]:
    """What query_state_bwd receives (vidrial/autograd.py), b = 1: Q, K, V, per-step log_G and the
    chunk-local g; O, l, m of the intra-chunk forward (exact, float64 -> float32); states Sbar16
    [1,n,h,D,d] bf16 and sbar [1,n+1,h,D] fp32 that are sums of phi(k) v^T over STATE_KEYS keys per
    chunk (Sbar_0 = 0: no initial state); Y = (O e^m + A) / (l e^m + B) with A, B from those states;
    dY Gaussian."""
    gen = generator(device, seed)
    n, r = t // c, hq // h
    scale = 1.0 / math.sqrt(d)
    Q = randn((1, t, hq, d), gen, device, dtype)
    K = randn((1, t, h, d), gen, device, dtype)
    V = randn((1, t, h, d), gen, device, dtype)
    log_G, g = chunk_gates(1, t, h, c, gen, device)
    O, l, m = intra_forward(Q, K, V, log_G, deg, scale, c)
    Ks = randn((1, n + 1, STATE_KEYS, h, d), gen, device, torch.float64)
    Vs = randn((1, n + 1, STATE_KEYS, h, d), gen, device, torch.float64)
    Ks[:, 0] = 0.0  # phi(0) = 0: Sbar_0 = sbar_0 = 0
    D = feature_dim(d, deg, d_tile)
    Sbar16 = torch.empty(1, n, h, D, d, device=device, dtype=torch.bfloat16)
    sbar = torch.empty(1, n + 1, h, D, device=device, dtype=torch.float32)
    for nu in range(n + 1):  # one chunk at a time: phi of the state keys is [1, STATE_KEYS, h, D]
        pk = phi(Ks[:, nu], deg, d_tile)
        sbar[:, nu] = pk.sum(1).float()
        if nu < n:
            Sbar16[:, nu] = torch.einsum("bjhD,bjhe->bhDe", pk, Vs[:, nu]).bfloat16()
    # A = s^p phi(q~).Sbar = sum_j (s q~.k_j)^p v_j since phi(x).phi(y) = (x.y)^p: no phi of the queries
    qg = (Q.double() * torch.exp(g.double() / deg).repeat_interleave(r, 2).unsqueeze(-1)).view(1, n, c, hq, d)
    Kr, Vr = Ks[:, :n].repeat_interleave(r, 3), Vs[:, :n].repeat_interleave(r, 3)
    w = (scale * torch.einsum("bnchd,bnjhd->bnchj", qg, Kr)) ** deg
    A = torch.einsum("bnchj,bnjhd->bnchd", w, Vr).reshape(1, t, hq, d)
    B = w.sum(-1).reshape(1, t, hq)
    em = torch.exp(m)
    Y = (O * em.unsqueeze(-1) + A) / (l * em + B).unsqueeze(-1)
    return dict(Q=Q, K=K, V=V, log_G=log_G, G=g, O=O.float(), l=l.float(), m=m.float(), Sbar16=Sbar16, sbar=sbar,
                Y=Y.to(dtype), dY=randn((1, t, hq, d), gen, device, dtype), scale=scale, chunk_size=c, kv_heads=h)


def leading(x: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """The leading block x[:s0, :s1, ...] of `shape` (the checked slice of a full output)."""
    return x[tuple(slice(0, s) for s in shape)]


def rel_err(out: torch.Tensor, ref: torch.Tensor, norm: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||norm or ref|| on the leading block of ref's shape; inf if out is not finite."""
    out = leading(out, ref.shape)
    if not torch.isfinite(out).all():
        return math.inf
    ref = ref.to(out.device, torch.float64)
    scale = (ref if norm is None else norm).double().norm().clamp_min(1e-30)
    return ((out.double() - ref).norm() / scale).item()


def slice_error(outputs: Iterable[torch.Tensor | None], expected: Iterable[torch.Tensor | None]) -> float:
    """Largest rel_err over paired tensors (pairs of None are skipped)."""
    err = 0.0
    for out, ref in zip(outputs, expected, strict=True):
        if out is None and ref is None:
            continue
        if out is None or ref is None:
            return math.inf
        err = max(err, rel_err(out, ref))
    return err


def check_slice(n_chunks: int) -> int:
    """Chunks of the checked slice."""
    return min(CHECK_CHUNKS, n_chunks)


__all__ = ["TUNE_CHUNK", "TUNE_HEADS", "CHECK_CHUNKS", "TOLERANCE", "split_tokens", "generator", "randn", "rand",
           "chunk_gates", "intra_forward", "query_state_problem", "leading", "rel_err", "slice_error", "check_slice"]


class SliceCheck:
    """check_outputs and tolerance of the backward families' tuner protocol: the outputs' leading block
    (the slice reference() computes) against reference(), 2-norm relative error."""

    def check_outputs(self, key: Any, inputs: dict[str, Any], outputs: Any, expected: Any) -> float:
        return slice_error(outputs, expected)

    def tolerance(self, key: Any) -> float:
        return TOLERANCE
