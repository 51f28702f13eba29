"""Packed variable-length batches (`power_retention(..., cu_seqlens=...)`, docs/MATH.md section 1).

Sequences are packed along t of a batch of one, with cu_seqlens = [0, t_1, t_1 + t_2, ..., t] (flash-attn's
convention). Each sequence must see none of the tokens before it: no attention across a boundary and a
state that starts from zero. Both follow from the gate: with log gate L at the first token b of a sequence,
every weight that reaches across b carries the factor exp(L) (the intra-chunk weights exp(G_i - G_j) for
j < b <= i, and the state's decay exp(sum of log gates) past b), while no weight inside the sequence does
(G_i - G_b excludes g_b). So the packed op is the per-sequence op once log_G at each boundary is
BOUNDARY_LOG_GATE: exp(-60) ~ 1e-26 leaves every cross term below fp32 resolution of the in-sequence ones,
and |-60| keeps the chunk-local cumulative gates in fp32 resolution (a -inf or -1e4 would not: the sums
after it lose their small digits). The user's gate at a boundary multiplies a zero state in the
per-sequence computation, so its true gradient is 0, which torch.where gives it. One launch per kernel for
the whole packed batch, whatever the sequence lengths.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vidrial.core.errors import InputError

__all__ = ["BOUNDARY_LOG_GATE", "check_cu_seqlens", "packed_log_gates"]

BOUNDARY_LOG_GATE = -60.0


def check_cu_seqlens(cu_seqlens: Any, t: int) -> None:
    """Type, shape and (outside CUDA-graph capture and torch.compile: one device->host read for a CUDA tensor)
    values: strictly increasing from 0 to t."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise InputError("cu_seqlens", type(cu_seqlens).__name__ if not isinstance(cu_seqlens, torch.Tensor)
                         else f"shape {tuple(cu_seqlens.shape)}", "a 1-D integer torch.Tensor [sequences + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise InputError("cu_seqlens", f"dtype {cu_seqlens.dtype}", "torch.int32 or torch.int64")
    if cu_seqlens.numel() < 2:
        raise InputError("cu_seqlens", f"{cu_seqlens.numel()} entries", "at least 2: [0, ..., t]")
    if torch.compiler.is_compiling() or (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    v = cu_seqlens.tolist()
    if v[0] != 0:
        raise InputError("cu_seqlens", f"first entry {v[0]}", "0 (the offset of the first sequence)")
    if v[-1] != t:
        raise InputError("cu_seqlens", f"last entry {v[-1]}", f"the packed length t={t} (Q.shape[1])")
    bad = next((i for i in range(1, len(v)) if v[i] <= v[i - 1]), None)
    if bad is not None:
        raise InputError("cu_seqlens", f"entries {v[bad - 1]}, {v[bad]} at {bad - 1}, {bad}",
                         "strictly increasing offsets (sorted, no empty sequence)")


def packed_log_gates(Q: torch.Tensor, K: torch.Tensor, log_G: Optional[torch.Tensor], cu_seqlens: Any,
                     initial_state: Any, return_final_state: bool) -> torch.Tensor:
    """log_G for the packed batch: the given gates (zeros when None) with BOUNDARY_LOG_GATE at the first token
    of every sequence but the first. Q [1, t, hq, d], K [1, t, h, d]."""
    if not isinstance(Q, torch.Tensor) or Q.dim() != 4 or not isinstance(K, torch.Tensor) or K.dim() != 4:
        raise InputError("Q/K", "not 4-D tensors", "Q [1, t, hq, d] and K [1, t, h, d] with cu_seqlens")
    b, t, _, _ = Q.shape
    h = K.shape[2]
    if b != 1:
        raise InputError("Q", f"batch {b}", "batch 1 with cu_seqlens (the sequences are packed along t)")
    if initial_state is not None:
        raise InputError("initial_state", "a state", "None with cu_seqlens (every packed sequence starts empty)")
    if return_final_state:
        raise InputError("return_final_state", True, "False with cu_seqlens (per-sequence final states are not "
                                                     "returned yet; run those sequences alone)")
    check_cu_seqlens(cu_seqlens, t)
    starts = cu_seqlens[1:-1].to(device=Q.device, dtype=torch.long)
    boundary = torch.zeros(t, device=Q.device, dtype=torch.bool)
    boundary[starts] = True  # index_put: no host read
    base = log_G if log_G is not None else torch.zeros(b, t, h, device=Q.device, dtype=torch.float32)
    if isinstance(base, torch.Tensor) and base.dim() == 3 and base.shape[1] == t:
        return torch.where(boundary[None, :, None], torch.full((), BOUNDARY_LOG_GATE, device=Q.device), base)
    return base  # a malformed log_G: the op's own checks name it
