"""The training forward (docs/MATH.md sections 1-3), with the `retention` package's semantics (1.0.7,
`retention.triton.power_retention`):

* t is padded with zeros (log_G with 0) to a multiple of chunk_size and the padding is dropped
  from Y. Padded keys are 0 (phi(0) = 0) and padded gates are 0 (no decay), so the final state
  Sbar_n is the state at the true end of the sequence.
* `switch_over_seq_len` defaults to chunk_size; the plain quadratic formula (intra-chunk attention
  kernel over the whole sequence) runs when chunk_size is None or the padded t <= switch_over_seq_len,
  unless an initial_state is given (then the chunked path runs; with chunk_size None as one chunk of
  length t).
* return_final_state=True returns (Y, S_final [b,h,D,d], s_final [b,h,D]) (fp32, unscaled, in the
  d_tile layout); on the quadratic path with padded t < switch_over_seq_len the state is
  (None, None) as in retention, at t == switch_over_seq_len it is computed.

Chunked path (`pieces`): update_state -> discumsum (bf16 copy of the states for the MMA, fp32 sum of
keys, fp32 final state only) -> intra_chunk_attention (merge mode: O, l, m) -> query_state (merge).
`pieces` is the body of the custom op vidrial::power_retention_fwd too, so the no-grad and the
differentiable forward are one computation. All launches go on the current stream; no host
synchronisation except checks.check_log_G_values (eager calls only).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from vidrial.kernels.power_retention.sympow import default_d_tile
from vidrial.pipeline import checks

__all__ = ["power_retention_forward", "pieces", "route", "pad_time", "chunked_states", "placeholder", "Pieces"]

Tensor = torch.Tensor
# (Y, O, l, m, Sbar16, sbar, S_final, s_final): the forward's outputs and what its backward needs
Pieces = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
Result = Union[Tensor, tuple[Tensor, Optional[Tensor], Optional[Tensor]]]

QUADRATIC, QUADRATIC_STATE, CHUNKED = "quadratic", "quadratic+state", "chunked"
_STATE_CHUNK = 64  # chunk of the quadratic path's separate state pass (the state does not depend on it)


def placeholder(device: torch.device) -> Tensor:
    """A placeholder for an output that does not apply (custom ops return tensors, not None)."""
    return torch.empty((0,), device=device, dtype=torch.float32)


def pad_time(x: Tensor, pad: int) -> Tensor:
    """x [b, t, ...] (3 or 4 dims) with `pad` zero steps appended to the time dim."""
    if pad == 0:
        return x
    if x.dim() == 4:
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    return torch.nn.functional.pad(x, (0, 0, 0, pad))


def chunked_states(K: Tensor, V: Tensor, log_G: Optional[Tensor], deg: int, d_tile: int, c: int,
                   initial_state: Optional[Tensor], sum_of_keys: Optional[Tensor], *, want_copy: bool,
                   want_final: bool) -> dict:
    """update_state -> discumsum (t a multiple of c). Returns discumsum_forward's dict (Sbar16, sbar, S_final)."""
    from vidrial.kernels.power_retention.discumsum import discumsum_forward
    from vidrial.kernels.power_retention.update_state import update_state

    b, t, h, _ = K.shape
    n = t // c
    S, s = update_state(K, V, log_G, deg=deg, d_tile=d_tile, chunk_size=c)
    L = log_G.view(b, n, c, h).sum(2) if log_G is not None else None
    return discumsum_forward(S, s, L, initial_state, sum_of_keys, fp32_states=False, bf16_copy=want_copy,
                             final_state=want_final)


def pieces(Q: Tensor, K: Tensor, V: Tensor, log_G: Optional[Tensor], initial_state: Optional[Tensor],
           sum_of_keys: Optional[Tensor], deg: int, scale: float, chunk_size: int, d_tile: int,
           want_final: bool) -> Pieces:
    """(Y, O, l, m, Sbar16, sbar, S_final, s_final). chunk_size 0: quadratic (O, l, m of one causal block;
    the states are empty); else t must be a multiple of chunk_size. S_final/s_final are empty unless want_final."""
    from vidrial.kernels.power_retention.intra_chunk_attention import intra_chunk_attention
    from vidrial.kernels.power_retention.query_state import query_state

    dev = Q.device
    if chunk_size == 0:
        O, l, m = intra_chunk_attention(Q, K, V, log_G, deg=deg, scale=scale, chunk_size=None, normalize=False)
        Y = (O / l.unsqueeze(-1)).to(Q.dtype)
        return Y, O, l, m, placeholder(dev), placeholder(dev), placeholder(dev), placeholder(dev)
    c = chunk_size
    n = K.shape[1] // c
    st = chunked_states(K, V, log_G, deg, d_tile, c, initial_state, sum_of_keys, want_copy=True,
                        want_final=want_final)
    O, l, m = intra_chunk_attention(Q, K, V, log_G, deg=deg, scale=scale, chunk_size=c, normalize=False)
    Y = query_state(Q, st["Sbar16"], st["sbar"], O, l, m, log_G, deg=deg, d_tile=d_tile, scale=scale, chunk_size=c,
                    zero_first_state=initial_state is None)
    if want_final:
        S_final, s_final = st["S_final"], st["sbar"][:, n].clone()
    else:
        S_final, s_final = placeholder(dev), placeholder(dev)
    return Y, O, l, m, st["Sbar16"], st["sbar"], S_final, s_final


