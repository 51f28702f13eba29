"""Context parallelism: one sequence split along time across the ranks of a torch.distributed group.

Rank r holds the r-th contiguous segment of every sequence of the batch (Q, K, V, log_G [b, t_r, ...];
the segments may differ in length). Power retention's recurrence (docs/MATH.md section 3) carries
everything a later token needs in the state, so the ranks exchange states only, never keys or values:

1. each rank computes its segment's own state S_r, s_r (from a zero state, decayed to the segment's end)
   and its total log decay Lambda_r = sum of log_G over the segment ([b, h]);
2. one all_gather of (S_r, s_r, Lambda_r), packed into one vector, over the group (torch.distributed's
   all_gather; its backward is one all_reduce of the gradients: exactly one collective each way, in the
   same order on every rank, and every rank's output depends on the gathered states, so every rank runs
   the backward collective);
3. rank r forms the state entering its segment, the discounted sum over the earlier ranks (the discumsum
   of docs/MATH.md section 3 step 2, one step per rank):
       S_in(0) = initial_state (or none),  S_in(j+1) = exp(Lambda_j) S_in(j) + S_j
4. and runs the single-device op on its segment with initial_state = S_in(r).

Y on every rank equals the single-device op's Y on that segment; with return_final_state=True each rank
also gets the state at the end of its own segment (the last rank's is the sequence's final state).
Gradients flow to Q, K, V, log_G (and initial_state / sum_of_keys) of every rank through autograd.

Backends: "vidrial" (the GPU kernels; NCCL groups) and "reference" (vidrial.reference's float64 math on
any device; gloo groups on the CPU: the tests). Cost: step 1 on the "vidrial" backend runs the op with
return_final_state=True (its Y is not used), so a rank does the forward (and backward) twice; a
states-only op (update_state + discumsum and their backward kernels) would remove that.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vidrial.core.errors import InputError

__all__ = ["power_retention_context_parallel", "BACKENDS"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class Backend:
    """`forward`: power_retention's signature; `segment_state(Q, K, V, log_G, deg, scale, chunk_size, d_tile)`:
    the segment's state from a zero state, (S [b,h,D,d], s [b,h,D]), differentiable."""

    name: str
    forward: Callable[..., Any]
    segment_state: Callable[..., tuple[Tensor, Tensor]]


def _vidrial_forward(*args: Any, **kwargs: Any) -> Any:
    from vidrial.ops import power_retention

    return power_retention(*args, **kwargs)


def _vidrial_segment_state(Q, K, V, log_G, deg, scale, chunk_size, d_tile):
    _, S, s = _vidrial_forward(Q, K, V, log_G, return_final_state=True, deg=deg, scale=scale, chunk_size=chunk_size,
                               d_tile=d_tile)
    return S, s


def _reference_forward(*args: Any, **kwargs: Any) -> Any:
    from vidrial.reference.forward import power_retention_reference

    return power_retention_reference(*args, **kwargs)


def _reference_segment_state(Q, K, V, log_G, deg, scale, chunk_size, d_tile):
    from vidrial.kernels.power_retention.sympow import default_d_tile
    from vidrial.reference.forward import update_state_reference

    d_tile = default_d_tile(K.shape[-1], deg) if d_tile is None else d_tile
    S, s = update_state_reference(K, V, log_G, deg, d_tile, K.shape[1])  # one chunk: the whole segment
    return S[:, 0], s[:, 0]


BACKENDS = {
    "vidrial": Backend("vidrial", _vidrial_forward, _vidrial_segment_state),
    "reference": Backend("reference", _reference_forward, _reference_segment_state),
}


