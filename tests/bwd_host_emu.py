"""Runs CUDA templates on the CPU: the rendered source is compiled as C++ (g++ -std=c++20) against a
small shim (threads of a CTA = fibers on one OS thread, tests/host_fibers.py, with a barrier for
__syncthreads, shared memory = one buffer per CTA poisoned with NaN bytes, bf16/fp16 = storage types
converted through float). CTAs run one after the other. Slow, but it executes exactly the kernel's index
math, so the CPU tests can compare the kernels themselves with float64 references before any GPU run.

Warp-collective operations (shuffles, mma.sync, ldmatrix) exchange values through a per-warp buffer
between two per-warp barriers, so warps may diverge (skip work) as on the GPU; __syncwarp is that barrier. The inline PTX of
templates/common/ptx.cuh is replaced by host versions (PTX_EMU, in its namespace vd) written from
the PTX ISA's documented semantics:
  * mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} (fragments: g = lane/4, t = lane%4; A regs
    (g,2t) (g+8,2t) (g,2t+8) (g+8,2t+8), low half = lower column; B regs (k=2t,n=g) (k=2t+8,n=g); C/D
    (g,2t..2t+1) (g+8,2t..2t+1)); exact products, sum in double, rounded to fp32 once;
  * mma.sync m16n8k8 tf32 (bwd_prims.cuh's host hook), operands rounded with cvt.rna.tf32;
  * ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (lanes 8i..8i+7 give the row addresses of matrix
    i; thread T gets row T/4, elements 2(T%4), 2(T%4)+1, or with .trans elements (2(T%4), T/4) and
    (2(T%4)+1, T/4)); 16-byte aligned rows inside the shared allocation, else abort;
  * cp.async (16 bytes .cg with zero fill): the destination reads NaN from the issue on, the copy is
    queued per thread and performed at the cp.async.wait_group that covers its commit group (a missing
    wait, or a refill of a buffer still being read, shows up as NaN);
  * cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 (round to nearest even), ex2.approx.ftz (denormals -> 0).
The few inline-PTX statements outside those headers (common/wgmma_chain.cuh, kernel bodies: ld.shared.u32,
ld/st.shared.v2.f32, prmt.b32) are rewritten to host calls (_KERNEL_ASM); __shfl_sync is in the shim.

common/wgmma.cuh is replaced by WGMMA_EMU (Hopper warpgroup MMA, wgmma.mma_async m64nNk16 f32.{bf16,f16},
A from registers; one emu_fib::Barrier(128) per warpgroup, made per CTA like the warp barriers):
  * issue (wgmma_rs_{bf16,f16}<TRANS_B>, N deduced; only N the device header generated compile): the
    warpgroup meets at its barrier (all four warps must issue), each thread posts a[4] (mma.sync's A
    fragment, warp w = rows 16w..16w+15), desc, scale_d, N; all must agree on desc/scale_d/N/type/TRANS_B,
    and the descriptor's layout must be emulated (else abort with a message). The thread queues an op in
    its open group: a copy of the A rows its D elements use (g, g+8 of its warp: the registers are read at
    the issue, so an A register reused before the wait is not caught), the descriptor, scale_d, a pointer
    to its d array. d is then NaN (undefined until the wait);
  * chains: ops run in issue order; an op's C (scale_d = 1) is d's value at the issue when no earlier
    pending op of the thread writes the same d, else that op's result, handed over when it is performed
    (d stays NaN until the last pending op on it is done). Rounding: exact products summed in double with
    C, one fp32 rounding per instruction;
  * wgmma_commit closes the open group (possibly empty); wgmma_wait<N> performs, in order, the committed
    groups older than the N newest: B is read from shared memory at that moment and the thread writes its
    own D elements d[4nb + 2r + e] = (row 16w + g + 8r, col 8nb + 2t + e). So accumulators read before
    their wait are NaN, and a B tile overwritten (or cp.async-poisoned) before the wait that covers its
    reader gives wrong results, as it may on the GPU;
  * B element (k, n) through the descriptor (start, LBO, SBO = bits 0-13, 16-29, 32-45, each << 4;
    swizzle = bits 62-63; 2-byte elements): 128B swizzle K-major (TRANS_B = 0): start + (n/8) SBO +
    (n%8) 128 + 2k (LBO unused); 128B swizzle MN-major (TRANS_B = 1): start + (n/64) LBO + 2 (n%64) +
    (k/8) SBO + (k%8) 128; both swizzled on the address, bits 4-6 ^= bits 7-9 (1024-byte atoms, base
    offset 0: the start must lie in an atom's row 0); no swizzle K-major (core matrices of 8 rows x 16
    bytes): start + (n/8) SBO + (n%8) 16 + (k/8) LBO + 2 (k%8). Other modes (64B, 32B, MN-major without
    swizzle), a nonzero base offset or reserved bits abort;
  * wgmma_fence, fence_proxy_async, fence_operands: no-ops (each thread reads its copies at the wait, and
    shared memory has one proxy here); smem_desc packs as on the device. Shared addresses are offsets
    from 0, so the kernels' (smem_u32(smem_raw) + 1023) & ~1023 base is 0.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import torch

from host_fibers import FIBERS, GXX_FLAGS, precompile, write_atomic

SHIM = r"""
#include <cmath>
#include <cstring>
#include <algorithm>
#include <vector>
using std::min; using std::max;
struct U3 { unsigned x = 0, y = 0, z = 0; };
U3 threadIdx, blockIdx;  // threadIdx: set by the fiber scheduler before each thread (re)starts
U3 blockDim, gridDim;
emu_fib::Barrier* g_bar = nullptr;
static float* g_dyn_smem = nullptr;
static long long g_smem_bytes = 0;
void __syncthreads() { g_bar->arrive_and_wait(); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
// warp collectives: each lane posts up to 8 words, the warp meets at a barrier, reads, meets again
constexpr int WARP_WORDS = 8;
static std::vector<emu_fib::Barrier*>* g_warp_bars = nullptr;
static unsigned* g_warp_buf = nullptr;  // [warps][32][WARP_WORDS]
inline void warp_sync() { (*g_warp_bars)[threadIdx.x >> 5]->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { warp_sync(); }  // orders shared memory between a warp's lanes
inline unsigned* warp_slot(int lane) { return g_warp_buf + (((threadIdx.x >> 5) * 32) + lane) * WARP_WORDS; }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31;
  warp_slot(lane)[0] = __float_as_uint(v);
  warp_sync();
  const float r = __uint_as_float(warp_slot(lane ^ o)[0]);
  warp_sync();
  return r;
}
inline float __shfl_down_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31;
  warp_slot(lane)[0] = __float_as_uint(v);
  warp_sync();
  const float r = __uint_as_float(warp_slot((lane & 31) + o < 32 ? lane + o : lane)[0]);
  warp_sync();
  return r;
}
inline float __shfl_up_sync(unsigned, float v, int o) {  // lanes below o keep their own value
  const int lane = threadIdx.x & 31;
  warp_slot(lane)[0] = __float_as_uint(v);
  warp_sync();
  const float r = __uint_as_float(warp_slot(lane >= o ? lane - o : lane)[0]);
  warp_sync();
  return r;
}
inline float __shfl_sync(unsigned, float v, int src) {  // lane src (mod 32)'s value
  const int lane = threadIdx.x & 31;
  warp_slot(lane)[0] = __float_as_uint(v);
  warp_sync();
  const float r = __uint_as_float(warp_slot(src & 31)[0]);
  warp_sync();
  return r;
}
inline bool __any_sync(unsigned, bool p) {
  const int lane = threadIdx.x & 31;
  warp_slot(lane)[0] = p;
  warp_sync();
  bool r = false;
  for (int l = 0; l < 32; ++l) r = r || warp_slot(l)[0];
  warp_sync();
  return r;
}
using std::isfinite;
struct __nv_bfloat16 { unsigned short x; };   // storage type; arithmetic happens in float via to_f
typedef _Float16 __half;
inline __half __float2half_rn(float f) { return (__half)f; }
inline __half __ushort_as_half(unsigned short u) { __half h; std::memcpy(&h, &u, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 v) {
  unsigned u = ((unsigned)v.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline float __half2float(__half v) { return (float)v; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even (finite inputs), as cvt.rn.bf16.f32
  unsigned u; std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(unsigned short)(u >> 16)};
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(x)
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

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
inline float vbwd_tf32(float x) {  // cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero
  unsigned u; std::memcpy(&u, &x, 4); u = (u + 0x1000u) & 0xffffe000u; std::memcpy(&x, &u, 4); return x;
}
// mma.sync m16n8k8 tf32 (bwd_prims.cuh): a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]; b = B[t][g], B[t+4][g]
inline void vbwd_host_mma_tf32(float (&c)[4], const float (&a)[4], const float (&b)[2]) {
  const int lane = threadIdx.x & 31;
  unsigned* mine = warp_slot(lane);
  for (int i = 0; i < 4; ++i) mine[i] = __float_as_uint(a[i]);
  mine[4] = __float_as_uint(b[0]); mine[5] = __float_as_uint(b[1]);
  warp_sync();
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const unsigned* w = warp_slot(l);
    const int g = l >> 2, t = l & 3;
    A[g][t] = __uint_as_float(w[0]); A[g + 8][t] = __uint_as_float(w[1]);
    A[g][t + 4] = __uint_as_float(w[2]); A[g + 8][t + 4] = __uint_as_float(w[3]);
    B[t][g] = __uint_as_float(w[4]); B[t + 4][g] = __uint_as_float(w[5]);
  }
  warp_sync();
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
  operator long long() const { return i; }
  operator float() const { return (float)f; }
};
"""

PTX_EMU = r"""
// ---- host versions of common/ptx.cuh (PTX ISA semantics) ----
#include <deque>
#include <cfloat>
namespace vd {
typedef unsigned int u32;
typedef unsigned long long u64;
inline unsigned char* emu_smem_ptr(u32 addr, int bytes, int align) {
  if ((long long)addr + bytes > g_smem_bytes || addr % align) {
    std::fprintf(stderr, "bad shared address %u (%d bytes, align %d, allocation %lld)\n", addr, bytes, align,
                 g_smem_bytes);
    std::abort();
  }
  return reinterpret_cast<unsigned char*>(g_dyn_smem) + addr;
}
inline u32 smem_u32(const void* p) {
  const long long off = (const unsigned char*)p - (const unsigned char*)g_dyn_smem;
  if (off < 0 || off > g_smem_bytes) { std::fprintf(stderr, "smem_u32 of a non-shared pointer\n"); std::abort(); }
  return (u32)off;
}
inline float emu_bf16(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
inline float emu_f16(unsigned short h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
inline unsigned short emu_to_bf16(float x) {  // round to nearest even
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}
inline unsigned short emu_to_f16(float x) {
  _Float16 h = (_Float16)x; unsigned short r; std::memcpy(&r, &h, 2); return r;
}
template <bool BF16>
inline void emu_mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  const int lane = threadIdx.x & 31;
  unsigned* mine = warp_slot(lane);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0; mine[5] = b1;
  warp_sync();
  double A[16][16], B[16][8];
  auto cv = [](unsigned short h) { return (double)(BF16 ? emu_bf16(h) : emu_f16(h)); };
  for (int l = 0; l < 32; ++l) {
    const unsigned* w = warp_slot(l);
    const int g = l >> 2, t = l & 3;
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[ar[i]][ac[i]] = cv(w[i] & 0xffffu);
      A[ar[i]][ac[i] + 1] = cv(w[i] >> 16);
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = cv(w[4 + i] & 0xffffu);
      B[2 * t + 8 * i + 1][g] = cv(w[4 + i] >> 16);
    }
  }
  warp_sync();
  const int g = lane >> 2, t = lane & 3;
  for (int q = 0; q < 4; ++q) {
    const int m = g + (q >> 1) * 8, n = 2 * t + (q & 1);
    double acc = c[q];
    for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
    c[q] = (float)acc;
  }
}
inline void mma_16816_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma_16816<true>(c, a, b0, b1); }
inline void mma_16816_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma_16816<false>(c, a, b0, b1); }
template <bool TRANS>
inline void emu_ldmatrix_x4(u32 (&r)[4], u32 addr) {
  const int lane = threadIdx.x & 31;
  warp_slot(lane)[0] = addr;
  warp_sync();
  for (int i = 0; i < 4; ++i) {
    if (TRANS) {  // (row 2(T%4), col T/4) low, (row 2(T%4)+1, col T/4) high
      unsigned short lo, hi;
      std::memcpy(&lo, emu_smem_ptr(warp_slot(8 * i + 2 * (lane & 3))[0], 16, 16) + 2 * (lane >> 2), 2);
      std::memcpy(&hi, emu_smem_ptr(warp_slot(8 * i + 2 * (lane & 3) + 1)[0], 16, 16) + 2 * (lane >> 2), 2);
      r[i] = (u32)lo | ((u32)hi << 16);
    } else {      // row T/4, elements 2(T%4), 2(T%4)+1
      std::memcpy(&r[i], emu_smem_ptr(warp_slot(8 * i + (lane >> 2))[0], 16, 16) + 4 * (lane & 3), 4);
    }
  }
  warp_sync();
}
inline void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  u32 r[4]; emu_ldmatrix_x4<false>(r, addr); r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
inline void ldmatrix_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
  u32 r[4]; emu_ldmatrix_x4<true>(r, addr); r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
// cp.async: queued per thread, performed by the wait_group that covers the copy's commit group
struct EmuCopy { u32 dst; const void* src; int src_bytes; int size; };
#define VBWD_PTX_EMU 1
static std::vector<std::vector<EmuCopy>> emu_open_group_of;              // [threadIdx.x], reset per CTA
static std::vector<std::deque<std::vector<EmuCopy>>> emu_groups_of;      // [threadIdx.x], reset per CTA
#define emu_open_group (emu_open_group_of[threadIdx.x])
#define emu_groups (emu_groups_of[threadIdx.x])
inline void emu_cp_async(u32 dst, const void* src, int src_bytes, int size) {
  std::memset(emu_smem_ptr(dst, size, size), 0xff, size);  // in flight: NaN until the wait (catches early reuse)
  if (src_bytes && (reinterpret_cast<std::uintptr_t>(src) & (size - 1))) {
    std::fprintf(stderr, "misaligned cp.async source %p\n", src);
    std::abort();
  }
  emu_open_group.push_back({dst, src, src_bytes, size});
}
inline void cp_async_16_zfill(u32 dst, const void* src, int src_bytes) { emu_cp_async(dst, src, src_bytes, 16); }
inline void cp_async_16(u32 dst, const void* src) { emu_cp_async(dst, src, 16, 16); }
inline void cp_async_4_zfill(u32 dst, const void* src, int src_bytes) { emu_cp_async(dst, src, src_bytes, 4); }
inline void cp_async_commit() { emu_groups.push_back(std::move(emu_open_group)); emu_open_group.clear(); }
template <int N>
inline void cp_async_wait() {
  while ((int)emu_groups.size() > N) {
    for (const EmuCopy& cp : emu_groups.front()) {
      unsigned char* d = emu_smem_ptr(cp.dst, cp.size, cp.size);
      std::memset(d, 0, cp.size);
      if (cp.src_bytes) std::memcpy(d, cp.src, cp.src_bytes);
    }
    emu_groups.pop_front();
  }
}
inline u32 pack_bf16(float lo, float hi) { return (u32)emu_to_bf16(lo) | ((u32)emu_to_bf16(hi) << 16); }
// shared loads/stores on 32-bit shared addresses (vector accesses must be naturally aligned)
inline uint4 lds128(u32 addr) { uint4 v; std::memcpy(&v, emu_smem_ptr(addr, 16, 16), 16); return v; }
inline uint2 lds64(u32 addr) { uint2 v; std::memcpy(&v, emu_smem_ptr(addr, 8, 8), 8); return v; }
inline float4 lds128f(u32 addr) { float4 v; std::memcpy(&v, emu_smem_ptr(addr, 16, 16), 16); return v; }
inline void sts128(u32 addr, u32 a, u32 b, u32 c, u32 d) {
  const u32 v[4] = {a, b, c, d}; std::memcpy(emu_smem_ptr(addr, 16, 16), v, 16);
}
inline void sts64(u32 addr, u32 a, u32 b) { const u32 v[2] = {a, b}; std::memcpy(emu_smem_ptr(addr, 8, 8), v, 8); }
// packed products: exact in float (8x8 or 11x11 significant bits), rounded once like fma.rn / mul.rn
inline u32 mul2_bf16(u32 a, u32 b) {
  return pack_bf16(emu_bf16(a & 0xffffu) * emu_bf16(b & 0xffffu), emu_bf16(a >> 16) * emu_bf16(b >> 16));
}
inline u32 pack_f16(float lo, float hi) { return (u32)emu_to_f16(lo) | ((u32)emu_to_f16(hi) << 16); }
inline float2 unpack_f16(u32 v) { return make_float2(emu_f16(v & 0xffffu), emu_f16(v >> 16)); }
inline u32 mul2_f16(u32 a, u32 b) {
  return pack_f16(emu_f16(a & 0xffffu) * emu_f16(b & 0xffffu), emu_f16(a >> 16) * emu_f16(b >> 16));
}
inline float ex2_approx(float x) {  // ex2.approx.ftz: denormal results flush to +0
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.f : y;
}
// the inline PTX of kernel bodies and of the other headers (_KERNEL_ASM rewrites each statement to one of these)
inline u32 emu_ld_shared_u32(u32 addr) { u32 v; std::memcpy(&v, emu_smem_ptr(addr, 4, 4), 4); return v; }
inline void emu_ld_shared_v2f32(float& x, float& y, u32 addr) {
  float v[2]; std::memcpy(v, emu_smem_ptr(addr, 8, 8), 8); x = v[0]; y = v[1];
}
inline void emu_st_shared_v2f32(u32 addr, float x, float y) {
  const float v[2] = {x, y}; std::memcpy(emu_smem_ptr(addr, 8, 8), v, 8);
}
inline u32 emu_prmt(u32 a, u32 b, u32 sel) {  // prmt.b32 (default mode): byte i of d = byte sel[4i+2:4i] of {b, a}
  const unsigned long long x = ((unsigned long long)b << 32) | a;
  u32 d = 0;
  for (int i = 0; i < 4; ++i) {
    const u32 s = (sel >> (4 * i)) & 0xfu;
    u32 byte = (u32)(x >> (8 * (s & 7))) & 0xffu;
    if (s & 8) byte = (byte & 0x80u) ? 0xffu : 0u;  // msb of the selector: replicate the byte's sign
    d |= byte << (8 * i);
  }
  return d;
}
}  // namespace vd
// ---- end of the host versions ----
"""

# The header whose inline PTX PTX_EMU replaces (from the header's banner to its include guard's #endif).
_PTX_HEADERS = re.compile(r"// ---- common/ptx\.cuh:.*?#endif  // VIDRIAL_COMMON_PTX_CUH", re.S)

WGMMA_EMU = r"""
// ---- host versions of common/wgmma.cuh (PTX ISA semantics; needs the host common/ptx.cuh above) ----
#define VBWD_WGMMA_EMU 1
namespace vd {
enum : u32 { SWIZZLE_NONE = 0, SWIZZLE_128B = 1, SWIZZLE_64B = 2, SWIZZLE_32B = 3 };
inline u64 smem_desc(u32 addr, u32 leading_bytes, u32 stride_bytes, u32 swizzle) {  // the device's bit packing
  return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(leading_bytes >> 4) << 16) | ((u64)(stride_bytes >> 4) << 32) |
         ((u64)swizzle << 62);
}
// register / proxy ordering only: nothing to do where every thread reads its own copies at the wait
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
template <int N> inline void fence_operands(float (&)[N]) {}
// Specialised by the kernel's source for each N of its wgmma_ns (where the device header was): a wgmma
// of an N the device source would not have generated does not compile here either.
template <int N> struct EmuWgmmaRenderedN;