def route(t: int, chunk_size: Optional[int], switch_over_seq_len: Optional[int], has_state: bool,
          want_state: bool, differentiable: bool) -> tuple[str, int, int]:
    """(path, chunk, time padding). QUADRATIC: Y only (a returned state is (None, None));
    QUADRATIC_STATE (no grad only): quadratic Y + a separate state pass in chunks of `chunk`;
    CHUNKED: the chunked pieces (the differentiable path takes it whenever a state is returned)."""
    t_pad = t if chunk_size is None else -(-t // chunk_size) * chunk_size
    switch = switch_over_seq_len if switch_over_seq_len is not None else chunk_size
    if (switch is None or t_pad <= switch) and not has_state:
        if not want_state or (switch is not None and t_pad < switch):
            return QUADRATIC, 0, 0
        if not differentiable:
            c = chunk_size if chunk_size is not None else _STATE_CHUNK
            return QUADRATIC_STATE, c, -(-t // c) * c - t
    c = chunk_size if chunk_size is not None else -(-t // 16) * 16  # None: one chunk of the 16-padded sequence
    return CHUNKED, c, -(-t // c) * c - t


def _feature_dim(d: int, deg: int, d_tile: int) -> int:
    """sympow.feature_dim without its functools cache, which torch.compile (dynamo) cannot trace."""
    return math.comb(d // d_tile + deg - 1, deg) * d_tile**deg


def power_retention_forward(Q: Tensor, K: Tensor, V: Tensor, log_G: Optional[Tensor] = None,
                            initial_state: Optional[Tensor] = None, sum_of_keys: Optional[Tensor] = None,
                            return_final_state: bool = False, deg: int = 2, scale: Optional[float] = None,
                            chunk_size: Optional[int] = None, switch_over_seq_len: Optional[int] = None,
                            d_tile: Optional[int] = None, *, op: Optional[Callable[..., Pieces]] = None) -> Result:
    """vidrial.power_retention after dispatch: checks, defaults, routing, padding, then the kernels.

    op None: no gradients, the kernels directly; the quadratic path normalises inside the kernel (no
    O, l, m to keep) and computes a returned state by a separate update_state + discumsum pass.
    op: the custom op (torch.ops.vidrial.power_retention_fwd, with the same arguments as `pieces`),
    whose autograd formula gives the gradients; a returned state comes from the chunked path."""
    b, t, hq, h, d = checks.check_inputs(Q, K, V, log_G, deg, d_tile, chunk_size, switch_over_seq_len, scale)
    if d_tile is None:
        d_tile = default_d_tile(d, deg)
    checks.check_state(initial_state, sum_of_keys, b, h, _feature_dim(d, deg, d_tile), d, deg, d_tile, Q.device)
    scale = 1.0 / math.sqrt(d) if not scale else float(scale)
    if t == 0 or b == 0:  # nothing to compute or differentiate
        Y = Q.new_empty(Q.shape)
        if not return_final_state:
            return Y
        with torch.no_grad():
            return (Y, initial_state.clone(), sum_of_keys.clone()) if initial_state is not None else (Y, None, None)

    path, c, pad = route(t, chunk_size, switch_over_seq_len, initial_state is not None, bool(return_final_state),
                         op is not None)
    if path != CHUNKED:
        if op is not None:
            Y = op(Q, K, V, log_G, None, None, deg, scale, 0, d_tile, False)[0]
        else:
            from vidrial.kernels.power_retention.intra_chunk_attention import intra_chunk_attention

            Y = intra_chunk_attention(Q, K, V, log_G, deg=deg, scale=scale, chunk_size=None, normalize=True)
        if not return_final_state:
            return Y
        if path == QUADRATIC:
            return Y, None, None
        lg = pad_time(log_G, pad) if log_G is not None else None
        st = chunked_states(pad_time(K, pad), pad_time(V, pad), lg, deg, d_tile, c, None, None, want_copy=False,
                            want_final=True)
        return Y, st["S_final"], st["sbar"][:, (t + pad) // c].contiguous()

    Qp, Kp, Vp = pad_time(Q, pad), pad_time(K, pad), pad_time(V, pad)
    lg = pad_time(log_G, pad) if log_G is not None else None
    out = (op or pieces)(Qp, Kp, Vp, lg, initial_state, sum_of_keys, deg, scale, c, d_tile, bool(return_final_state))
    Y = out[0][:, :t] if pad else out[0]
    if return_final_state:
        return Y, out[6], out[7]
    return Y