class _GatherStates(torch.autograd.Function):
    """all_gather of one vector per rank -> [world, n]; backward: all_reduce of the [world, n] gradient
    (each rank's use of every rank's vector), this rank's row."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def power_retention_context_parallel(Q: Tensor, K: Tensor, V: Tensor, log_G: Optional[Tensor] = None,
                                     initial_state: Optional[Tensor] = None, sum_of_keys: Optional[Tensor] = None,
                                     return_final_state: bool = False, *, deg: int = 2, scale: Optional[float] = None,
                                     chunk_size: Optional[int] = None, d_tile: Optional[int] = None,
                                     group: Any = None, backend: str = "vidrial") -> Any:
    """This rank's part of power retention over a sequence split along time across `group`'s ranks (see the
    module docstring). Q [b, t_r, hq, d], K, V [b, t_r, h, d], log_G [b, t_r, h] or None: this rank's segment
    (rank order = time order). initial_state [b, h, D, d] / sum_of_keys [b, h, D]: the state before the first
    rank's segment, the same on every rank (or None). Other arguments as vidrial.power_retention. Returns Y
    for this segment, or (Y, S_end, s_end) with the state at the end of this rank's segment. Every rank of the
    group must call it (a collective), and, for gradients, run the backward."""
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise InputError("backend", backend, f"one of {sorted(BACKENDS)}")
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("group", "no initialised torch.distributed process group",
                         "torch.distributed.init_process_group(...) on every rank first")
    if not isinstance(K, torch.Tensor) or K.dim() != 4:
        raise InputError("K", getattr(K, "shape", type(K).__name__), "a tensor [batch, time, kv_heads, head_dim]")
    if (initial_state is None) != (sum_of_keys is None):
        raise InputError("initial_state", "given without sum_of_keys" if initial_state is not None else None,
                         "initial_state and sum_of_keys together, or neither")
    impl = BACKENDS[backend]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b, _, h, _ = K.shape
    S_r, s_r = impl.segment_state(Q, K, V, log_G, deg, scale, chunk_size, d_tile)
    lam = log_G.sum(1) if log_G is not None else S_r.new_zeros(b, h)
    lam = lam.to(S_r.dtype)
    # one collective: (S_r, s_r, Lambda_r) of every rank
    sizes = (S_r.numel(), s_r.numel(), lam.numel())
    rows = _GatherStates.apply(torch.cat([S_r.reshape(-1), s_r.reshape(-1), lam.reshape(-1)]), group)
    S_all = rows[:, :sizes[0]].reshape(world, *S_r.shape)
    s_all = rows[:, sizes[0]:sizes[0] + sizes[1]].reshape(world, *s_r.shape)
    lam_all = rows[:, sizes[0] + sizes[1]:].reshape(world, *lam.shape)
    # the state entering this segment: S_in(j+1) = exp(Lambda_j) S_in(j) + S_j over the earlier ranks, as one
    # weighted sum over all ranks (weight 0 from this rank on: every rank's output uses the gathered rows,
    # so every rank takes part in the backward's collective)
    later = torch.arange(world, device=rows.device) >= rank  # [world]
    lam_m = lam_all.masked_fill(later.view(-1, 1, 1), 0.0)
    decay_after = lam_m.flip(0).cumsum(0).flip(0) - lam_m  # sum of Lambda_k over j < k < rank, [world, b, h]
    w = torch.exp(decay_after).masked_fill(later.view(-1, 1, 1), 0.0)
    S_in = (w[..., None, None] * S_all).sum(0)
    s_in = (w[..., None] * s_all).sum(0)
    if initial_state is not None:
        carried = torch.exp(lam_m.sum(0))  # the decay of every earlier segment
        S_in = S_in + carried[..., None, None] * initial_state.to(S_in.dtype)
        s_in = s_in + carried[..., None] * sum_of_keys.to(s_in.dtype)
        S_in, s_in = S_in.to(initial_state.dtype), s_in.to(sum_of_keys.dtype)
    return impl.forward(Q, K, V, log_G, initial_state=S_in, sum_of_keys=s_in, return_final_state=return_final_state,
                        deg=deg, scale=scale, chunk_size=chunk_size, d_tile=d_tile)
