"""Float64 reference implementations of power retention (docs/MATH.md): what every kernel test compares to.

Pure torch, any device, every computation in float64 (inputs of any float dtype are converted;
outputs are float64, the caller casts). Everything is differentiable with autograd, so the
backward references are ``torch.autograd.grad`` through these functions.

Conventions (docs/MATH.md section 1, and the ``retention`` 1.0.7 package where noted):

* Layout ``[batch, time, heads, dim]``. ``Q [b,t,hq,d]``, ``K, V [b,t,h,d]``, ``log_G [b,t,h]``
  (per-step log gates, <= 0; *not* cumsum'd), ``hq = r*h``; query head ``i`` uses KV head ``i // r``
  for keys, values, gates *and* the recurrent state (the state lives per KV head: ``[b,h,D,d]``),
  exactly like retention (``repeat_interleave(r)`` on the head axis).
* ``scale`` None or 0 means ``1/sqrt(d)`` (retention: ``if not scale: scale = 1/sqrt(d)``). The scale
  is applied to ``q.k`` before the power, ``w_ij = (s q_i.k_j)^p exp(G_i - G_j)``. On the state path
  the state is *unscaled* (``S = sum phi(k~) v^T``) and the query side multiplies by ``s^p``
  (retention ``query_state``: ``Y_qs * scale**deg``). Hence ``initial_state``/``sum_of_keys`` and the
  returned final state never contain the scale. Note that with a normalised output the scale cancels
  in exact arithmetic; it only moves ``m`` (by ``p*log(s)``) and the size of the guards below.
* phi is the tiled symmetric power of ``sympow.py`` (``layout(d, p, d_tile).feature_indices()``);
  ``phi(x).phi(y) = (x.y)^p`` for every ``d_tile``; ``Y`` does not depend on ``d_tile``, states do.

Guards (all relative, all far below bf16 resolution 2^-8 = 3.9e-3; both can be switched off with
the keyword-only ``log_eps=0, denom_eps=0`` for exact float64 comparisons):

* ``LOG_EPS = 1e-7`` inside the log of the weight (retention: ``log(|s| + 1e-7)``):
  ``log w_ij = p*log(|s q_i.k_j| + LOG_EPS) + G_i - G_j``. It perturbs each weight by a factor
  ``(1 + LOG_EPS/|x|)^p``; on ``Y`` the effect is at most ``~p*LOG_EPS*sum|x_j|/sum x_j^2`` relative
  (2e-5 even if every ``|s q.k|`` is as small as 1e-2). Additionally ``|s q.k|`` is clamped below at
  ``_TINY = 1e-30`` before the log so that an all-zero row (padding queries, q = 0) never produces
  ``-inf``/NaN, also with ``log_eps=0``; a weight ``< 1e-30^p`` is irrelevant next to any real one.
* ``DENOM_EPS = 1e-6`` added to the max-shifted denominator ``l`` (retention:
  ``l = sum(exp(s - rowmax)) + 1e-6``). Since the row maximum contributes ``exp(0) = 1``, ``l >= 1``
  and the guard changes ``Y`` by at most 1e-6 relative. In the chunked path the guard is relative to
  the intra-chunk row maximum, in the quadratic path to the global one (both <= 1e-6 relative).
* No other guard: the merge with the state uses a shared (detached, exactly cancelling) stabiliser
  ``M = max(m, log(B))``, so nothing overflows. A state-only query (inference with an empty cache)
  is ``A/B`` with no guard, like retention.

Gradients: ``m`` is not detached, so autograd is the exact gradient of the guarded function. A
kernel whose backward treats ``m`` as a constant (flash style, and retention's ``rowmax.detach()``)
differs from it only through ``denom_eps`` (about 1e-6 relative).

Cross-checked (float64 inputs, CPU) against retention 1.0.7's ``retention.reference``
``power_retention`` / ``power_retention_inference`` / ``_attention.reference.attention``: Y, (O, l, m)
and inference Y agree to ~1e-6, the float32 casts inside retention (gates, l, rowmax, discumsum).
"""
from __future__ import annotations

import functools
import math

import torch

from vidrial.core.errors import InputError
from vidrial.kernels.power_retention.sympow import SUPPORTED_DEGREES, default_d_tile, layout

