"""Runs the backward CUDA templates on the CPU: the rendered source is compiled as C++ (g++ -std=c++20)
against a small shim (threads of a CTA = std::threads with a std::barrier for __syncthreads, shared
memory = one buffer per CTA, warp shuffles through shared memory, bf16/fp16 = float). CTAs run one
after the other. Slow, but it executes exactly the kernel's index math, so the CPU tests can compare
the kernels themselves with the float64 emulation (bwd_emulation.py) before any GPU run.

Only for the backward templates (they use nothing beyond the shim: no inline PTX, no MMA)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import torch

SHIM = r"""
#include <cmath>
#include <cstring>
#include <algorithm>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
using std::min; using std::max;
struct U3 { unsigned x = 0, y = 0, z = 0; };
thread_local U3 threadIdx, blockIdx;
U3 blockDim, gridDim;
thread_local std::barrier<>* g_bar = nullptr;
static float* g_shfl = nullptr;
static float* g_dyn_smem = nullptr;
void __syncthreads() { g_bar->arrive_and_wait(); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int tid = threadIdx.x;
  __syncthreads();
  g_shfl[tid] = v;
  __syncthreads();
  const float r = g_shfl[tid ^ o];
  return r;
}
using std::isfinite;
struct __nv_bfloat16 { unsigned short x; };   // storage type; arithmetic happens in float via to_f
typedef _Float16 __half;
inline float __bfloat162float(__nv_bfloat16 v) {
  unsigned u = ((unsigned)v.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline float __half2float(__half v) { return (float)v; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(x)
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#define VBWD_HOST_CHECK 1
inline void vbwd_check_align16(const void* p) {
  if (reinterpret_cast<std::uintptr_t>(p) & 15) { std::fprintf(stderr, "misaligned 16-byte load %p\n", p); std::abort(); }
}
inline void vbwd_check_align8(const void* p) {
  if (reinterpret_cast<std::uintptr_t>(p) & 7) { std::fprintf(stderr, "misaligned 8-byte load %p\n", p); std::abort(); }
}
static float* g_mma = nullptr;  // per-warp fragment exchange of the emulated mma.sync
inline float vbwd_tf32(float x) {  // cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero
  unsigned u; std::memcpy(&u, &x, 4); u = (u + 0x1000u) & 0xffffe000u; std::memcpy(&x, &u, 4); return x;
}
void __syncthreads();
inline void vbwd_host_mma_tf32(float (&c)[4], const float (&a)[4], const float (&b)[2]) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  float* buf = g_mma + w * 32 * 8;
  for (int i = 0; i < 4; ++i) buf[lane * 8 + i] = a[i];
  buf[lane * 8 + 4] = b[0]; buf[lane * 8 + 5] = b[1];
  __syncthreads();
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    A[g][t] = buf[l * 8 + 0]; A[g + 8][t] = buf[l * 8 + 1]; A[g][t + 4] = buf[l * 8 + 2]; A[g + 8][t + 4] = buf[l * 8 + 3];
    B[t][g] = buf[l * 8 + 4]; B[t + 4][g] = buf[l * 8 + 5];
  }
  __syncthreads();
  const int g = lane >> 2, t = lane & 3;
  for (int q = 0; q < 4; ++q) {
    const int m = g + (q >> 1) * 8, n = 2 * t + (q & 1);
    float acc = c[q];
    for (int k = 0; k < 8; ++k) acc += vbwd_tf32(A[m][k]) * vbwd_tf32(B[k][n]);
    c[q] = acc;
  }
}
struct Arg {
  void* p; long long i; double f;
  template <class T> operator T*() const { return (T*)p; }
  operator int() const { return (int)i; }
  operator float() const { return (float)f; }
};
"""

RUNNER = r"""
extern "C" void vidrial_host_launch(int gx, int gy, int threads, long long smem_bytes, const Arg* a) {
  gridDim.x = gx; gridDim.y = gy; blockDim.x = threads;
  const size_t smem_floats = smem_bytes / 4 + 16;
  float* smem_buf = static_cast<float*>(std::aligned_alloc(64, (smem_floats * 4 + 63) / 64 * 64));
  std::vector<float> shfl(threads), mma(threads * 8);
  g_dyn_smem = smem_buf; g_shfl = shfl.data(); g_mma = mma.data();
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      std::barrier<> bar(threads);
      std::memset(smem_buf, 0xff, smem_floats * 4);  // NaN garbage: catches reads before writes
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; g_bar = &bar;
          {{CALL}};
        });
      for (auto& th : ts) th.join();
    }
  std::free(smem_buf);
}
"""


def _host_source(cuda_source: str, entry: str, nargs: int) -> str:
    src = cuda_source
    src = re.sub(r"#include <cuda_(bf16|fp16)\.h>", "", src)
    src = src.replace("extern __shared__ __align__(16) float sm[];", "float* sm = g_dyn_smem;")
    src = re.sub(r"__shared__ float (\w+)\[([^\]]+)\];", r"static float \1[\2];", src)
    src = src.replace('extern "C" __global__', "")
    call = f"{entry}(" + ", ".join(f"a[{i}]" for i in range(nargs)) + ")"
    return SHIM + src + RUNNER.replace("{{CALL}}", call)


class _ArgC(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("i", ctypes.c_longlong), ("f", ctypes.c_double)]


_LIBS: dict[str, ctypes.CDLL] = {}


def host_kernel(rendered, signature):
    """A callable launch(grid, threads, smem_bytes, args) running `rendered` on the CPU."""
    nargs = len(signature)
    src = _host_source(rendered.source, rendered.entry, nargs)
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    lib = _LIBS.get(digest)
    if lib is None:
        d = os.path.join(tempfile.gettempdir(), "vidrial-host-emu")
        os.makedirs(d, exist_ok=True)
        so = os.path.join(d, f"{digest}.so")
        if not os.path.exists(so):
            cpp = os.path.join(d, f"{digest}.cpp")
            with open(cpp, "w") as f:
                f.write(src)
            tmp = so + f".{os.getpid()}"
            res = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", cpp, "-o", tmp],
                                 capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"g++ failed on {cpp}:\n{res.stderr[-4000:]}")
            os.replace(tmp, so)
        lib = ctypes.CDLL(so)
        _LIBS[digest] = lib

    def launch(grid, threads, smem_bytes, args):
        gx, gy = (grid, 1) if isinstance(grid, int) else grid[:2]
        arr = (_ArgC * nargs)()
        for k, (code, v) in enumerate(zip(signature, args)):
            if code == "ptr":
                if isinstance(v, torch.Tensor):
                    assert v.device.type == "cpu" and v.is_contiguous()
                    assert v.dtype in (torch.float32, torch.int32, torch.bfloat16, torch.float16)
                    arr[k].p = v.data_ptr()
                else:
                    arr[k].p = int(v) if v else None
            elif code == "f32":
                arr[k].f = float(v)
            else:
                arr[k].i = int(v)
        lib.vidrial_host_launch(gx, gy, threads, smem_bytes, arr)

    return launch


class HostLaunchable:
    """Stands in for LaunchableKernel: .launch(grid, block, args, device_index, stream) on the CPU."""

    def __init__(self, family, key, config):
        self.family, self.key, self.config = family, key, config
        sig = family.state_signature if getattr(key, "stage", None) == "state" else family.signature
        self._launch = host_kernel(family.render(key, config), sig)

    def launch(self, grid, block, args, device_index, stream):
        gx, gy = grid[0], grid[1]
        self._launch((gx, gy), block[0], self.family.dynamic_smem_bytes(self.key, self.config), args)


def install():
    """Route the backward launchers' CPU calls to the host emulation (returns an undo callable)."""
    from vidrial.kernels.power_retention import _bwd_util

    cache = {}

    def make(family, key, config):
        k = (family.name, key, config)
        if k not in cache:
            cache[k] = HostLaunchable(family, key, config)
        return cache[k]

    old = _bwd_util.HOST_LAUNCHER
    _bwd_util.HOST_LAUNCHER = make

    def undo():
        _bwd_util.HOST_LAUNCHER = old
    return undo


def available() -> bool:
    return shutil.which("g++") is not None