struct EmuWgOp {
  float a[2][16];          // A rows g and g+8 of the thread's warp (the only rows its D elements use)
  u64 desc;
  int scale_d, nh, trans;
  bool bf16;
  float* d;                // the thread's accumulator array (nh floats)
  bool has_next = false;   // a later pending op of this thread writes the same d: the result is its C
  std::vector<float> c;    // C (scale_d = 1): d at the issue, or the previous pending op's result
};
struct EmuWgState { std::deque<EmuWgOp> ops; std::deque<int> groups; int open = 0; };  // ops in issue order
static std::vector<EmuWgState> emu_wg_of;                      // [threadIdx.x], reset per CTA
static std::vector<emu_fib::Barrier*>* emu_wg_bars = nullptr;  // one per warpgroup, made per CTA
static std::vector<u32> emu_wg_buf;                            // [threadIdx.x][8]: what a thread posts at an issue

[[noreturn]] inline void emu_wg_fail(const char* what, u64 desc = 0) {
  std::fprintf(stderr, "host wgmma emulation (thread %u of CTA %u): %s (descriptor 0x%016llx)\n", threadIdx.x,
               blockIdx.x, what, desc);
  std::abort();
}
inline void emu_wg_sync() { (*emu_wg_bars)[threadIdx.x >> 7]->arrive_and_wait(); }

