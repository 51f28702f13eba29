"""Inference (decoding) for power retention (MATH.md section 5), with the `retention` package's
semantics (1.0.7, `retention.power_retention_inference`, non-fused normaliser):

    Y, state, sum_of_keys = power_retention_inference(Q, K, V, log_G, initial_state, sum_of_keys,
                                                      deg=2, scale=None, switch_over_seq_len=512)

* K, V [b, L, h, d] is the KV cache *including* the new token(s) (or None: no cache); the state
  [b, h, D, d] + sum_of_keys [b, h, D] summarise everything before the cache's first token.
  Query i of Q [b, tq, hq, d] sits at cache position L - tq + i; it attends the cache causally
  (gated: w = (s q.k)^p exp(G_pos - G_j), G = cumsum(log_G) over the cache) and the state, decayed
  to its position (exp(G_pos)).
* When the cache reaches `switch_over_seq_len` (L >= switch_over_seq_len) it is compressed into the
  state, S' = exp(G_last) S + sum_j phi(k~_j) v_j^T, k~_j = k_j exp((G_last - G_j)/p) (same for the
  sum of keys), and the new state is returned: the caller drops the cache. Otherwise the given
  state comes back unchanged (None when there is none).

The state's layout travels with it: (d_tile, D = feature_dim(d, deg, d_tile), dtype). d_tile is
passed as `d_tile=` (default: sympow.default_d_tile, the same default as vidrial.power_retention,
whose return_final_state=True states continue here unchanged); a state whose D does not match is
an InputError that names the d_tile that would match, never silent garbage. The state dtype is
float32 (default for new states; what power_retention returns) or bfloat16 (half the bytes of the
memory-bound decode read); sum_of_keys is always float32. A new state gets `state_dtype`.

Execution: up to 16 query rows per KV head (GQA group x new tokens) go through ONE fused kernel
launch (vidrial/kernels/power_retention/decode.py): state query + cache attention + merge, on the
current stream, no host sync but the log_G <= 0 check (one max, skipped while capturing), CUDA-graph
capturable (call once before capturing, so that the kernel, the block table and the workspace
exist; also one absorbing step if the captured region
absorbs, for update_state's kernel and table). The compression step (once per
switch_over_seq_len tokens) adds update_state + a gated sum (a few more launches, still no sync).
More rows run as groups of new tokens (one launch per group, each against the cache prefix that
ends with its last token); prefill (tq == L > 16 rows) runs vidrial.power_retention's forward (its
final state is the compressed state); a GQA group wider than 16 falls back to the float64
reference (slow, correct).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vidrial.core.errors import InputError
from vidrial.ops import _check_log_G_values

__all__ = ["power_retention_inference", "StateLayout"]

HEAD_DIMS = (32, 64, 128)
DEFAULT_SWITCH_OVER = 512  # retention's default


@dataclass(frozen=True)
class StateLayout:
    """The layout of an inference state: it travels with the state (D and dtype are visible in the
    tensor; d_tile is not, so pass it as d_tile= whenever it is not the default)."""

    head_dim: int
    deg: int
    d_tile: int
    dtype: str  # "float32" or "bfloat16"

    @property
    def feature_dim(self) -> int:
        from vidrial.kernels.power_retention.sympow import feature_dim

        return feature_dim(self.head_dim, self.deg, self.d_tile)

    @staticmethod
    def d_tiles_for(head_dim: int, deg: int, D: int) -> list[int]:
        """The d_tile values whose layout has D features."""
        from vidrial.kernels.power_retention.sympow import feature_dim

        return [t for t in range(1, head_dim + 1) if head_dim % t == 0 and feature_dim(head_dim, deg, t) == D]

    @classmethod
    def of(cls, state, head_dim: int, deg: int, d_tile: int | None = None) -> "StateLayout":
        """The layout of `state` [b, h, D, d]: checks D against d_tile (or infers d_tile from D when
        None and exactly one d_tile matches); raises InputError otherwise."""
        D = int(state.shape[-2])
        dtype = str(state.dtype).removeprefix("torch.")
        if d_tile is None:
            found = cls.d_tiles_for(head_dim, deg, D)
            if len(found) != 1:
                raise InputError("initial_state", f"D={D}",
                                 f"a feature dim of some d_tile for head_dim={head_dim}, deg={deg}"
                                 + (f" (ambiguous: d_tile in {found}; pass d_tile=)" if found else ""))
            d_tile = found[0]
        out = cls(head_dim, deg, d_tile, dtype)
        if out.feature_dim != D:
            raise InputError("initial_state", f"D={D}", _layout_rule(head_dim, deg, d_tile, D))
        return out


def _layout_rule(d: int, deg: int, d_tile: int, D_given: int) -> str:
    from vidrial.kernels.power_retention.sympow import feature_dim

    want = feature_dim(d, deg, d_tile)
    match = StateLayout.d_tiles_for(d, deg, D_given)
    hint = (f"; a state with D={D_given} has the layout d_tile={match[0]}: pass d_tile={match[0]}" if len(match) == 1
            else f"; D={D_given} is no layout of head_dim={d}, deg={deg}" if not match
            else f"; D={D_given} matches d_tile in {match}: pass the one it was made with")
    return (f"D = feature_dim(head_dim={d}, deg={deg}, d_tile={d_tile}) = {want} (the state layout travels with "
            f"the state: d_tile, D, dtype){hint}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile, state_dtype):
    import torch

    if not isinstance(Q, torch.Tensor):
        raise InputError("Q", type(Q).__name__, "a torch.Tensor [batch, time, q_heads, head_dim]")
    if Q.dim() != 4:
        raise InputError("Q", f"shape {tuple(Q.shape)}", "4 dims [batch, time, q_heads, head_dim]")
    if Q.dtype not in (torch.bfloat16, torch.float16):
        raise InputError("Q", f"dtype {Q.dtype}", "torch.bfloat16 or torch.float16")
    b, tq, hq, d = Q.shape
    if d not in HEAD_DIMS:
        raise InputError("Q", f"head_dim {d}", f"one of {HEAD_DIMS}")
    if tq < 1 or b < 1:
        raise InputError("Q", f"shape {tuple(Q.shape)}", "at least one batch entry and one query")
    if (K is None) != (V is None):
        raise InputError("V" if V is None else "K", None, "K and V given together (the KV cache) or both None")
    L = 0
    h = None
    if K is not None:
        for name, x in (("K", K), ("V", V)):
            if not isinstance(x, torch.Tensor):
                raise InputError(name, type(x).__name__, "None or a torch.Tensor [batch, cache_len, kv_heads, head_dim]")
            if x.dim() != 4:
                raise InputError(name, f"shape {tuple(x.shape)}", "4 dims [batch, cache_len, kv_heads, head_dim]")
            if x.dtype != Q.dtype:
                raise InputError(name, f"dtype {x.dtype}", f"the dtype of Q ({Q.dtype})")
        if K.shape != V.shape:
            raise InputError("V", f"shape {tuple(V.shape)}", f"the shape of K {tuple(K.shape)}")
        if K.shape[0] != b or K.shape[3] != d:
            raise InputError("K", f"shape {tuple(K.shape)}", f"[{b}, cache_len, kv_heads, {d}] matching Q {tuple(Q.shape)}")
        L, h = K.shape[1], K.shape[2]
    if not _is_int(deg) or deg not in (2, 4):
        raise InputError("deg", deg, "2 or 4 (an even degree keeps the weights non-negative)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise InputError("scale", scale, "None (or 0: 1/sqrt(head_dim)) or a finite number")
    if switch_over_seq_len is not None and (not _is_int(switch_over_seq_len) or switch_over_seq_len < 1):
        raise InputError("switch_over_seq_len", switch_over_seq_len, "None (never compress) or a positive integer")
    if d_tile is not None and (not _is_int(d_tile) or d_tile < 1 or d % d_tile):
        raise InputError("d_tile", d_tile, f"None or a divisor of head_dim={d}: {[x for x in range(1, d + 1) if d % x == 0]}")
    if state_dtype is not None and state_dtype not in (torch.float32, torch.bfloat16):
        raise InputError("state_dtype", state_dtype, "None (float32), torch.float32 or torch.bfloat16")
    if (initial_state is None) != (sum_of_keys is None):
        raise InputError("sum_of_keys" if sum_of_keys is None else "initial_state", None,
                         "initial_state and sum_of_keys given together (both or neither)")
    if initial_state is None and L == 0:
        raise InputError("initial_state", None, "a state when the KV cache is empty (K/V None or cache_len 0)")
    if initial_state is not None:
        for name, x, nd in (("initial_state", initial_state, 4), ("sum_of_keys", sum_of_keys, 3)):
            if not isinstance(x, torch.Tensor):
                raise InputError(name, type(x).__name__, "a torch.Tensor")
            if x.dim() != nd:
                raise InputError(name, f"shape {tuple(x.shape)}",
                                 "4 dims [batch, kv_heads, D, head_dim]" if nd == 4 else "3 dims [batch, kv_heads, D]")
        hs = initial_state.shape[1]
        if h is None:
            h = hs
    if h is None or h < 1 or hq % h:
        raise InputError("Q", f"{hq} query heads", f"a multiple of the {h} KV heads (GQA)")
    if L > 0 and tq > L:
        raise InputError("Q", f"{tq} queries", f"at most the cache length {L} (the cache includes the new tokens)")
    if log_G is not None:
        if L == 0:
            raise InputError("log_G", f"shape {tuple(log_G.shape)}", "None when there is no KV cache")
        if not isinstance(log_G, torch.Tensor):
            raise InputError("log_G", type(log_G).__name__, "None or a float32 torch.Tensor [batch, cache_len, kv_heads]")
        if log_G.dtype != torch.float32:
            raise InputError("log_G", f"dtype {log_G.dtype}", "torch.float32")
        if tuple(log_G.shape) != (b, L, h):
            raise InputError("log_G", f"shape {tuple(log_G.shape)}", f"shape {(b, L, h)} = [batch, cache_len, kv_heads]")
        _check_log_G_values(log_G)
    from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim

    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    D = feature_dim(d, deg, d_tile)
    if initial_state is not None:
        if tuple(initial_state.shape[:2]) != (b, h) or initial_state.shape[3] != d:
            raise InputError("initial_state", f"shape {tuple(initial_state.shape)}",
                             f"[{b}, {h}, D, {d}] = [batch, kv_heads, D, head_dim]")
        if initial_state.shape[2] != D:
            raise InputError("initial_state", f"shape {tuple(initial_state.shape)} (D={initial_state.shape[2]})",
                             _layout_rule(d, deg, d_tile, initial_state.shape[2]))
        if initial_state.dtype not in (torch.float32, torch.bfloat16):
            raise InputError("initial_state", f"dtype {initial_state.dtype}",
                             "torch.float32 or torch.bfloat16 (the state dtype is part of its layout)")
        if tuple(sum_of_keys.shape) != (b, h, D):
            raise InputError("sum_of_keys", f"shape {tuple(sum_of_keys.shape)}", f"shape {(b, h, D)} = [batch, kv_heads, D]")
        if sum_of_keys.dtype != torch.float32:
            raise InputError("sum_of_keys", f"dtype {sum_of_keys.dtype}", "torch.float32")
        es = initial_state.element_size()
        st = initial_state.stride()
        if st[3] != 1 or st[2] != d or (st[0] * es) % 16 or (st[1] * es) % 16:
            raise InputError("initial_state", f"strides {tuple(st)}",
                             "contiguous [D, head_dim] rows and 16-byte batch/head strides; call .contiguous()")
        if sum_of_keys.stride(2) != 1:
            raise InputError("sum_of_keys", f"strides {tuple(sum_of_keys.stride())}", "a contiguous last dim")
    if L > 0:
        for name, x in (("K", K), ("V", V)):
            if x.stride(3) != 1 or any(s % 8 for s in x.stride()[:3]):
                raise InputError(name, f"strides {tuple(x.stride())}",
                                 "a contiguous last dim and batch/time/head strides that are multiples of 8 "
                                 "elements (16-byte loads); call .contiguous()")
    # devices last, so that shape/dtype errors read the same on any device
    if Q.device.type != "cuda":
        raise InputError("Q", f"device {Q.device}", "a CUDA tensor")
    for name, x in (("K", K), ("V", V), ("log_G", log_G), ("initial_state", initial_state),
                    ("sum_of_keys", sum_of_keys)):
        if x is not None and x.device != Q.device:
            raise InputError(name, f"device {x.device}", f"the device of Q ({Q.device})")
    if L > 0:
        for name, x in (("K", K), ("V", V)):
            if x.data_ptr() % 16:
                raise InputError(name, f"data_ptr % 16 = {x.data_ptr() % 16}", "a 16-byte aligned start")
    if initial_state is not None and initial_state.data_ptr() % 16:
        raise InputError("initial_state", f"data_ptr % 16 = {initial_state.data_ptr() % 16}", "a 16-byte aligned start")
    return b, tq, hq, h, d, L, d_tile, D


_CHECKED: dict[tuple, tuple] = {}
_ABSORB_CHUNK = 1024


def _checked(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile, state_dtype):
    """_check, memoised on what it looks at (shapes, strides, dtypes, devices, 16-byte alignment,
    the scalar arguments): a decode loop pays the full validation once per shape, then a few us."""
    try:
        sig = (deg, scale, switch_over_seq_len, d_tile, state_dtype) + tuple(
            None if x is None else (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0)
            for x in (Q, K, V, log_G, initial_state, sum_of_keys))
        hit = _CHECKED.get(sig)
    except (AttributeError, TypeError):  # not tensors / unhashable: the full check names the problem
        sig, hit = None, None
    if hit is not None:
        _check_log_G_values(log_G)  # values change from call to call: checked every time, never memoised
        return hit
    out = _check(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile, state_dtype)
    if sig is not None:
        if len(_CHECKED) > 512:
            _CHECKED.clear()
        _CHECKED[sig] = out
    return out


def _update_gpu(K, V, log_G, deg: int, d_tile: int):
    """sum_j phi(k~_j) v_j^T and sum_j phi(k~_j) over the cache, k~_j = k_j exp((G_last - G_j)/p):
    update_state over the whole cache as one chunk (padded to a multiple of 16 with zero keys and
    zero log-gates, which keeps G_last). float32 [b, h, D, d], [b, h, D]. No host sync."""
    import torch

    b, L, h, d = K.shape
    try:
        from vidrial.kernels.power_retention.update_state import update_state
    except ImportError:  # pragma: no cover - update_state is another engineer's module
        return _update_reference(K, V, log_G, deg, d_tile, dtype=torch.float32)
    # one chunk up to 1024 tokens (the usual switch-over); longer caches in chunks of 1024, combined
    # with the gate from each chunk's end to the cache's end
    c = -(-L // 16) * 16 if L <= _ABSORB_CHUNK else _ABSORB_CHUNK
    pad = -(-L // c) * c - L
    if pad:
        K = torch.nn.functional.pad(K, (0, 0, 0, 0, 0, pad))
        V = torch.nn.functional.pad(V, (0, 0, 0, 0, 0, pad))
        if log_G is not None:
            log_G = torch.nn.functional.pad(log_G, (0, 0, 0, pad))
    S_up, s_up = update_state(K.contiguous(), V.contiguous(), log_G.contiguous() if log_G is not None else None,
                              deg=deg, d_tile=d_tile, chunk_size=c)
    n = S_up.shape[1]
    if n == 1:
        return S_up[:, 0], s_up[:, 0]
    if log_G is None:
        return S_up.sum(1), s_up.sum(1)
    Lc = log_G.view(b, n, c, h).sum(2)  # [b, n, h] log gate of each chunk
    w = torch.exp(Lc.flip(1).cumsum(1).flip(1) - Lc)  # exp(sum of the later chunks' gates)
    w = w.to(S_up.dtype)
    return torch.einsum("bnh,bnhDd->bhDd", w, S_up), torch.einsum("bnh,bnhD->bhD", w, s_up)


def _update_reference(K, V, log_G, deg: int, d_tile: int, dtype=None):
    """The same update in float64 (reference.update_state_reference), cast to `dtype` if given."""
    from vidrial.reference.forward import update_state_reference

    S_up, s_up = update_state_reference(K, V, log_G, deg, d_tile, K.shape[1])
    S_up, s_up = S_up[:, 0], s_up[:, 0]
    return (S_up, s_up) if dtype is None else (S_up.to(dtype), s_up.to(dtype))


def _absorb(K, V, log_G, state, sum_of_keys, deg: int, d_tile: int, new_dtype, update) -> tuple[Any, Any]:
    """S' = exp(G_last) S + sum_j phi(k~_j) v_j^T (same for s); `update` gives the sums."""
    import torch

    S_up, s_up = update(K, V, log_G, deg, d_tile)
    if state is None:
        return S_up.to(new_dtype), s_up
    acc = S_up.dtype
    if log_G is not None:
        decay = torch.exp(log_G.to(acc).sum(1))  # [b, h]
        S_new = torch.addcmul(S_up, state.to(acc), decay[:, :, None, None])
        s_new = torch.addcmul(s_up, sum_of_keys.to(acc), decay[:, :, None])
    else:
        S_new, s_new = S_up + state.to(acc), s_up + sum_of_keys.to(acc)
    return S_new.to(state.dtype), s_new.to(sum_of_keys.dtype)


