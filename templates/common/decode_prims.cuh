{% raw %}
// ---- common/decode_prims.cuh: primitives of the decode_step family (inference) ---------------
// Inline PTX / intrinsics only (NVRTC has no CUDA toolkit). Everything in namespace vdec so it
// cannot collide with the other snippets.
#ifndef VIDRIAL_COMMON_DECODE_PRIMS_CUH
#define VIDRIAL_COMMON_DECODE_PRIMS_CUH
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vdec {

#ifndef VIDRIAL_CPU_EMU
// Streaming 16-byte / 8-byte global loads that bypass L1 (read-once data: the state).
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ldg_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// Loads written by other CTAs of the same launch: L2 only (.cg), never a stale L1 line.
__device__ __forceinline__ float ldcg_f(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
#else
// CPU execution of this source (tests/decode_cpu_exec.py): plain loads.
inline uint4 ldg_stream16(const void* p) { emu_check_align(p, 16); return *reinterpret_cast<const uint4*>(p); }
inline uint2 ldg_stream8(const void* p) { emu_check_align(p, 8); return *reinterpret_cast<const uint2*>(p); }
inline float ldcg_f(const float* p) { return *p; }
#endif

// Unpack 32 bits (two 16-bit floats) to fp32.
__device__ __forceinline__ float2 unpack2_bf16(unsigned u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2_f16(unsigned u) {
  return make_float2(__half2float(__ushort_as_half((unsigned short)(u & 0xffffu))),
                     __half2float(__ushort_as_half((unsigned short)(u >> 16))));
}

template <typename T> struct Half2;
template <> struct Half2<__nv_bfloat16> {
  static __device__ __forceinline__ float2 unpack(unsigned u) { return unpack2_bf16(u); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Half2<__half> {
  static __device__ __forceinline__ float2 unpack(unsigned u) { return unpack2_f16(u); }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace vdec

#endif  // VIDRIAL_COMMON_DECODE_PRIMS_CUH
{% endraw %}
