{% raw %}
// ---- common/elem.cuh: element types and widened shared-memory reads (namespace vd) -------------
// bf16 / fp16 / fp32 <-> fp32 conversions, 16-byte and 8-byte shared reads with alignment checks in
// the host emulation, and small per-row vector helpers. No inline PTX: every kernel includes it,
// including decode_step, whose source tests/decode_cpu_exec.py compiles as plain C++.
#ifndef VIDRIAL_COMMON_ELEM_CUH
#define VIDRIAL_COMMON_ELEM_CUH
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vd {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

// Two 16-bit floats (low half first) of a 32-bit word as fp32.
__device__ __forceinline__ float2 unpack_bf16(unsigned v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// Per-type conversions for kernels templated on the input / output type.
template <typename T> struct Elem;
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float2 unpack(unsigned u) { return unpack_bf16(u); }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  // intrinsics, not ptx.cuh's cvt (decode_step runs as plain C++ on the CPU in the tests)
  static __device__ __forceinline__ float2 unpack(unsigned u) {
    return make_float2(__half2float(__ushort_as_half((unsigned short)(u & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(u >> 16))));
  }
};
template <> struct Elem<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

// 16-byte / 8-byte shared-memory reads (p aligned; the host emulation of the tests checks it).
__device__ __forceinline__ float4 ld4(const float* p) {
#ifdef VBWD_HOST_CHECK
  vbwd_check_align16(p);
#endif
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float2 ld2(const float* p) {
#ifdef VBWD_HOST_CHECK
  vbwd_check_align8(p);
#endif
  return *reinterpret_cast<const float2*>(p);
}

// 8 elements of type TX (bits in a float4) as 8 bf16 (the mma operand type).
template <typename TX>
__device__ __forceinline__ float4 to_bf16x8(const float4& raw) {
  if constexpr (IsBf16<TX>::value) {
    return raw;
  } else {
    const TX* e = reinterpret_cast<const TX*>(&raw);
    float4 out;
    __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = __float2bfloat16_rn(to_f(e[k]));
    return out;
  }
}

// N consecutive 16-bit values from shared memory as floats (widest aligned loads).
template <int N, typename TX>
__device__ __forceinline__ void load_vals(float (&out)[N], const TX* p) {
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 8) {
      const float4 raw = ld4(reinterpret_cast<const float*>(p + i));
      const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
      for (int k = 0; k < 8; ++k) out[i + k] = to_f(e[k]);
    }
  } else if constexpr (N == 4) {
    const float2 raw = ld2(reinterpret_cast<const float*>(p));
    const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = to_f(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_f(p[k]);
  }
}

// p[0..N) += s * v (shared memory, one thread's row).
template <int N>
__device__ __forceinline__ void add_scaled(float* p, const float (&v)[N], float s) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 o = ld4(p + i);
      *reinterpret_cast<float4*>(p + i) =
          float4{fmaf(s, v[i], o.x), fmaf(s, v[i + 1], o.y), fmaf(s, v[i + 2], o.z), fmaf(s, v[i + 3], o.w)};
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = fmaf(s, v[i], p[i]);
  }
}

}  // namespace vd

#endif  // VIDRIAL_COMMON_ELEM_CUH
{% endraw %}