__all__ = [
    "LOG_EPS",
    "DENOM_EPS",
    "phi",
    "update_state_reference",
    "discumsum_reference",
    "attention_reference",
    "intra_chunk_attention_reference",
    "power_retention_reference",
    "power_retention_varlen_reference",
    "power_retention_inference_reference",
    "query_state_reference",
]

LOG_EPS = 1e-7
DENOM_EPS = 1e-6
_TINY = 1e-30
_F64 = torch.float64
# Query rows per block in the quadratic attention, to bound the [b, hq, rows, t] float64 temporaries.
_QUERY_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _f64(x):
    return None if x is None else x.to(_F64)


def _resolve_scale(scale, d: int) -> float:
    """retention: ``if not scale: scale = 1/sqrt(d)`` (None or 0 -> 1/sqrt(d))."""
    return 1.0 / math.sqrt(d) if not scale else float(scale)


def _resolve_d_tile(d: int, deg: int, d_tile) -> int:
    return default_d_tile(d, deg) if d_tile is None else int(d_tile)


def _check_deg(deg) -> None:
    if deg not in SUPPORTED_DEGREES:
        raise InputError("deg", deg, f"one of {SUPPORTED_DEGREES}")


def _check_qkv(Q, K, V, log_G, allow_shorter_q: bool = False) -> tuple[int, int, int, int, int, int]:
    """Returns b, tq, hq, d, tk, h. Shapes per docs/MATH.md section 1."""
    if Q.dim() != 4:
        raise InputError("Q", tuple(Q.shape), "a 4-d tensor [batch, time, q_heads, head_dim]")
    if K.dim() != 4 or V.dim() != 4:
        raise InputError("K/V", (tuple(K.shape), tuple(V.shape)), "4-d tensors [batch, time, kv_heads, head_dim]")
    b, tq, hq, d = Q.shape
    bk, tk, h, dk = K.shape
    if K.shape != V.shape:
        raise InputError("V", tuple(V.shape), f"the shape of K {tuple(K.shape)}")
    if bk != b or dk != d:
        raise InputError("K", tuple(K.shape), f"batch {b} and head_dim {d} as in Q {tuple(Q.shape)}")
    if tq == 0 or tk == 0:
        raise InputError("Q/K", (tuple(Q.shape), tuple(K.shape)), "at least one time step")
    if (tq > tk) if allow_shorter_q else (tq != tk):
        want = f"<= the key length {tk}" if allow_shorter_q else f"equal to the key length {tk}"
        raise InputError("Q", tuple(Q.shape), f"a query length {want}")
    if h == 0 or hq % h:
        raise InputError("Q", tuple(Q.shape), f"a number of query heads that is a multiple of the KV heads h={h}")
    if log_G is not None and tuple(log_G.shape) != (b, tk, h):
        raise InputError("log_G", tuple(log_G.shape), f"None or shape {(b, tk, h)} = [batch, time, kv_heads]")
    return b, tq, hq, d, tk, h


def _rep_heads(x, r: int, dim: int):
    """KV head -> query heads: query head i reads KV head i // r (retention's repeat_interleave)."""
    return x if (x is None or r == 1) else x.repeat_interleave(r, dim=dim)


def _log_weights(Q, K, deg: int, scale: float, log_eps: float):
    """``p * log(max(|s q.k|, TINY) + log_eps)`` for Q [..., i, d], K [..., j, d] (same heads)."""
    x = scale * torch.matmul(Q, K.transpose(-1, -2))
    return deg * torch.log(x.abs().clamp_min(_TINY) + log_eps)


def _shifted_attention(a, V, denom_eps: float):
    """a: log weights [..., i, j] (-inf where masked, at least one finite entry per row).

    Returns O = sum_j exp(a_ij - m_i) v_j, l = sum_j exp(a_ij - m_i) + denom_eps, m = max_j a_ij.
    m is *not* detached: with denom_eps > 0 the output depends on it (through the guard), so
    autograd gives the exact gradient of the implemented function.
    """
    m = a.amax(dim=-1)
    w = torch.exp(a - m.unsqueeze(-1))
    return torch.matmul(w, V), w.sum(-1) + denom_eps, m


# ----------------------------------------------------------------------------------------------
# feature map and state
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _feature_tables(d: int, deg: int, d_tile: int, device: torch.device):
    idx, coef = layout(d, deg, d_tile).feature_indices()
    return idx.to(device), coef.to(device)


