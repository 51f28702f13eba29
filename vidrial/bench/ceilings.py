"""Device ceilings, measured in the same run as the benchmark (METHOD.md: "two numbers first").

* copy: a 1 GiB device-to-device copy, (bytes read + bytes written) / time.
* matmul: an 8192 x 8192 x 8192 bf16 matrix product through torch (randn inputs, never zeros),
  2*n^3 / time.

Both timed with vidrial.tuning.measure.time_cuda (CUDA events, L2 flush, warm-up, median).
"""
from __future__ import annotations

from typing import Any

COPY_BYTES = 1 << 30
MATMUL_N = 8192


def copy_bandwidth(nbytes: int = COPY_BYTES, **timing: Any) -> dict[str, Any]:
    import torch

    from vidrial.tuning.measure import time_cuda

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), **timing)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return {"what": f"device copy of {nbytes / 2**30:g} GiB, read+write bytes / time", "ms": t.median_ms,
            "bytes": moved, "bytes_per_s": moved / (t.median_ms * 1e-3), "timing": t.as_dict()}


def matmul_rate(n: int = MATMUL_N, **timing: Any) -> dict[str, Any]:
    import torch

    from vidrial.tuning.measure import time_cuda

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: torch.mm(a, b), **timing)
    f = 2.0 * n ** 3
    del a, b
    return {"what": f"bf16 {n}^3 matmul (torch.mm, randn)", "ms": t.median_ms, "flops": f,
            "flops_per_s": f / (t.median_ms * 1e-3), "timing": t.as_dict()}


def measure(**timing: Any) -> dict[str, Any]:
    """{"copy": {...}, "matmul": {...}}; a failure is recorded as {"error": ...}."""
    out: dict[str, Any] = {}
    for name, f in (("copy", copy_bandwidth), ("matmul", matmul_rate)):
        try:
            out[name] = f(**timing)
        except Exception as exc:  # the run goes on without that ceiling
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass
    return out


__all__ = ["copy_bandwidth", "matmul_rate", "measure"]