// Element (k, n) of B through the descriptor (canonical layouts, element size 2 bytes):
//   128B swizzle, K-major (TRANS_B = 0): start + (n/8) SBO + (n%8) 128 + 2k                 (LBO unused)
//   128B swizzle, MN-major (TRANS_B = 1): start + (n/64) LBO + 2 (n%64) + (k/8) SBO + (k%8) 128
//     both then swizzled on the address: bits 4-6 ^= bits 7-9 (Swizzle<3,4,3>, 1024-byte atoms, base offset 0)
//   no swizzle, K-major: core matrices of 8 rows x 16 bytes: start + (n/8) SBO + (n%8) 16 + (k/8) LBO + 2 (k%8)
inline u32 emu_wg_b_addr(u64 desc, int trans, int k, int n) {
  const u32 start = (u32)(desc & 0x3FFFu) << 4, lbo = (u32)((desc >> 16) & 0x3FFFu) << 4,
            sbo = (u32)((desc >> 32) & 0x3FFFu) << 4;
  const u32 sw = (u32)(desc >> 62);
  if (sw == SWIZZLE_128B) {
    u32 a = trans ? start + (n >> 6) * lbo + (n & 63) * 2 + (k >> 3) * sbo + (k & 7) * 128
                  : start + (n >> 3) * sbo + (n & 7) * 128 + k * 2;
    return a ^ (((a >> 7) & 7u) << 4);
  }
  return start + (n >> 3) * sbo + (n & 7) * 16 + (k >> 3) * lbo + (k & 7) * 2;  // SWIZZLE_NONE, K-major
}
inline void emu_wg_check_desc(u64 desc, int trans) {
  const u32 sw = (u32)(desc >> 62), start = (u32)(desc & 0x3FFFu) << 4;
  if (sw != SWIZZLE_128B && !(sw == SWIZZLE_NONE && !trans))
    emu_wg_fail(trans ? "B layout not emulated: MN-major (TRANS_B = 1) is emulated with SWIZZLE_128B only"
                      : "B layout not emulated: K-major (TRANS_B = 0) is emulated with SWIZZLE_128B or SWIZZLE_NONE",
                desc);
  if ((desc >> 49) & 7u) emu_wg_fail("descriptor base offset (bits 49-51) not 0: not emulated", desc);
  if (desc & 0x3FF1C000C000C000ull) emu_wg_fail("reserved descriptor bits set (a field overflowed?)", desc);
  if (sw == SWIZZLE_128B && ((start >> 7) & 7u))
    emu_wg_fail("128B-swizzled B must start in row 0 of a 1024-byte swizzle atom (base offset 0)", desc);
}