def phi(x: torch.Tensor, deg: int, d_tile: int) -> torch.Tensor:
    """Tiled symmetric power features ``[..., D]`` (float64) in THE order of ``sympow.py``.

    ``phi(x)[f] = coef[f] * prod_k x[idx[f, k]]`` with ``idx, coef = layout(d, deg, d_tile).feature_indices()``,
    so ``phi(x) . phi(y) = (x . y)^deg`` and ``D = C(d/d_tile + deg - 1, deg) * d_tile^deg``.
    """
    x = x.to(_F64)
    idx, out = _feature_tables(x.shape[-1], deg, d_tile, x.device)
    for k in range(deg):
        out = out * x[..., idx[:, k]]
    return out


def update_state_reference(K, V, log_G, deg, d_tile, chunk_size):
    """Per-chunk states (docs/MATH.md section 3 step 1), float64.

    K, V [b,t,h,d] with t a multiple of chunk_size; log_G [b,t,h] or None. With ``g`` the cumsum of
    log_G inside each chunk, the decayed keys are ``k~ = k * exp((g[c-1] - g[tau]) / p)`` and

        S[:, nu] = sum_tau phi(k~_tau) v_tau^T   [b,n,h,D,d]
        s[:, nu] = sum_tau phi(k~_tau)           [b,n,h,D]

    i.e. each chunk's contribution is decayed to the *end* of its chunk. The state is unscaled
    (no ``scale``), as in retention. Computed chunk by chunk to bound memory (phi is [b,c,h,D]).
    """
    _check_deg(deg)
    if K.dim() != 4 or K.shape != V.shape:
        raise InputError("K/V", (tuple(K.shape), tuple(V.shape)), "equal shapes [batch, time, kv_heads, head_dim]")
    b, t, h, d = K.shape
    c = int(chunk_size)
    if c <= 0 or t % c:
        raise InputError("chunk_size", chunk_size, f"a positive divisor of the sequence length t={t}")
    if log_G is not None and tuple(log_G.shape) != (b, t, h):
        raise InputError("log_G", tuple(log_G.shape), f"None or shape {(b, t, h)}")
    layout(d, deg, d_tile)  # validates d_tile
    n = t // c
    K, V = _f64(K).reshape(b, n, c, h, d), _f64(V).reshape(b, n, c, h, d)
    if log_G is not None:
        g = _f64(log_G).reshape(b, n, c, h).cumsum(2)
        K = K * torch.exp((g[:, :, -1:] - g) / deg).unsqueeze(-1)
    S_list, s_list = [], []
    for nu in range(n):
        pk = phi(K[:, nu], deg, d_tile)  # [b, c, h, D]
        S_list.append(torch.einsum("bchD,bche->bhDe", pk, V[:, nu]))
        s_list.append(pk.sum(1))
    return torch.stack(S_list, 1), torch.stack(s_list, 1)


