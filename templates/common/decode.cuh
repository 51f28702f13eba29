{% raw %}
// ---- common/decode.cuh: loads and warp reductions of the decode_step family (inference) --------
// Namespace vd. Its inline PTX lives here, not in common/ptx.cuh, because tests/decode_cpu_exec.py
// compiles decode_step's source as C++ and needs the plain-load fallback under VIDRIAL_CPU_EMU.
#ifndef VIDRIAL_COMMON_DECODE_CUH
#define VIDRIAL_COMMON_DECODE_CUH

namespace vd {

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

// Warp-wide sum / max (every lane gets the result).
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

}  // namespace vd

#endif  // VIDRIAL_COMMON_DECODE_CUH
{% endraw %}