inline void emu_wg_perform(EmuWgState& st) {
  EmuWgOp op = std::move(st.ops.front());
  st.ops.pop_front();
  const int t = threadIdx.x & 3;
  float r[128];
  for (int nb = 0; nb < op.nh / 4; ++nb)
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * nb + 2 * t + e;
      double b[16];
      for (int k = 0; k < 16; ++k) {
        unsigned short h;
        std::memcpy(&h, emu_smem_ptr(emu_wg_b_addr(op.desc, op.trans, k, col), 2, 2), 2);
        b[k] = op.bf16 ? emu_bf16(h) : emu_f16(h);
      }
      for (int hr = 0; hr < 2; ++hr) {
        const int i = 4 * nb + 2 * hr + e;
        double acc = op.scale_d ? (double)op.c[i] : 0.0;
        for (int k = 0; k < 16; ++k) acc += (double)op.a[hr][k] * b[k];  // exact products, one fp32 rounding
        r[i] = (float)acc;
      }
    }
  if (op.has_next) {  // d stays poisoned: the next op on it takes the result as its C
    for (EmuWgOp& nx : st.ops)
      if (nx.d == op.d) {
        if (nx.scale_d) nx.c.assign(r, r + op.nh);
        break;
      }
  } else {
    std::copy(r, r + op.nh, op.d);
  }
}

