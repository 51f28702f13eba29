"""The host emulations' CTA threads (tests/host_fibers.py: fibers on one OS thread) keep CUDA's
barrier semantics: __syncthreads orders shared memory across warps, a missing barrier shows up as the
NaN poison, warp shuffles exchange lanes, every CTA of a grid runs, and a barrier that can never
complete aborts with a message instead of hanging."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vidrial.core.render import RenderedKernel

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402

pytestmark = pytest.mark.skipif(not bwd_host_emu.available(), reason="g++ not found (host execution of the kernels)")

_ROTATE = r"""
extern "C" __global__ void fib_rotate(float* out, int sync) {
  extern __shared__ __align__(16) float sm[];
  const int t = threadIdx.x, n = blockDim.x;
  sm[t] = (float)(t + 1000 * blockIdx.x + 100000 * blockIdx.y);
  if (sync) __syncthreads();
  out[(blockIdx.y * gridDim.x + blockIdx.x) * n + t] = sm[(t + 1) % n];  // the next thread's (other warps' too)
}
"""

_SHUFFLE = r"""
extern "C" __global__ void fib_shuffle(float* out) {
  const int t = threadIdx.x;
  float v = (float)t;
  v = __shfl_xor_sync(0xffffffffu, v, 1);
  v = __shfl_down_sync(0xffffffffu, v, 2);  // lanes 30, 31 keep their own
  out[t] = v;
}
"""

_DEADLOCK = r"""
extern "C" __global__ void fib_deadlock(float* out) {
  if (threadIdx.x == 0) return;  // thread 0 never reaches the barrier
  __syncthreads();
  out[threadIdx.x] = 1.f;
}
"""


def _kernel(src: str, entry: str, signature):
    return bwd_host_emu.host_kernel(RenderedKernel(entry=entry, source=src, template="test"), signature)


def test_syncthreads_orders_shared_memory_across_warps_and_ctas():
    n, grid = 96, (3, 2)
    launch = _kernel(_ROTATE, "fib_rotate", ("ptr", "i32"))
    out = torch.full((grid[1], grid[0], n), float("nan"))
    launch(grid, n, n * 4, (out, 1))
    t = torch.arange(n)
    for by in range(grid[1]):
        for bx in range(grid[0]):
            assert torch.equal(out[by, bx], ((t + 1) % n + 1000 * bx + 100000 * by).float()), (bx, by)


def test_a_missing_barrier_reads_the_poison():
    n = 64
    launch = _kernel(_ROTATE, "fib_rotate", ("ptr", "i32"))
    out = torch.zeros(n)
    launch(1, n, n * 4, (out, 0))
    assert out[: n - 1].isnan().all(), out  # read before the next thread wrote: the NaN bytes of the poison


def test_warp_shuffles_exchange_lanes():
    n = 64
    launch = _kernel(_SHUFFLE, "fib_shuffle", ("ptr",))
    out = torch.full((n,), float("nan"))
    launch(1, n, 0, (out,))
    lane = torch.arange(n) % 32
    src = torch.where(lane + 2 < 32, torch.arange(n) + 2, torch.arange(n))
    assert torch.equal(out, (src ^ 1).float())


def test_a_barrier_that_never_completes_aborts_with_a_message():
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import bwd_host_emu, test_host_fibers_cpu as T; "
            "T._kernel(T._DEADLOCK, 'fib_deadlock', ('ptr',))(1, 64, 0, (torch.zeros(64),))")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "deadlock: 63 of 64 threads wait at barriers that never complete" in out.stderr, out.stderr[-2000:]
