"""Inference (decoding) for power retention (docs/MATH.md section 5), with the `retention` package's
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
exist; also one absorbing step if the captured region absorbs, for update_state's kernel and table).
The compression step (once per switch_over_seq_len tokens) adds update_state + a gated sum (a few
more launches, still no sync). More rows run as several launches (vidrial.pipeline.decoding.decode_rows):
groups of new tokens, each against the cache prefix that ends with its last token, and for a GQA group
wider than 16, groups of query heads; prefill (tq == L > 16 rows) runs vidrial.power_retention's forward
(its final state is the compressed state).

torch.compile: under tracing the step is one custom op, ``vidrial::power_retention_decode`` (below), whose
fake kernel runs the argument checks on the fake tensors (an InputError's text reaches the user inside
Dynamo's error) and gives the output shapes; fullgraph=True and dynamic=True trace without graph breaks
(head_dim is specialised: the kernels are compiled for it). Eager calls skip the op (no dispatcher cost).
"""
from __future__ import annotations

from typing import Optional

import torch

from vidrial.core.errors import InputError
from vidrial.pipeline import checks, decoding
from vidrial.pipeline.layout import StateLayout

__all__ = ["power_retention_inference", "StateLayout"]

DEFAULT_SWITCH_OVER = 512  # retention's default
Tensor = torch.Tensor


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
    if torch.compiler.is_compiling():
        return _traced_step(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile,
                            state_dtype)
    return _eager_step(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile,
                       state_dtype)


def _eager_step(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile, state_dtype):
    from vidrial.kernels.power_retention.decode import MAX_ROWS, decode_step

    b, tq, hq, h, d, L, d_tile, D = checks.checked_inference(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale,
                                                             switch_over_seq_len, d_tile, state_dtype)
    if L == 0:
        K = V = log_G = None
    compress = switch_over_seq_len is not None and L >= switch_over_seq_len
    new_dtype = initial_state.dtype if initial_state is not None else (state_dtype or torch.float32)
    if (hq // h) * tq > MAX_ROWS and tq == L:
        Y, prefilled = _prefill(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, d_tile, compress)
        if not compress:
            return Y, initial_state, sum_of_keys
        S_f, s_f = prefilled
        return Y, S_f.to(new_dtype), s_f

    def kernel(Q, K, V, log_G, S, z):
        return decode_step(Q, K, V, log_G, S, z, deg=deg, d_tile=d_tile, scale=scale)

    def decode(Q, K, V, log_G, S, z):
        return decoding.decode_rows(kernel, Q, K, V, log_G, S, z, h, MAX_ROWS)

    return decoding.step(Q, K, V, log_G, initial_state, sum_of_keys, deg=deg, scale=scale,
                         switch_over_seq_len=switch_over_seq_len, d_tile=d_tile, new_dtype=new_dtype, decode=decode,
                         update=decoding.update_gpu)


def _prefill(Q: Tensor, K: Tensor, V: Tensor, log_G: Optional[Tensor], initial_state: Optional[Tensor],
             sum_of_keys: Optional[Tensor], deg: int, scale: Optional[float], d_tile: int, want_state: bool
             ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
    """tq == L: the training forward over the cache (with the state as its initial state); its final
    state is the compressed state."""
    from vidrial.ops import power_retention

    L = K.shape[1]
    S0 = initial_state.float() if initial_state is not None else None
    chunk = None if L <= 1024 else 1024
    out = power_retention(Q, K, V, log_G, initial_state=S0, sum_of_keys=sum_of_keys, return_final_state=want_state,
                          deg=deg, scale=scale, chunk_size=chunk, switch_over_seq_len=None, d_tile=d_tile)
    if want_state:
        Y, S_f, s_f = out
        return Y, (S_f, s_f)
    return out, None


# ---- torch.compile: the step as one custom op --------------------------------------------------------
_NO_STATE = (0,)  # the op's state outputs when the step does not compress (it may not return its inputs)


def _compresses(K: Optional[Tensor], switch_over_seq_len: Optional[int]) -> bool:
    return switch_over_seq_len is not None and K is not None and K.shape[1] >= switch_over_seq_len


@torch.library.custom_op("vidrial::power_retention_decode", mutates_args=())
def power_retention_decode(Q: Tensor, K: Optional[Tensor], V: Optional[Tensor], log_G: Optional[Tensor],
                           initial_state: Optional[Tensor], sum_of_keys: Optional[Tensor], deg: int, scale: float,
                           switch_over_seq_len: int, d_tile: int, state_dtype: Optional[torch.dtype]
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, state, sum_of_keys) of one step; the state outputs are empty when it does not compress.
    scale 0: 1/sqrt(d); switch_over_seq_len -1: never compress; d_tile 0: the default layout."""
    switch = None if switch_over_seq_len < 0 else switch_over_seq_len
    Y, S, z = _eager_step(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale or None, switch, d_tile or None,
                          state_dtype)
    if not _compresses(K, switch):
        return Y, Q.new_empty(_NO_STATE, dtype=torch.float32), Q.new_empty(_NO_STATE, dtype=torch.float32)
    return Y, S, z


@power_retention_decode.register_fake
def _decode_fake(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile, state_dtype):
    # dynamic=True hands ints captured from closures in as SymInts; they choose the kernels and the state layout,
    # so they are specialised here (int() of a SymInt guards on its value)
    deg, switch_over_seq_len, d_tile = int(deg), int(switch_over_seq_len), int(d_tile)
    switch = None if switch_over_seq_len < 0 else switch_over_seq_len
    b, tq, hq, h, d, L, d_tile, D = checks.check_inference(Q, K, V, log_G, initial_state, sum_of_keys, deg,
                                                           scale or None, switch, d_tile or None, state_dtype,
                                                           traced=True)
    Y = Q.new_empty(Q.shape)
    if not _compresses(K, switch):
        return Y, Q.new_empty(_NO_STATE, dtype=torch.float32), Q.new_empty(_NO_STATE, dtype=torch.float32)
    new_dtype = initial_state.dtype if initial_state is not None else (state_dtype or torch.float32)
    return Y, Q.new_empty((b, h, D, d), dtype=new_dtype), Q.new_empty((b, h, D), dtype=torch.float32)


def _traced_step(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len, d_tile, state_dtype):
    """power_retention_inference under torch.compile: the custom op, and the given state back when the step
    does not compress (as the eager step returns it)."""
    for name, value, kind in (("deg", deg, int), ("switch_over_seq_len", switch_over_seq_len, (int, type(None))),
                              ("d_tile", d_tile, (int, type(None)))):
        if not isinstance(value, kind) or isinstance(value, bool):  # the op's schema needs these types
            checks.check_inference(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, switch_over_seq_len,
                                   d_tile, state_dtype, traced=True)  # names the argument
            raise InputError(name, value, "an integer" + (" or None" if name != "deg" else ""))
    Y, S, z = torch.ops.vidrial.power_retention_decode(
        Q, K, V, log_G, initial_state, sum_of_keys, deg, float(scale or 0.0),
        -1 if switch_over_seq_len is None else switch_over_seq_len, d_tile or 0, state_dtype)
    if _compresses(K, switch_over_seq_len):
        return Y, S, z
    return Y, initial_state, sum_of_keys