template <bool BF16, int TRANS_B, int NH>
inline void emu_wgmma_issue(float (&d)[NH], const u32 (&a)[4], u64 desc, int scale_d) {
  static_assert(EmuWgmmaRenderedN<2 * NH>::ok, "wgmma N not in the kernel's wgmma_ns");
  const int tid = threadIdx.x;
  if (emu_wg_bars == nullptr || (*emu_wg_bars)[tid >> 7]->expected != 128)
    emu_wg_fail("wgmma needs whole warpgroups (the CTA's thread count a multiple of 128)", desc);
  u32* mine = &emu_wg_buf[tid * 8];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = (u32)desc; mine[5] = (u32)(desc >> 32); mine[6] = scale_d != 0;
  mine[7] = (u32)NH | ((u32)TRANS_B << 16) | ((u32)BF16 << 17);
  emu_wg_sync();  // the warpgroup issues together (.sync.aligned): a warp that skips it deadlocks (abort)
  const u32* lead = &emu_wg_buf[(tid & ~127) * 8];
  for (int i = 4; i < 8; ++i)
    if (lead[i] != mine[i])
      emu_wg_fail("the warpgroup's threads issue different wgmmas (descriptor, scale_d, N, type or TRANS_B)", desc);
  emu_wg_check_desc(desc, TRANS_B);
  EmuWgOp op;
  for (int tq = 0; tq < 4; ++tq) {  // lanes 4g .. 4g+3 hold rows g, g+8: a[hr] cols 2tq, +1; a[2+hr] cols 2tq+8, +9
    const u32* w = &emu_wg_buf[((tid & ~3) + tq) * 8];
    for (int hr = 0; hr < 2; ++hr) {
      const u32 lo = w[hr], hi = w[2 + hr];
      op.a[hr][2 * tq] = BF16 ? emu_bf16(lo & 0xffffu) : emu_f16(lo & 0xffffu);
      op.a[hr][2 * tq + 1] = BF16 ? emu_bf16(lo >> 16) : emu_f16(lo >> 16);
      op.a[hr][2 * tq + 8] = BF16 ? emu_bf16(hi & 0xffffu) : emu_f16(hi & 0xffffu);
      op.a[hr][2 * tq + 9] = BF16 ? emu_bf16(hi >> 16) : emu_f16(hi >> 16);
    }
  }
  emu_wg_sync();  // every thread has read the posted fragments
  op.desc = desc; op.scale_d = scale_d != 0; op.nh = NH; op.trans = TRANS_B; op.bf16 = BF16; op.d = d;
  EmuWgState& st = emu_wg_of[tid];
  EmuWgOp* prev = nullptr;  // the newest pending op on the same accumulators
  for (EmuWgOp& o : st.ops) {
    if (o.d == d && o.nh == NH) prev = &o;
    else if (o.d < d + NH && d < o.d + o.nh)
      emu_wg_fail("pending wgmmas on overlapping, different accumulator arrays", desc);
  }
  if (prev != nullptr) prev->has_next = true;
  else if (op.scale_d) op.c.assign(d, d + NH);
  for (int i = 0; i < NH; ++i) d[i] = __uint_as_float(0xffffffffu);  // undefined until the wait
  st.ops.push_back(std::move(op));
  ++st.open;
}
template <int TRANS_B, int NH>
inline void wgmma_rs_bf16(float (&d)[NH], const u32 (&a)[4], u64 desc, int scale_d) {
  emu_wgmma_issue<true, TRANS_B>(d, a, desc, scale_d);
}
template <int TRANS_B, int NH>
inline void wgmma_rs_f16(float (&d)[NH], const u32 (&a)[4], u64 desc, int scale_d) {
  emu_wgmma_issue<false, TRANS_B>(d, a, desc, scale_d);
}
inline void wgmma_commit() {
  EmuWgState& st = emu_wg_of[threadIdx.x];
  st.groups.push_back(st.open);
  st.open = 0;
}
// Performs, in issue order, this thread's committed groups older than the N newest.
template <int N>
inline void wgmma_wait() {
  EmuWgState& st = emu_wg_of[threadIdx.x];
  while ((int)st.groups.size() > N) {
    for (int i = st.groups.front(); i > 0; --i) emu_wg_perform(st);
    st.groups.pop_front();
  }
}
}  // namespace vd
// ---- end of the host wgmma ----
"""

# common/wgmma.cuh as rendered (banner to include guard), replaced by WGMMA_EMU plus the N it generated.
_WGMMA_HEADER = re.compile(r"// ---- common/wgmma\.cuh:.*?#endif  // VIDRIAL_COMMON_WGMMA_CUH", re.S)

# Inline PTX outside common/ptx.cuh and common/wgmma.cuh (common/wgmma_chain.cuh, kernel bodies): each
# template string -> host code ({i} = operand i's expression); statements of other templates stay as they are.
_KERNEL_ASM = {
    "ld.shared.u32 %0, [%1];": "{0} = vd::emu_ld_shared_u32({1});",
    "ld.shared.v2.f32 { %0, %1 }, [%2];": "vd::emu_ld_shared_v2f32({0}, {1}, {2});",
    "st.shared.v2.f32 [%0], { %1, %2 };": "vd::emu_st_shared_v2f32({0}, {1}, {2});",
    "prmt.b32 %0, %1, %1, 0x1010;": "{0} = vd::emu_prmt({1}, {1}, 0x1010u);",
    "prmt.b32 %0, %1, %1, 0x3232;": "{0} = vd::emu_prmt({1}, {1}, 0x3232u);",
}


def _split_top(text: str, sep: str) -> list[str]:
    """text split at `sep` outside parentheses, brackets and string literals."""
    parts, depth, cur, i, quote = [], 0, [], 0, False
    while i < len(text):
        ch = text[i]
        if quote:
            cur.append(ch)
            if ch == "\\":
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
            cur.append(ch)
        elif ch in "([":
            depth += 1
            cur.append(ch)
        elif ch in ")]":
            depth -= 1
            cur.append(ch)
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _rewrite_kernel_asm(src: str) -> str:
    """The inline-PTX statements of _KERNEL_ASM as host calls (operands kept in order, outputs first)."""
    out, pos = [], 0
    for m in re.finditer(r"\basm(\s+volatile)?\s*\(", src):
        if m.start() < pos:
            continue
        depth, i, quote = 1, m.end(), False
        while depth and i < len(src):  # the statement's closing parenthesis
            ch = src[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    quote = False
            elif ch == '"':
                quote = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            i += 1
        if depth:
            break
        sections = _split_top(src[m.end():i - 1], ":")
        template = sections[0].strip()
        if not (template.startswith('"') and template.endswith('"')) or template[1:-1] not in _KERNEL_ASM:
            continue
        operands = []
        for sec in sections[1:3]:
            for op in _split_top(sec, ","):
                if op.strip():
                    operands.append(re.fullmatch(r'\s*"[^"]*"\s*\((.*)\)\s*', op, re.S).group(1).strip())
        out.append(src[pos:m.start()])
        out.append(_KERNEL_ASM[template[1:-1]].format(*operands).rstrip(";"))
        pos = i
    out.append(src[pos:])
    return "".join(out)

RUNNER = r"""
extern "C" void vidrial_host_launch(int gx, int gy, int threads, long long smem_bytes, const Arg* a) {
  gridDim.x = gx; gridDim.y = gy; blockDim.x = threads;
  const size_t smem_floats = smem_bytes / 4 + 16;
  float* smem_buf = static_cast<float*>(std::aligned_alloc(128, (smem_floats * 4 + 127) / 128 * 128));
  const int warps = (threads + 31) / 32;
  std::vector<unsigned> warp_buf(warps * 32 * WARP_WORDS);
  g_dyn_smem = smem_buf; g_smem_bytes = smem_bytes; g_warp_buf = warp_buf.data();
  const emu_fib::Stacks stacks(threads);
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      emu_fib::Barrier bar(threads);
      std::vector<emu_fib::Barrier*> warp_bars;
      for (int w = 0; w < warps; ++w) warp_bars.push_back(new emu_fib::Barrier(std::min(32, threads - 32 * w)));
      g_warp_bars = &warp_bars;
      g_bar = &bar; blockIdx.x = bx; blockIdx.y = by;
#ifdef VBWD_PTX_EMU
      vd::emu_open_group_of.assign(threads, {});  // each thread's cp.async queues start empty, as a new thread's
      vd::emu_groups_of.assign(threads, {});
#endif
#ifdef VBWD_WGMMA_EMU
      std::vector<emu_fib::Barrier*> wg_bars;  // one per warpgroup (128 threads; a partial one: wgmma aborts)
      for (int w = 0; w < (threads + 127) / 128; ++w)
        wg_bars.push_back(new emu_fib::Barrier(std::min(128, threads - 128 * w)));
      vd::emu_wg_bars = &wg_bars;
      vd::emu_wg_buf.assign(threads * 8, 0u);
      vd::emu_wg_of.assign(threads, {});  // no wgmma pending, as for a new thread
#endif
      std::memset(smem_buf, 0xff, smem_floats * 4);  // NaN garbage: catches reads before writes
      auto body = [&](int) { {{CALL}}; };
      emu_fib::run_block(stacks, threads, body, [](int t) { threadIdx.x = t; });
      for (auto* b : warp_bars) delete b;
#ifdef VBWD_WGMMA_EMU
      for (auto* b : wg_bars) delete b;
      vd::emu_wg_bars = nullptr;
#endif
    }
  std::free(smem_buf);
}
"""


def _host_source(cuda_source: str, entry: str, nargs: int) -> tuple[str, str]:
    """(prelude, body): the shim (and the PTX / wgmma emulations when the kernel uses common/ptx.cuh /
    common/wgmma.cuh) and the kernel with its runner; the prelude is the same for every kernel of a kind,
    so it is compiled once (host_fibers.precompile)."""
    src = cuda_source
    src = re.sub(r"#include <cuda_(bf16|fp16)\.h>", "", src)
    src, n_ptx = _PTX_HEADERS.subn("", src)

    def wgmma_marks(m):  # the wgmma shapes the device header generated, for the host's compile-time check
        ns = sorted({int(n) for n in re.findall(r"\.m64n(\d+)k16\.", m.group(0))})
        return "namespace vd {\n" + "".join(
            f"template <> struct EmuWgmmaRenderedN<{n}> {{ static constexpr bool ok = true; }};\n"
            for n in ns) + "}  // namespace vd\n"

    src, n_wgmma = _WGMMA_HEADER.subn(wgmma_marks, src)
    if n_wgmma and not n_ptx:
        raise ValueError("the host wgmma emulation needs common/ptx.cuh included before common/wgmma.cuh")
    src = _rewrite_kernel_asm(src)
    src = src.replace("extern __shared__ __align__(16) float sm[];", "float* sm = g_dyn_smem;")
    src = re.sub(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];",
                 r"unsigned char* \1 = reinterpret_cast<unsigned char*>(g_dyn_smem);", src)
    src = re.sub(r"__shared__ float (\w+)\[([^\]]+)\];", r"static float \1[\2];", src)
    src = src.replace('extern "C" __global__', "")
    call = f"{entry}(" + ", ".join(f"a[{i}]" for i in range(nargs)) + ")"
    prelude = FIBERS + SHIM + (PTX_EMU if n_ptx else "") + (WGMMA_EMU if n_wgmma else "")
    return prelude, src + RUNNER.replace("{{CALL}}", call)


class _ArgC(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("i", ctypes.c_longlong), ("f", ctypes.c_double)]


_LIBS: dict[str, ctypes.CDLL] = {}


def host_kernel(rendered, signature):
    """A callable launch(grid, threads, smem_bytes, args) running `rendered` on the CPU."""
    nargs = len(signature)
    prelude, body = _host_source(rendered.source, rendered.entry, nargs)
    # the prelude's name is its content's hash, so the kernel's digest covers the prelude too
    pre_name = f"emu_pre_{hashlib.sha256(prelude.encode()).hexdigest()[:16]}.h"
    src = f'#include "{pre_name}"\n' + body
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    lib = _LIBS.get(digest)
    if lib is None:
        d = os.path.join(tempfile.gettempdir(), "vidrial-host-emu")
        os.makedirs(d, exist_ok=True)
        so = os.path.join(d, f"{digest}.so")
        if not os.path.exists(so):
            pre = os.path.join(d, pre_name)
            if not os.path.exists(pre):
                write_atomic(pre, "#pragma once\n" + prelude)
            precompile(pre)
            cpp = os.path.join(d, f"{digest}.cpp")
            write_atomic(cpp, src)
            tmp = so + f".{os.getpid()}"
            res = subprocess.run(["g++", *GXX_FLAGS, "-shared", cpp, "-o", tmp], capture_output=True, text=True)
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
        self._launch = host_kernel(family.render(key, config), family.signature)

    def launch(self, grid, block, args, device_index, stream):
        gx, gy = grid[0], grid[1]
        self._launch((gx, gy), block[0], self.family.dynamic_smem_bytes(self.key, self.config), args)


def install():
    """Route the launchers' CPU calls to the host emulation (returns an undo callable)."""
    from vidrial.core.launch import set_host_launcher

    cache = {}

    def make(family, key, config):
        k = (family.name, key, config)
        if k not in cache:
            cache[k] = HostLaunchable(family, key, config)
        return cache[k]

    old = set_host_launcher(make)

    def undo():
        set_host_launcher(old)
    return undo


