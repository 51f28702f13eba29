"""Runs the rendered CUDA source of a kernel on the CPU (test helper, no GPU needed).

The source is compiled by g++ as C++20 with a small shim: every CUDA thread is a fiber on the
launching OS thread (tests/host_fibers.py), __syncthreads is a block-wide barrier, warp shuffles go
through a per-warp buffer and barrier, blocks run one after another (so the last-CTA counter logic,
the workspace layout and the launch arguments are exercised exactly as on the GPU, only without
concurrency between CTAs).
Shared memory is poisoned (0xFF bytes: NaN floats) before every block. Inline PTX in
templates/common/decode.cuh is replaced by plain loads under VIDRIAL_CPU_EMU.

Used by tests/test_decode_exec_cpu.py to prove the decode_step kernel's index math before any
GPU run. Skipped when no g++ with C++20 <barrier> is present.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from host_fibers import FIBERS, GXX_FLAGS, precompile, write_atomic

_SHIM = r"""
#pragma once
""" + FIBERS + r"""
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct dim3u { unsigned x, y, z; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
dim3u threadIdx, blockIdx;  // threadIdx: set by the fiber scheduler before each thread (re)starts
dim3u gridDim, blockDim;
struct EmuBlock {
  emu_fib::Barrier* block;
  std::vector<std::unique_ptr<emu_fib::Barrier>> warps;
  std::vector<std::vector<double>> shfl;
};
EmuBlock* emu_blk;
alignas(16) static unsigned char emu_smem[1 << 18];
inline void __syncthreads() { emu_blk->block->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#include <cstdio>
#include <cstdlib>
inline void emu_check_align(const void* p, unsigned n) {
  if (reinterpret_cast<std::uintptr_t>(p) % n) { std::fprintf(stderr, "misaligned %u-byte access %p\n", n, p); std::abort(); }
}
template <class T> inline T __ldg(const T* p) { emu_check_align(p, sizeof(T) >= 16 ? 16 : sizeof(T)); return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __logf(float x) { return std::log(x); }
inline float __expf(float x) { return std::exp(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T emu_shfl(T v, int src, bool keep) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  std::vector<double>& buf = emu_blk->shfl[w];
  buf[lane] = (double)v;
  emu_blk->warps[w]->arrive_and_wait();
  const T r = keep ? v : (T)buf[src & 31];
  emu_blk->warps[w]->arrive_and_wait();
  return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (threadIdx.x & 31) ^ o, false); }
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned o) {
  const int lane = threadIdx.x & 31;
  return emu_shfl(v, lane - (int)o, lane < (int)o);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned o) {
  const int lane = threadIdx.x & 31;
  return emu_shfl(v, lane + (int)o, lane + (int)o > 31);
}
"""

_BF16 = r"""
#pragma once
#include <cstring>
struct __nv_bfloat16 { unsigned short x; };
inline float __bfloat162float(__nv_bfloat16 h) { unsigned u = (unsigned)h.x << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(unsigned short)(u >> 16)};
}
"""

_FP16 = r"""
#pragma once
#include <cstring>
struct __half { unsigned short x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float f) { _Float16 h = (_Float16)f; __half r; std::memcpy(&r.x, &h, 2); return r; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
"""

_CTYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "i64": ctypes.c_longlong, "u32": ctypes.c_uint,
           "f32": ctypes.c_float}


def available() -> bool:
    gxx = shutil.which("g++")
    if not gxx:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "t.cpp"
        src.write_text("#include <barrier>\nint main(){std::barrier<> b(1); b.arrive_and_wait(); return 0;}\n")
        res = subprocess.run([gxx, "-std=c++20", "-pthread", str(src), "-o", str(Path(tmp) / "t")],
                             capture_output=True)
        return res.returncode == 0


_SHIM_FILES = (("emu.h", _SHIM), ("cuda_bf16.h", _BF16), ("cuda_fp16.h", _FP16))
# the headers' folder is named by their content: processes of another version of this file (a checkout
# running its tests at the same time) never include these headers, and a changed shim is never served
# by a library built against the old one
_SHIM_HASH = hashlib.sha256("\0".join(text for _, text in _SHIM_FILES).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    d = Path(os.environ.get("VIDRIAL_CPU_EXEC_DIR", Path(tempfile.gettempdir()) / "vidrial-cpu-exec"))
    (d / f"shim-{_SHIM_HASH}").mkdir(parents=True, exist_ok=True)
    for name, text in _SHIM_FILES:
        p = d / f"shim-{_SHIM_HASH}" / name
        if not p.exists() or p.read_text() != text:
            write_atomic(str(p), text)
    precompile(str(d / f"shim-{_SHIM_HASH}" / "emu.h"))
    return d


def _to_cpu_source(source: str, entry: str) -> str:
    src = source.replace("extern __shared__ __align__(16) unsigned char smem[];", "unsigned char* smem = emu_smem;")
    src = re.sub(r"\b__shared__\s+", "static ", src)
    m = re.search(re.escape(entry) + r"\((.*?)\)\s*\{", src, re.S)
    if not m:
        raise ValueError(f"cannot find the parameter list of {entry}")
    params = [p.strip() for p in m.group(1).split(",")]
    names = [re.findall(r"[A-Za-z_]\w*", p)[-1] for p in params]
    wrapper = f"""
extern "C" void emu_run(int gx, int gy, int nthreads, {', '.join(params)}) {{
  blockDim = dim3u{{(unsigned)nthreads, 1u, 1u}};
  gridDim = dim3u{{(unsigned)gx, (unsigned)gy, 1u}};
  const emu_fib::Stacks stacks(nthreads);
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {{
      std::memset(emu_smem, 0xff, sizeof(emu_smem));
      emu_fib::Barrier bar(nthreads);
      EmuBlock blk;
      blk.block = &bar;
      for (int w = 0; w < (nthreads + 31) / 32; ++w) {{
        blk.warps.emplace_back(new emu_fib::Barrier(32));
        blk.shfl.emplace_back(32, 0.0);
      }}
      blockIdx = dim3u{{(unsigned)bx, (unsigned)by, 0u}};
      emu_blk = &blk;
      auto body = [&](int) {{ {entry}({', '.join(names)}); }};
      emu_fib::run_block(stacks, nthreads, body, [](int t) {{ threadIdx = dim3u{{(unsigned)t, 0u, 0u}}; }});
    }}
}}
"""
    return '#define VIDRIAL_CPU_EMU 1\n#include "emu.h"\n' + src + wrapper


class CpuKernel:
    """A rendered kernel compiled for the CPU; call run(grid, block, args) like LaunchableKernel.launch."""

    def __init__(self, rendered, signature) -> None:
        d = _cache_dir()
        src = _to_cpu_source(rendered.source, rendered.entry)
        digest = hashlib.sha256((_SHIM_HASH + src).encode()).hexdigest()[:16]
        so = d / f"{rendered.entry}_{digest}.so"
        if not so.exists():
            cpp = d / f"{rendered.entry}_{digest}.cpp"
            write_atomic(str(cpp), src)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            res = subprocess.run(["g++", *GXX_FLAGS, "-shared", "-I", str(d / f"shim-{_SHIM_HASH}"), str(cpp),
                                  "-o", str(tmp)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"g++ failed on {cpp}:\n{res.stderr[-4000:]}")
            os.replace(tmp, so)
        self._lib = ctypes.CDLL(str(so))
        self._fn = self._lib.emu_run
        self._fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int] + [_CTYPES[s] for s in signature]
        self._fn.restype = None

    def run(self, grid, block, args) -> None:
        self._fn(int(grid[0]), int(grid[1]), int(block[0]), *args)