def discumsum_reference(S, s, log_G_chunk, initial_state=None, sum_of_keys=None):
    """Discounted cumulative sum over chunks (docs/MATH.md section 3 step 2), float64.

    S [b,n,h,D,d], s [b,n,h,D], log_G_chunk [b,n,h] = chunk gates ``L_nu = g[nu, c-1]`` (None: no decay).

        Sbar_0 = initial_state (or 0),  Sbar_{nu+1} = exp(L_nu) Sbar_nu + S_nu   (same for sbar)

    Returns (Sbar [b,n+1,h,D,d], sbar [b,n+1,h,D]); ``Sbar[:, nu]`` is the state at the start of chunk
    nu and ``Sbar[:, n]`` the final state. Same recursion as retention's ``discumsum`` (which prepends
    the initial state as an extra chunk with gate 0 and drops it).
    """
    b, n, h, D, d = S.shape
    if tuple(s.shape) != (b, n, h, D):
        raise InputError("s", tuple(s.shape), f"shape {(b, n, h, D)}")
    if log_G_chunk is not None and tuple(log_G_chunk.shape) != (b, n, h):
        raise InputError("log_G_chunk", tuple(log_G_chunk.shape), f"None or shape {(b, n, h)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, D, d):
        raise InputError("initial_state", tuple(initial_state.shape), f"None or shape {(b, h, D, d)}")
    if sum_of_keys is not None and tuple(sum_of_keys.shape) != (b, h, D):
        raise InputError("sum_of_keys", tuple(sum_of_keys.shape), f"None or shape {(b, h, D)}")
    S, s = _f64(S), _f64(s)
    cur_S = _f64(initial_state) if initial_state is not None else S.new_zeros(b, h, D, d)
    cur_s = _f64(sum_of_keys) if sum_of_keys is not None else s.new_zeros(b, h, D)
    Ss, ss = [cur_S], [cur_s]
    for nu in range(n):
        if log_G_chunk is not None:
            gate = torch.exp(_f64(log_G_chunk[:, nu]))  # [b, h]
            cur_S = gate[..., None, None] * cur_S
            cur_s = gate[..., None] * cur_s
        cur_S = cur_S + S[:, nu]
        cur_s = cur_s + s[:, nu]
        Ss.append(cur_S)
        ss.append(cur_s)
    return torch.stack(Ss, 1), torch.stack(ss, 1)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

def _causal_attention(Q, K, V, G, deg, scale, log_eps, denom_eps):
    """Quadratic causal (O, l, m) with queries aligned to the *end* of the keys (retention's mask
    ``i + tk - tq >= j``). Q [b,tq,hq,d], K,V [b,tk,h,d], G [b,tk,h] cumulative log gates or None.
    Returns O [b,tq,hq,d], l, m [b,tq,hq] (float64), w.r.t. the global row shift m."""
    b, tq, hq, d = Q.shape
    tk, h = K.shape[1], K.shape[2]
    r = hq // h
    Qh = Q.transpose(1, 2)  # [b, hq, tq, d]
    Kh = _rep_heads(K, r, 2).transpose(1, 2)  # [b, hq, tk, d]
    Vh = _rep_heads(V, r, 2).transpose(1, 2)
    Gh = _rep_heads(G, r, 2).transpose(1, 2) if G is not None else None  # [b, hq, tk]
    kpos = torch.arange(tk, device=Q.device)
    outs = []
    for i0 in range(0, tq, _QUERY_BLOCK):
        i1 = min(tq, i0 + _QUERY_BLOCK)
        qpos = torch.arange(i0, i1, device=Q.device) + (tk - tq)  # absolute key position of each query
        a = _log_weights(Qh[:, :, i0:i1], Kh, deg, scale, log_eps)  # [b, hq, rows, tk]
        if Gh is not None:
            a = a + (Gh[:, :, qpos].unsqueeze(-1) - Gh.unsqueeze(-2))
        a = a.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        outs.append(_shifted_attention(a, Vh, denom_eps))
    O = torch.cat([o[0] for o in outs], 2).transpose(1, 2)
    l = torch.cat([o[1] for o in outs], 2).transpose(1, 2)
    m = torch.cat([o[2] for o in outs], 2).transpose(1, 2)
    return O, l, m


def attention_reference(Q, K, V, log_G=None, deg=2, scale=None, *, log_eps=LOG_EPS, denom_eps=DENOM_EPS):
    """The quadratic formula of docs/MATH.md section 1, float64 ``[b,t,hq,d]``.

        Y_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij,  w_ij = (s q_i.k_j)^p exp(G_i - G_j),  G = cumsum(log_G)

    computed in log space with the global row max shift (see the module docstring for the guards):
    ``a_ij = p log(|s q_i.k_j| + log_eps) + G_i - G_j``, ``m_i = max_j a_ij``,
    ``Y_i = sum_j e^{a_ij - m_i} v_j / (sum_j e^{a_ij - m_i} + denom_eps)``, as retention's
    ``_attention.reference.attention(..., norm=True)`` with ``log_G`` cumsum'd (retention's
    ``power_retention`` does that cumsum before calling it). GQA: query head i uses KV head i // r.
    Q may be shorter than K (tq <= tk): the queries are then the last tq positions (retention's mask).
    """
    _check_deg(deg)
    b, tq, hq, d, tk, h = _check_qkv(Q, K, V, log_G, allow_shorter_q=True)
    scale = _resolve_scale(scale, d)
    G = _f64(log_G).cumsum(1) if log_G is not None else None
    O, l, _ = _causal_attention(_f64(Q), _f64(K), _f64(V), G, deg, scale, log_eps, denom_eps)
    return O / l.unsqueeze(-1)


def intra_chunk_attention_reference(Q, K, V, log_G, deg, scale, chunk_size, *, log_eps=LOG_EPS, denom_eps=DENOM_EPS):
    """Unnormalised causal attention inside each chunk (docs/MATH.md section 3 step 3), float64.

    Q [b,t,hq,d], K, V [b,t,h,d], log_G [b,t,h] or None; t need not be a multiple of chunk_size (a
    last partial chunk is just shorter). For a query at position i in chunk nu = i // c, over keys j
    of the same chunk with j <= i, with ``g`` the cumsum of log_G *inside the chunk* and s the scale:

        a_ij = p * log(max(|s q_i.k_j|, 1e-30) + log_eps) + g_i - g_j     (log of the weight w_ij)
        m_i  = max_j a_ij                          (row shift, natural log, includes p*log(s))
        O_i  = sum_j exp(a_ij - m_i) v_j           [b,t,hq,d]   (numerator scaled by exp(-m_i))
        l_i  = sum_j exp(a_ij - m_i) + denom_eps   [b,t,hq]     (denominator scaled by exp(-m_i), >= 1)

    so the within-chunk output is ``O / l`` and the true (unshifted) sums are ``O e^m`` and
    ``(l - denom_eps) e^m``. This is retention's ``attention(..., norm=False)`` triple
    ``(o, l, rowmax)`` applied per chunk (log_eps = 1e-7, denom_eps = 1e-6 are its guards).
    The merge with the state is ``Y = (O e^m + s^p phi(q~).Sbar) / (l e^m + s^p phi(q~).sbar)``.
    """
    _check_deg(deg)
    b, t, hq, d, _, h = _check_qkv(Q, K, V, log_G)
    c = int(chunk_size)
    if c <= 0:
        raise InputError("chunk_size", chunk_size, "a positive integer")
    scale = _resolve_scale(scale, d)
    n = -(-t // c)
    pad = n * c - t
    Q, K, V = _f64(Q), _f64(K), _f64(V)
    log_G = _f64(log_G)
    if pad:
        Q = torch.nn.functional.pad(Q, (0, 0, 0, 0, 0, pad))
        K = torch.nn.functional.pad(K, (0, 0, 0, 0, 0, pad))
        V = torch.nn.functional.pad(V, (0, 0, 0, 0, 0, pad))
        if log_G is not None:
            log_G = torch.nn.functional.pad(log_G, (0, 0, 0, pad))
    # chunks become batch entries: [b*n, c, heads, d]; padded keys come after every real query so
    # the causal mask never lets a real query see them.
    g = log_G.reshape(b * n, c, h).cumsum(1) if log_G is not None else None
    O, l, m = _causal_attention(Q.reshape(b * n, c, hq, d), K.reshape(b * n, c, h, d),
                                V.reshape(b * n, c, h, d), g, deg, scale, log_eps, denom_eps)
    O = O.reshape(b, n * c, hq, d)[:, :t]
    l = l.reshape(b, n * c, hq)[:, :t]
    m = m.reshape(b, n * c, hq)[:, :t]
    return O, l, m


def _query_state(Qg, Sbar, sbar, deg, d_tile, scale):
    """A = s^p phi(q~).Sbar, B = s^p phi(q~).sbar for gated queries Qg [b,rows,hq,d] and a state per
    KV head Sbar [b,h,D,d], sbar [b,h,D] (query head i reads KV head i // r)."""
    hq, h = Qg.shape[2], Sbar.shape[1]
    r = hq // h
    pq = phi(Qg, deg, d_tile)  # [b, rows, hq, D]
    Sx, sx = _rep_heads(Sbar, r, 1), _rep_heads(sbar, r, 1)
    sp = scale**deg
    A = sp * torch.einsum("bihD,bhDe->bihe", pq, Sx)
    B = sp * torch.einsum("bihD,bhD->bih", pq, sx)
    return A, B


def _merge(O, l, m, A, B):
    """Y = (O e^m + A) / (l e^m + B) with the shared stabiliser M = max(m, log B) (detached: it
    cancels exactly). m >= p*log(1e-30) so exp(-M) <= exp(-m) never overflows float64."""
    logB = torch.log(B.detach().clamp_min(1e-300))
    M = torch.maximum(m.detach(), logB)
    em = torch.exp(m - M)
    eM = torch.exp(-M)
    return (O * em.unsqueeze(-1) + A * eM.unsqueeze(-1)) / (l * em + B * eM).unsqueeze(-1)


def _check_state(initial_state, sum_of_keys, b, h, D, d, d_tile, deg):
    if (initial_state is None) != (sum_of_keys is None):
        raise InputError("sum_of_keys", None if sum_of_keys is None else tuple(sum_of_keys.shape),
                         "given together with initial_state (both or neither)")
    if initial_state is None:
        return
    if tuple(initial_state.shape) != (b, h, D, d):
        raise InputError("initial_state", tuple(initial_state.shape),
                         f"shape {(b, h, D, d)} = [batch, kv_heads, D, head_dim] with D={D} for "
                         f"deg={deg}, d_tile={d_tile} (the state layout must match d_tile)")
    if tuple(sum_of_keys.shape) != (b, h, D):
        raise InputError("sum_of_keys", tuple(sum_of_keys.shape), f"shape {(b, h, D)} = [batch, kv_heads, D]")


def power_retention_reference(Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, return_final_state=False,
                              deg=2, scale=None, chunk_size=None, d_tile=None, *,
                              log_eps=LOG_EPS, denom_eps=DENOM_EPS):
    """Float64 chunked power retention (docs/MATH.md section 3): ``Y`` or ``(Y, S_final, s_final)``.

    Q [b,t,hq,d], K, V [b,t,h,d], log_G [b,t,h] or None, initial_state [b,h,D,d] and sum_of_keys
    [b,h,D] (both or neither; state per KV head, unscaled, in the ``d_tile`` layout). Steps:

    1. pad t to a multiple of c with zeros (log_G with 0), as retention's ``pad_to_chunk_multiple``;
    2. ``update_state_reference`` -> ``discumsum_reference`` with ``L_nu = g[nu, c-1]``;
    3. ``intra_chunk_attention_reference`` -> (O, l, m);
    4. query state with gated queries ``q~ = q exp(g/p)`` (gate of KV head i // r) and the merge
       ``Y = (O e^m + s^p phi(q~).Sbar_nu) / (l e^m + s^p phi(q~).sbar_nu)`` (retention's
       ``query_state`` formula; the sqrt(D) / alpha rescaling there cancels exactly);
    5. drop the padding.

    ``chunk_size=None``: the quadratic path (``attention_reference``); with an ``initial_state`` it
    runs the chunked algorithm with a single chunk of length t, as retention does. The final state
    is ``Sbar_n`` (padding keys are 0 and padding gates 0, so it is the state at the true end of the
    sequence; retention's ``S[:, -1]``). With ``chunk_size=None`` it is computed as one chunk.
    Unlike retention, a given chunk_size always uses the chunked path (retention switches to the
    quadratic formula when ``t <= switch_over_seq_len``; the two agree, that is the test).
    Y is float64 ``[b,t,hq,d]``; S_final float64 ``[b,h,D,d]``, s_final float64 ``[b,h,D]``.
    """
    _check_deg(deg)
    b, t, hq, d, _, h = _check_qkv(Q, K, V, log_G)
    r = hq // h
    scale = _resolve_scale(scale, d)
    d_tile = _resolve_d_tile(d, deg, d_tile)
    D = layout(d, deg, d_tile).feature_dim
    _check_state(initial_state, sum_of_keys, b, h, D, d, d_tile, deg)
    if chunk_size is not None and int(chunk_size) <= 0:
        raise InputError("chunk_size", chunk_size, "None or a positive integer")
    Q, K, V, log_G = _f64(Q), _f64(K), _f64(V), _f64(log_G)

    if chunk_size is None and initial_state is None:
        Y = attention_reference(Q, K, V, log_G, deg, scale, log_eps=log_eps, denom_eps=denom_eps)
        if not return_final_state:
            return Y
        S, s = update_state_reference(K, V, log_G, deg, d_tile, t)
        return Y, S[:, 0], s[:, 0]

    c = t if chunk_size is None else int(chunk_size)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        Q = torch.nn.functional.pad(Q, (0, 0, 0, 0, 0, pad))
        K = torch.nn.functional.pad(K, (0, 0, 0, 0, 0, pad))
        V = torch.nn.functional.pad(V, (0, 0, 0, 0, 0, pad))
        if log_G is not None:
            log_G = torch.nn.functional.pad(log_G, (0, 0, 0, pad))
    S, s = update_state_reference(K, V, log_G, deg, d_tile, c)
    g = log_G.reshape(b, n, c, h).cumsum(2) if log_G is not None else None
    L = g[:, :, -1] if g is not None else None
    Sbar, sbar = discumsum_reference(S, s, L, initial_state, sum_of_keys)
    O, l, m = intra_chunk_attention_reference(Q, K, V, log_G, deg, scale, c, log_eps=log_eps, denom_eps=denom_eps)
    Ys = []
    for nu in range(n):
        sl = slice(nu * c, (nu + 1) * c)
        Qg = Q[:, sl]
        if g is not None:
            Qg = Qg * torch.exp(_rep_heads(g[:, nu], r, 2) / deg).unsqueeze(-1)
        A, B = _query_state(Qg, Sbar[:, nu], sbar[:, nu], deg, d_tile, scale)
        Ys.append(_merge(O[:, sl], l[:, sl], m[:, sl], A, B))
    Y = torch.cat(Ys, 1)[:, :t]
    if return_final_state:
        return Y, Sbar[:, n], sbar[:, n]
    return Y


def power_retention_inference_reference(Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, deg=2,
                                        scale=None, switch_over_seq_len=512, d_tile=None, *,
                                        log_eps=LOG_EPS, denom_eps=DENOM_EPS):
    """Float64 decoding step (docs/MATH.md section 5), mirroring retention's ``power_retention_inference``
    (non-fused normaliser, the one ``retention.triton`` exports): returns ``(Y, state, sum_of_keys)``.

    Q [b,tq,hq,d] (usually tq=1); K, V [b,tk,h,d] the KV cache including the current token(s), or
    None (tk=0); log_G [b,tk,h] or None; initial_state [b,h,D,d] + sum_of_keys [b,h,D] (both or
    neither; the state sits *before* the cache's first token). Query i sits at cache position
    ``tk - tq + i`` (retention's causal alignment). Then:

    * no state: ``Y`` = causal power attention over the cache (``attention_reference``);
    * state: ``Y = (O e^m + s^p phi(q~).S) / (l e^m + s^p phi(q~).s)`` with (O, l, m) the quadratic
      attention over the cache (global row shift, guards as in ``attention_reference``) and
      ``q~ = q exp(G_pos / p)``, ``G = cumsum(log_G)`` over the cache (the state decayed to the query).
      With an empty cache ``Y = A / B``, no guard. (retention gates every query with the *last* G;
      identical for tq = 1, the decode case; here each query uses its own position.)
    * if ``switch_over_seq_len is not None and tk >= switch_over_seq_len`` the cache is compressed:
      ``S' = exp(G_last) S + sum_j phi(k~_j) v_j^T`` with ``k~_j = k_j exp((G_last - G_j)/p)``
      (same for s; S = 0 without a state), and the caller drops the cache; otherwise the given
      state is returned unchanged (as float64, or None when there is none).

    ``scale`` None (or 0) means 1/sqrt(d); retention's default ``switch_over_seq_len=512`` is kept.
    Y float64 [b,tq,hq,d]; state float64 [b,h,D,d] or None; sum_of_keys float64 [b,h,D] or None.
    """
    _check_deg(deg)
    has_cache = K is not None and V is not None and K.shape[1] > 0
    if not has_cache and initial_state is None:
        raise InputError("initial_state", None, "a state when the KV cache is empty (K/V None or length 0)")
    if Q.dim() != 4:
        raise InputError("Q", tuple(Q.shape), "a 4-d tensor [batch, time, q_heads, head_dim]")
    b, tq, hq, d = Q.shape
    if has_cache:
        _, _, _, _, tk, h = _check_qkv(Q, K, V, log_G, allow_shorter_q=True)
    else:
        tk, h = 0, initial_state.shape[1]
        if h == 0 or hq % h:
            raise InputError("Q", tuple(Q.shape), f"a number of query heads that is a multiple of the state's KV heads {h}")
    r = hq // h
    scale = _resolve_scale(scale, d)
    d_tile = _resolve_d_tile(d, deg, d_tile)
    D = layout(d, deg, d_tile).feature_dim
    _check_state(initial_state, sum_of_keys, b, h, D, d, d_tile, deg)
    Q = _f64(Q)
    G = _f64(log_G).cumsum(1) if (has_cache and log_G is not None) else None
    if has_cache:
        K, V = _f64(K), _f64(V)
        O, l, m = _causal_attention(Q, K, V, G, deg, scale, log_eps, denom_eps)

    S0, s0 = _f64(initial_state), _f64(sum_of_keys)
    if S0 is None:
        Y = O / l.unsqueeze(-1)
    else:
        Qg = Q
        if G is not None:
            Gq = _rep_heads(G[:, tk - tq:], r, 2)  # [b, tq, hq]
            Qg = Q * torch.exp(Gq / deg).unsqueeze(-1)
        A, B = _query_state(Qg, S0, s0, deg, d_tile, scale)
        Y = _merge(O, l, m, A, B) if has_cache else A / B.unsqueeze(-1)

    if switch_over_seq_len is not None and has_cache and tk >= switch_over_seq_len:
        S_up, s_up = update_state_reference(K, V, log_G, deg, d_tile, tk)
        S_up, s_up = S_up[:, 0], s_up[:, 0]
        if S0 is None:
            return Y, S_up, s_up
        if G is not None:
            decay = torch.exp(G[:, -1])  # [b, h]
            S0, s0 = decay[..., None, None] * S0, decay[..., None] * s0
        return Y, S0 + S_up, s0 + s_up
    return Y, S0, s0


def query_state_reference(Q, Sbar, sbar, O, l, m, log_G=None, *, deg, d_tile, scale=None, chunk_size):
    """Float64 torch version of the kernel's math (the query_state kernel's contract, for tests and the tuner): Y [b,t,hq,d] float64.
    Sbar/sbar may hold n or n+1 chunks (the first n are used). Same merge as reference._merge."""
    b, t, hq, d = Q.shape
    h = Sbar.shape[2]
    r = hq // h
    c = int(chunk_size)
    n = -(-t // c)
    s = 1.0 / math.sqrt(d) if not scale else float(scale)
    pad = n * c - t
    Qf = torch.nn.functional.pad(Q.double(), (0, 0, 0, 0, 0, pad))
    g = None
    if log_G is not None:
        g = torch.nn.functional.pad(log_G.double(), (0, 0, 0, pad)).reshape(b, n, c, h).cumsum(2)
        g = g.repeat_interleave(r, dim=3)  # [b, n, c, hq]
    Qc = Qf.reshape(b, n, c, hq, d)
    if g is not None:
        Qc = Qc * torch.exp(g / deg).unsqueeze(-1)
    pq = phi(Qc * s, deg, d_tile)  # [b, n, c, hq, D]
    Sx = Sbar[:, :n].double().repeat_interleave(r, dim=2)  # [b, n, hq, D, d]
    sx = sbar[:, :n].double().repeat_interleave(r, dim=2)
    A = torch.einsum("bnchD,bnhDe->bnche", pq, Sx).reshape(b, n * c, hq, d)[:, :t]
    B = torch.einsum("bnchD,bnhD->bnch", pq, sx).reshape(b, n * c, hq)[:, :t]
    if O is None:
        return A / B.unsqueeze(-1)
    O, l, m = O.double(), l.double(), m.double()
    M = torch.maximum(m, torch.log(B.clamp_min(1e-300)))
    em, eM = torch.exp(m - M), torch.exp(-M)
    return (O * em.unsqueeze(-1) + A * eM.unsqueeze(-1)) / (l * em + B * eM).unsqueeze(-1)


def power_retention_varlen_reference(Q, K, V, log_G, cu_seqlens, **kwargs):
    """Packed variable-length sequences by definition: Q [1,t,hq,d], K, V [1,t,h,d], log_G [1,t,h] or None and
    offsets cu_seqlens [0, ..., t] (any integer sequence or 1-D tensor); each sequence run alone through
    power_retention_reference(**kwargs) (no initial state, Y only), the outputs concatenated along t."""
    offsets = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    parts = [power_retention_reference(Q[:, a:e], K[:, a:e], V[:, a:e], None if log_G is None else log_G[:, a:e],
                                       **kwargs) for a, e in zip(offsets[:-1], offsets[1:])]
    return torch.cat(parts, dim=1)