def _phi_bf16(x, deg, d_tile):
    """phi of bf16 x as update_state forms it: a bf16 multiply per factor, coef applied in fp32 later."""
    from vidrial.kernels.power_retention.sympow import layout

    idx, coef = layout(x.shape[-1], deg, d_tile).feature_indices()
    out = x[..., idx[:, 0]]
    for j in range(1, deg):
        out = (out.float() * x[..., idx[:, j]].float()).bfloat16()  # exact product, one bf16 rounding
    return out.double(), coef


def emulated_update_state(round_phi: bool = True):
    """Stand-in for the forward update_state (which needs a GPU) at query_state_bwd's state pass
    (qs_bwd_state_update.update_state): the real launcher's checks first (it must refuse only the CPU
    device), then float64 sums of phi(K) V^T / phi(K), with phi(K) rounded as the kernel forms it
    (round_phi) and fp32 outputs."""
    from vidrial.core.errors import InputError
    from vidrial.kernels.power_retention.update_state import update_state as real_update_state
    from vidrial.reference.forward import phi

    def run(K, V, log_G, *, deg, d_tile, chunk_size, config=None):
        from vidrial.core.launch import set_host_launcher

        previous = set_host_launcher(None)  # the launcher's own checks, as on a machine without the emulation
        try:
            real_update_state(K, V, log_G, deg=deg, d_tile=d_tile, chunk_size=chunk_size, config=config)
        except InputError as exc:
            assert str(exc).startswith("K: got device cpu; expected a CUDA tensor"), str(exc)
        else:
            raise AssertionError("update_state accepted CPU tensors")
        finally:
            set_host_launcher(previous)
        assert log_G is None
        b, t, h, d = K.shape
        n = t // chunk_size
        pk, coef = _phi_bf16(K, deg, d_tile) if round_phi else (phi(K, deg, d_tile), None)
        pk = pk.reshape(b, n, chunk_size, h, -1)
        S = torch.einsum("bnchD,bnche->bnhDe", pk, V.double().reshape(b, n, chunk_size, h, d))
        s = pk.sum(2)
        if coef is not None:  # the kernel's fp32 epilogue
            S, s = S * coef[:, None], s * coef
        return S.float(), s.float()
    return run


def install_update_state(update_state=None):
    """Route query_state_bwd's state pass (the forward update_state) to `update_state` (default:
    emulated_update_state()); returns an undo callable."""
    from vidrial.kernels.power_retention import qs_bwd_state_update as mod

    old = mod.update_state
    mod.update_state = update_state or emulated_update_state()

    def undo():
        mod.update_state = old
    return undo


def available() -> bool:
    return shutil.which("g++") is not None
