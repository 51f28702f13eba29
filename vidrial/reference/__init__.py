"""vidrial.reference: the float64 definition of power retention (docs/MATH.md), in plain torch.

CPU-capable and differentiable: every kernel test compares with it, and users can check their own
runs against it. `forward` holds the math itself (power_retention_reference and its pieces);
`backward` mirrors each backward kernel's algorithm step by step (the tests compare each kernel with
its emulation; the tuner checks backward candidates with it).
"""
from vidrial.reference.forward import (
    DENOM_EPS,
    LOG_EPS,
    attention_reference,
    discumsum_reference,
    intra_chunk_attention_reference,
    phi,
    power_retention_inference_reference,
    power_retention_reference,
    power_retention_varlen_reference,
    update_state_reference,
)

__all__ = ["LOG_EPS", "DENOM_EPS", "phi", "update_state_reference", "discumsum_reference", "attention_reference",
           "intra_chunk_attention_reference", "power_retention_reference", "power_retention_inference_reference",
           "power_retention_varlen_reference"]
