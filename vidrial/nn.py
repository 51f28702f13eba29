"""vidrial.nn: power retention as a torch.nn.Module (issue 20, the layer).

    layer = vidrial.nn.PowerRetention(d_model=512, num_heads=8, num_kv_heads=4, head_dim=64, device="cuda")
    y = layer(x)                           # x [b, t, d_model] -> y [b, t, d_model]  (training / prefill)
    cache = layer.new_cache(batch=b)       # decoding: prompt, then one token at a time
    y, cache = layer.step(prompt, cache)
    y, cache = layer.step(x_next, cache)   # (layer(x, cache=cache) is the same call)

The layer: one fused projection x -> [q | k | v] (num_heads query heads, num_kv_heads key/value heads,
GQA as in vidrial.power_retention: query head i reads KV head i // (num_heads / num_kv_heads)), a gate
projection x -> one log gate per KV head and step, log_G = logsigmoid(x W_g + b_g) (<= 0, docs/MATH.md section
1.2: G_i - G_j decays old tokens), the op, and an output projection [b, t, num_heads * head_dim] -> d_model.
Parameters are bf16 or fp16 (the kernels' dtypes); the gate is computed in float32 (the op's log_G dtype).

forward(x) calls vidrial.power_retention (custom ops: differentiable, torch.compile(fullgraph=True)
traces it). The cache (PowerRetentionCache) holds the keys, values and log gates of the tokens since the
last compression, in a buffer of switch_over_seq_len tokens, and the state + sum of keys of everything
before; every step calls vidrial.power_retention_inference, which compresses the cache into the state once
it holds switch_over_seq_len tokens (then the buffer starts again empty). The caller never touches a
state tensor. Prefill + steps compute the same function as forward over the concatenated sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from vidrial.core.errors import InputError

__all__ = ["PowerRetention", "PowerRetentionCache"]

Tensor = torch.Tensor
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16)
DEFAULT_SWITCH_OVER = 512  # vidrial.power_retention_inference's (and retention's) default


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(name: str, x: Any) -> None:
    if not _is_int(x) or x < 1:
        raise InputError(name, repr(x), "a positive integer")


@dataclass
class PowerRetentionCache:
    """The decoding cache of one PowerRetention layer (PowerRetention.new_cache makes one).

    K, V [batch, capacity, num_kv_heads, head_dim] and log_G [batch, capacity, num_kv_heads] float32 (None
    without gating) are buffers; their first `length` tokens are the cache. state [batch, num_kv_heads, D,
    head_dim] + sum_of_keys [batch, num_kv_heads, D] summarise every earlier token (None before the first
    compression). `seen` counts all the tokens the layer has been stepped through; state_dtype is the dtype
    of a new state (None: float32)."""
    K: Tensor
    V: Tensor
    log_G: Optional[Tensor]
    length: int = 0
    state: Optional[Tensor] = None
    sum_of_keys: Optional[Tensor] = None
    seen: int = 0
    state_dtype: Optional[torch.dtype] = None

    @property
    def batch(self) -> int:
        return self.K.shape[0]

    def _reserve(self, n: int) -> None:
        """Room for n more tokens (a step longer than the buffer grows it; the usual step never does)."""
        need = self.length + n
        cap = self.K.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        grow = new - cap
        self.K = torch.cat([self.K, self.K.new_zeros(self.K.shape[0], grow, *self.K.shape[2:])], 1)
        self.V = torch.cat([self.V, self.V.new_zeros(self.V.shape[0], grow, *self.V.shape[2:])], 1)
        if self.log_G is not None:
            self.log_G = torch.cat([self.log_G, self.log_G.new_zeros(self.log_G.shape[0], grow,
                                                                     self.log_G.shape[2])], 1)


class PowerRetention(nn.Module):
    """Power retention attention layer: fused qkv projection, learned per-KV-head gates, GQA, output projection.

    d_model: model width; num_heads: query heads; num_kv_heads: key/value heads (None = num_heads; must
    divide num_heads); head_dim 32, 64 or 128; deg 2 or 4; chunk_size: the training op's chunk (None or a
    positive multiple of 16; sequences up to chunk_size run the quadratic form); gating: learned gates
    (False: no decay); switch_over_seq_len: decoding keeps a KV cache of up to this many tokens, then
    compresses it into the state (None: never, a plain KV cache); bias: biases on the qkv and output
    projections (the gate projection always has one); scale None = 1/sqrt(head_dim); d_tile: the state
    layout (None = the op's default); device, dtype (torch.bfloat16 default, or torch.float16)."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: Optional[int] = None, head_dim: int = 64,
                 deg: int = 2, chunk_size: Optional[int] = 1024, gating: bool = True,
                 switch_over_seq_len: Optional[int] = DEFAULT_SWITCH_OVER, bias: bool = False,
                 device: Any = None, dtype: Optional[torch.dtype] = None, scale: Optional[float] = None,
                 d_tile: Optional[int] = None):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("num_heads", num_heads)
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if not _is_int(num_kv_heads) or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise InputError("num_kv_heads", repr(num_kv_heads),
                             f"None or a positive divisor of num_heads={num_heads} (GQA)")
        if head_dim not in HEAD_DIMS or not _is_int(head_dim):
            raise InputError("head_dim", repr(head_dim), f"one of {HEAD_DIMS}")
        if deg not in (2, 4) or not _is_int(deg):
            raise InputError("deg", repr(deg), "2 or 4")
        if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 16 or chunk_size % 16):
            raise InputError("chunk_size", repr(chunk_size), "None (quadratic) or a positive multiple of 16")
        if switch_over_seq_len is not None and (not _is_int(switch_over_seq_len) or switch_over_seq_len < 1):
            raise InputError("switch_over_seq_len", repr(switch_over_seq_len), "None (never compress) or a "
                             "positive integer")
        for name, flag in (("gating", gating), ("bias", bias)):
            if not isinstance(flag, bool):
                raise InputError(name, repr(flag), "True or False")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale < 0):
            raise InputError("scale", repr(scale), "None (1/sqrt(head_dim)) or a positive finite number")
        if d_tile is not None and (not _is_int(d_tile) or d_tile < 1 or head_dim % d_tile):
            raise InputError("d_tile", repr(d_tile), f"None or a divisor of head_dim={head_dim}")
        if dtype is None:
            dtype = torch.bfloat16
        if dtype not in DTYPES:
            raise InputError("dtype", dtype, "torch.bfloat16 or torch.float16 (the kernels' dtypes)")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.deg, self.chunk_size, self.gating, self.switch_over_seq_len = deg, chunk_size, gating, switch_over_seq_len
        self.scale, self.d_tile = scale, d_tile
        kw = dict(device=device, dtype=dtype)
        hq, h, d = num_heads, num_kv_heads, head_dim
        self.qkv = nn.Linear(d_model, (hq + 2 * h) * d, bias=bias, **kw)
        self.gate = nn.Linear(d_model, h, bias=True, **kw) if gating else None
        self.out = nn.Linear(hq * d, d_model, bias=bias, **kw)
        self.reset_gate_parameters()

    def reset_gate_parameters(self) -> None:
        """Gate bias: per KV head, sigmoid(bias) from 0.9 to 0.999 (time scales of ~10 to ~1000 tokens); small
        weights, so that training starts from slowly decaying, mostly input-independent gates."""
        if self.gate is None:
            return
        with torch.no_grad():
            h = self.num_kv_heads
            if self.gate.weight.device.type == "meta":
                return
            p = torch.linspace(0.9, 0.999, h, dtype=torch.float64) if h > 1 else torch.tensor([0.99], dtype=torch.float64)
            self.gate.bias.copy_(torch.log(p / (1 - p)).to(self.gate.bias.dtype))
            self.gate.weight.mul_(0.1)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, deg={self.deg}, chunk_size={self.chunk_size}, gating={self.gating}, "
                f"switch_over_seq_len={self.switch_over_seq_len}")

    # ---- pieces ---------------------------------------------------------------------------------------
    def _check_x(self, x: Any, argument: str = "x") -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise InputError(argument, type(x).__name__, f"a torch.Tensor [batch, time, d_model={self.d_model}]")
        if x.dim() != 3 or x.shape[2] != self.d_model:
            raise InputError(argument, f"shape {tuple(x.shape)}", f"[batch, time, d_model={self.d_model}]")
        w = self.qkv.weight
        if x.dtype != w.dtype:
            raise InputError(argument, f"dtype {x.dtype}", f"the layer's dtype {w.dtype}")
        if x.device != w.device:
            raise InputError(argument, f"device {x.device}", f"the layer's device {w.device}")
        return x.shape[0], x.shape[1]

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """x [b, t, d_model] -> Q [b, t, hq, d], K, V [b, t, h, d] (views of one projection), log_G [b, t, h]
        float32 (<= 0) or None."""
        b, t, _ = x.shape
        hq, h, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        q, k, v = qkv.split([hq * d, h * d, h * d], dim=-1)
        log_G = None
        if self.gate is not None:
            log_G = nn.functional.logsigmoid(self.gate(x).float())
        return q.unflatten(-1, (hq, d)), k.unflatten(-1, (h, d)), v.unflatten(-1, (h, d)), log_G

    # ---- training / prefill ---------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: Optional[PowerRetentionCache] = None, cu_seqlens: Optional[Tensor] = None):
        """x [b, t, d_model] -> y [b, t, d_model] (vidrial.power_retention over the whole sequence). With a
        cache: the decoding step (see step), returns (y, cache). cu_seqlens: sequences packed along t of a
        batch of one (see vidrial.power_retention)."""
        if cache is not None:
            if cu_seqlens is not None:
                raise InputError("cu_seqlens", "given with a cache", "None when decoding (one cache per sequence)")
            return self.step(x, cache)
        from vidrial import ops

        b, t = self._check_x(x)
        Q, K, V, log_G = self.project(x)
        Y = ops.power_retention(Q, K, V, log_G, deg=self.deg, scale=self.scale, chunk_size=self.chunk_size,
                                d_tile=self.d_tile, cu_seqlens=cu_seqlens)
        return self.out(Y.reshape(b, t, self.num_heads * self.head_dim))

    # ---- decoding -------------------------------------------------------------------------------------
    def new_cache(self, batch: int, state_dtype: Optional[torch.dtype] = None) -> PowerRetentionCache:
        """An empty cache for `batch` sequences on the layer's device (state_dtype: float32 default, or
        bfloat16; the state is created at the first compression)."""
        _positive_int("batch", batch)
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise InputError("state_dtype", state_dtype, "None (float32), torch.float32 or torch.bfloat16")
        w = self.qkv.weight
        cap = self.switch_over_seq_len if self.switch_over_seq_len is not None else 256
        h, d = self.num_kv_heads, self.head_dim
        K = torch.zeros(batch, cap, h, d, device=w.device, dtype=w.dtype)
        V = torch.zeros_like(K)
        log_G = torch.zeros(batch, cap, h, device=w.device, dtype=torch.float32) if self.gating else None
        return PowerRetentionCache(K, V, log_G, state_dtype=state_dtype)

    def step(self, x: Tensor, cache: PowerRetentionCache) -> tuple[Tensor, PowerRetentionCache]:
        """x [b, tq, d_model]: the next tq tokens (a prompt, or one token) -> (y [b, tq, d_model], cache).
        The cache is updated in place and returned."""
        from vidrial.inference import power_retention_inference

        b, tq = self._check_x(x)
        if not isinstance(cache, PowerRetentionCache):
            raise InputError("cache", type(cache).__name__, "a PowerRetentionCache from layer.new_cache(batch)")
        if cache.batch != b:
            raise InputError("x", f"batch {b}", f"the cache's batch {cache.batch}")
        exp = (self.num_kv_heads, self.head_dim)
        if tuple(cache.K.shape[2:]) != exp or cache.K.dtype != self.qkv.weight.dtype or \
                cache.K.device != self.qkv.weight.device or (cache.log_G is None) == self.gating:
            raise InputError("cache", f"K {tuple(cache.K.shape)} {cache.K.dtype} {cache.K.device}",
                             "a cache made by this layer's new_cache (heads, head_dim, dtype, device, gating)")
        if tq == 0:
            return x.new_empty(x.shape), cache
        Q, K, V, log_G = self.project(x)
        cache._reserve(tq)
        L0, L = cache.length, cache.length + tq
        cache.K[:, L0:L] = K
        cache.V[:, L0:L] = V
        if log_G is not None:
            cache.log_G[:, L0:L] = log_G
        Y, S, z = power_retention_inference(
            Q.contiguous(), cache.K[:, :L], cache.V[:, :L], cache.log_G[:, :L] if log_G is not None else None,
            cache.state, cache.sum_of_keys, deg=self.deg, scale=self.scale,
            switch_over_seq_len=self.switch_over_seq_len, d_tile=self.d_tile,
            state_dtype=cache.state_dtype)
        cache.seen += tq
        if self.switch_over_seq_len is not None and L >= self.switch_over_seq_len:
            cache.state, cache.sum_of_keys, cache.length = S, z, 0  # compressed: the buffer starts again empty
        else:
            cache.length = L
        y = self.out(Y.reshape(b, tq, self.num_heads * self.head_dim))
        return y, cache