def _step(Q, K, V, log_G, initial_state, sum_of_keys, *, deg, scale, switch_over_seq_len, d_tile, new_dtype,
          decode, update):
    """The step's logic after validation: decode (query), then compress when the cache is full.
    `decode(Q, K, V, log_G, S, z)` -> Y; `update(K, V, log_G, deg, d_tile)` -> (S_up, s_up).
    The CPU tests run it with the kernel's emulation and the float64 update."""
    L = 0 if K is None else K.shape[1]
    Y = decode(Q, K, V, log_G, initial_state, sum_of_keys)
    if switch_over_seq_len is None or L < switch_over_seq_len:
        return Y, initial_state, sum_of_keys
    S_new, s_new = _absorb(K, V, log_G, initial_state, sum_of_keys, deg, d_tile, new_dtype, update)
    return Y, S_new, s_new


def power_retention_inference(Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, deg=2, scale=None,
                              switch_over_seq_len=DEFAULT_SWITCH_OVER, *, d_tile=None, state_dtype=None):
    """One inference step of power retention (see the module docstring for the semantics).

    Q [b, tq, hq, d] bf16/fp16 CUDA; K, V [b, L, h, d] (the KV cache including the new tokens, same
    dtype) or None; log_G [b, L, h] float32 per-step log gates (<= 0) or None; initial_state [b, h, D, d]
    float32/bfloat16 + sum_of_keys [b, h, D] float32, or None; deg 2 or 4; scale None/0 = 1/sqrt(d);
    switch_over_seq_len None (never compress) or int (default 512, as retention); d_tile: the state
    layout (default sympow.default_d_tile(d, deg)); state_dtype: dtype of a newly created state
    (float32 default). Returns (Y [b, tq, hq, d] in Q's dtype, state, sum_of_keys): the compressed
    state when L >= switch_over_seq_len (drop the cache), else the given state (or None, None).
    """
    import torch

    b, tq, hq, h, d, L, d_tile, D = _checked(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale,
                                             switch_over_seq_len, d_tile, state_dtype)
    if L == 0:
        K = V = log_G = None
    r = hq // h
    from vidrial.kernels.power_retention.decode import MAX_ROWS, decode_step

    compress = switch_over_seq_len is not None and L >= switch_over_seq_len
    new_dtype = initial_state.dtype if initial_state is not None else (state_dtype or torch.float32)
    if r * tq > MAX_ROWS and tq == L:
        Y, prefilled = _prefill(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, d_tile, compress)
        if not compress:
            return Y, initial_state, sum_of_keys
        S_f, s_f = prefilled
        return Y, S_f.to(new_dtype), s_f

    def kernel(Q, K, V, log_G, S, z):
        return decode_step(Q, K, V, log_G, S, z, deg=deg, d_tile=d_tile, scale=scale)

    def decode(Q, K, V, log_G, S, z):
        if r * tq <= MAX_ROWS:
            return kernel(Q, K, V, log_G, S, z)
        if r <= MAX_ROWS:  # groups of new tokens, each against the cache up to its last token
            return _split_queries(kernel, Q, K, V, log_G, S, z, MAX_ROWS // r)
        from vidrial.reference.forward import power_retention_inference_reference

        Y, _, _ = power_retention_inference_reference(Q, K, V, log_G, S, z, deg=deg, scale=scale,
                                                      switch_over_seq_len=None, d_tile=d_tile)
        return Y.to(Q.dtype)

    return _step(Q, K, V, log_G, initial_state, sum_of_keys, deg=deg, scale=scale,
                 switch_over_seq_len=switch_over_seq_len, d_tile=d_tile, new_dtype=new_dtype, decode=decode,
                 update=_update_gpu)


def _split_queries(decode, Q, K, V, log_G, S, z, per_call: int):
    """Y for tq new tokens in groups of `per_call`: group [a, a+m) sits at cache positions
    L - tq + a .. L - tq + a + m - 1, so it sees exactly the cache prefix that ends with its last
    token (the kernel puts its queries at the end of the cache it is given)."""
    import torch

    tq = Q.shape[1]
    L = 0 if K is None else K.shape[1]
    outs = []
    for a in range(0, tq, per_call):
        m = min(per_call, tq - a)
        if L:
            end = L - tq + a + m
            Kc, Vc = K[:, :end], V[:, :end]
            Gc = log_G[:, :end] if log_G is not None else None
        else:
            Kc = Vc = Gc = None
        outs.append(decode(Q[:, a:a + m], Kc, Vc, Gc, S, z))
    return torch.cat(outs, 1)


def _prefill(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, d_tile, want_state):
    """tq == L: the training forward over the cache (with the state as its initial state); its final
    state is the compressed state. Falls back to the float64 reference when vidrial.ops is absent."""
    try:
        from vidrial.ops import power_retention
    except ImportError:  # pragma: no cover
        power_retention = None
    L = K.shape[1]
    if power_retention is None:
        from vidrial.reference.forward import power_retention_inference_reference

        Y, S, s = power_retention_inference_reference(Q, K, V, log_G, initial_state, sum_of_keys, deg=deg,
                                                      scale=scale, switch_over_seq_len=L if want_state else None,
                                                      d_tile=d_tile)
        return Y.to(Q.dtype), ((S.float(), s.float()) if want_state else None)
    S0 = initial_state.float() if initial_state is not None else None
    chunk = None if L <= 1024 else 1024
    out = power_retention(Q, K, V, log_G, initial_state=S0, sum_of_keys=sum_of_keys, return_final_state=want_state,
                          deg=deg, scale=scale, chunk_size=chunk, switch_over_seq_len=None, d_tile=d_tile)
    if want_state:
        Y, S_f, s_f = out
        return Y, (S_f, s_f)
    return out, None
