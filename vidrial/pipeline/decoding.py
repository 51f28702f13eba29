"""The inference step (docs/MATH.md section 5) after validation: decode launches per row group, cache absorption.

The decode kernel (vidrial.kernels.power_retention.decode) takes at most MAX_ROWS query rows per KV head
(GQA group x new tokens). decode_rows splits wider problems into launches that each fit: groups of new
tokens (each against the cache prefix that ends with its last token) and, for a GQA group wider than
MAX_ROWS, groups of query heads (each a GQA problem of its own on the same KV heads and state). No host
sync; every launch on the current stream. The functions take the decoder and the state update as
arguments so that the CPU tests run them with the kernel's host execution or emulation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["decode_rows", "split_queries", "split_heads", "step", "absorb", "update_gpu", "update_reference",
           "ABSORB_CHUNK"]

Tensor = torch.Tensor
# decode(Q, K, V, log_G, S, z) -> Y; update(K, V, log_G, deg, d_tile) -> (S_up, s_up)
Decoder = Callable[[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor],
                    Optional[Tensor]], Tensor]
Updater = Callable[..., tuple[Tensor, Tensor]]

ABSORB_CHUNK = 1024  # update_state chunk of a cache absorption (longer caches: several chunks, combined)


def split_queries(decode: Decoder, Q: Tensor, K: Optional[Tensor], V: Optional[Tensor], log_G: Optional[Tensor],
                  S: Optional[Tensor], z: Optional[Tensor], per_call: int) -> Tensor:
    """Y for tq new tokens in groups of `per_call`: group [a, a+m) sits at cache positions
    L - tq + a .. L - tq + a + m - 1, so it sees exactly the cache prefix that ends with its last
    token (the kernel puts its queries at the end of the cache it is given)."""
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


def split_heads(decode: Decoder, Q: Tensor, K: Optional[Tensor], V: Optional[Tensor], log_G: Optional[Tensor],
                S: Optional[Tensor], z: Optional[Tensor], h: int, per_call: int) -> Tensor:
    """Y for a GQA group of r = hq / h query heads per KV head in groups of `per_call` heads: query heads
    [a, a+m) of every KV head form a problem [b, tq, h*m, d] of group m on the same K, V, log_G and state
    (query head i uses KV head i // r, so the heads of a KV head are adjacent)."""
    b, tq, hq, d = Q.shape
    r = hq // h
    Qh = Q.unflatten(2, (h, r))
    outs = []
    for a in range(0, r, per_call):
        m = min(per_call, r - a)
        Y = decode(Qh[:, :, :, a:a + m].reshape(b, tq, h * m, d), K, V, log_G, S, z)
        outs.append(Y.view(b, tq, h, m, d))
    return torch.cat(outs, 3).view(b, tq, hq, d)


def decode_rows(decode: Decoder, Q: Tensor, K: Optional[Tensor], V: Optional[Tensor], log_G: Optional[Tensor],
                S: Optional[Tensor], z: Optional[Tensor], h: int, max_rows: int) -> Tensor:
    """Y of one step through `decode`, in launches of at most `max_rows` query rows per KV head."""
    tq, r = Q.shape[1], Q.shape[2] // h
    if r * tq <= max_rows:
        return decode(Q, K, V, log_G, S, z)
    if r <= max_rows:
        return split_queries(decode, Q, K, V, log_G, S, z, max_rows // r)
    # equal head groups (r = 20: 10 + 10, not 16 + 4): fewer distinct kernel keys, balanced launches
    n = -(-r // max_rows)
    per_call = -(-r // n)

    def heads(Qg, Kg, Vg, Gg, Sg, zg):
        return decode_rows(decode, Qg, Kg, Vg, Gg, Sg, zg, h, max_rows)

    return split_heads(heads, Q, K, V, log_G, S, z, h, per_call)


def update_gpu(K: Tensor, V: Tensor, log_G: Optional[Tensor], deg: int, d_tile: int) -> tuple[Tensor, Tensor]:
    """sum_j phi(k~_j) v_j^T and sum_j phi(k~_j) over the cache, k~_j = k_j exp((G_last - G_j)/p):
    update_state over the whole cache as one chunk (padded to a multiple of 16 with zero keys and
    zero log-gates, which keeps G_last). float32 [b, h, D, d], [b, h, D]. No host sync."""
    from vidrial.kernels.power_retention.update_state import update_state

    b, L, h, d = K.shape
    # one chunk up to ABSORB_CHUNK tokens (the usual switch-over); longer caches in chunks of ABSORB_CHUNK,
    # combined with the gate from each chunk's end to the cache's end
    c = -(-L // 16) * 16 if L <= ABSORB_CHUNK else ABSORB_CHUNK
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


def update_reference(K: Tensor, V: Tensor, log_G: Optional[Tensor], deg: int, d_tile: int,
                     dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The same update in float64 (reference.update_state_reference), cast to `dtype` if given."""
    from vidrial.reference.forward import update_state_reference

    S_up, s_up = update_state_reference(K, V, log_G, deg, d_tile, K.shape[1])
    S_up, s_up = S_up[:, 0], s_up[:, 0]
    return (S_up, s_up) if dtype is None else (S_up.to(dtype), s_up.to(dtype))


def absorb(K: Tensor, V: Tensor, log_G: Optional[Tensor], state: Optional[Tensor], sum_of_keys: Optional[Tensor],
           deg: int, d_tile: int, new_dtype: torch.dtype, update: Updater) -> tuple[Tensor, Tensor]:
    """S' = exp(G_last) S + sum_j phi(k~_j) v_j^T (same for s); `update` gives the sums."""
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


def step(Q: Tensor, K: Optional[Tensor], V: Optional[Tensor], log_G: Optional[Tensor],
         initial_state: Optional[Tensor], sum_of_keys: Optional[Tensor], *, deg: int, scale: Optional[float],
         switch_over_seq_len: Optional[int], d_tile: int, new_dtype: torch.dtype, decode: Decoder,
         update: Updater) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The step's logic after validation: decode (query), then compress when the cache is full.
    The CPU tests run it with the kernel's emulation and the float64 update."""
    L = 0 if K is None else K.shape[1]
    Y = decode(Q, K, V, log_G, initial_state, sum_of_keys)
    if switch_over_seq_len is None or L < switch_over_seq_len:
        return Y, initial_state, sum_of_keys
    S_new, s_new = absorb(K, V, log_G, initial_state, sum_of_keys, deg, d_tile, new_dtype, update)
    return Y, S_new, s_new
