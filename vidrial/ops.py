"""Public op `power_retention` (training forward, differentiable; docs/MATH.md sections 1-4).

The semantics (padding, quadratic/chunked switch, final state) are vidrial.pipeline.forward's; this module
only chooses between the plain forward (no gradients: the kernels directly) and the custom op of
vidrial.autograd (gradients or torch.compile). No host synchronisation except the eager check that
log_G <= 0 (vidrial.pipeline.checks.check_log_G_values; skipped under CUDA-graph capture and torch.compile).
"""
from __future__ import annotations

from typing import Any

__all__ = ["power_retention"]


def _use_autograd(*tensors: Any) -> bool:
    """The differentiable path (custom ops + backward kernels) when an input requires grad, or under
    torch.compile (custom ops trace without graph breaks)."""
    import torch

    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)


def power_retention(Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, return_final_state=False, deg=2,
                    scale=None, chunk_size=None, switch_over_seq_len=None, d_tile=None, cu_seqlens=None):
    """Symmetric power retention (docs/MATH.md), forward, on the GPU with vidrial's kernels.

    Q [b,t,hq,d], K, V [b,t,h,d] (bf16 or fp16, same dtype, CUDA; d in 32/64/128; hq a multiple
    of h: query head i uses KV head i // (hq/h)); log_G [b,t,h] float32 per-step log gates (<= 0)
    or None; initial_state [b,h,D,d] + sum_of_keys [b,h,D] float32 (both or neither), with
    D = feature_dim(d, deg, d_tile); deg 2 or 4; scale None/0 = 1/sqrt(d); chunk_size None or a
    multiple of 16; switch_over_seq_len None (= chunk_size) or an int; d_tile None (default layout,
    sympow.default_d_tile) or a divisor of d. Returns Y [b,t,hq,d] in Q's dtype, or with
    return_final_state=True (Y, S_final, s_final) (see vidrial.pipeline.forward for when these are None).
    Gradients flow to Q, K, V, log_G, initial_state and sum_of_keys (vidrial.autograd).

    cu_seqlens: packed variable-length sequences (flash-attn's convention): b = 1 and an int32/int64 tensor
    [0, t_1, t_1 + t_2, ..., t] of offsets along t; each sequence is computed as if alone (no attention
    across a boundary, a state that starts empty), forward and backward, in one launch per kernel
    (vidrial.pipeline.varlen: the gate at each boundary). Not with initial_state or return_final_state.
    Checking the offsets reads them on the host (one sync for a CUDA tensor; skipped under torch.compile
    and CUDA-graph capture).
    """
    from vidrial.pipeline.forward import power_retention_forward

    if cu_seqlens is not None:
        from vidrial.pipeline.varlen import packed_log_gates

        log_G = packed_log_gates(Q, K, log_G, cu_seqlens, initial_state, return_final_state)

    if _use_autograd(Q, K, V, log_G, initial_state, sum_of_keys):
        from vidrial import autograd

        return autograd.power_retention(Q, K, V, log_G, initial_state, sum_of_keys, return_final_state, deg, scale,
                                        chunk_size, switch_over_seq_len, d_tile)
    return power_retention_forward(Q, K, V, log_G, initial_state, sum_of_keys, return_final_state, deg, scale,
                                   chunk_size, switch_over_seq_len, d_tile)
