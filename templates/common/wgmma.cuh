// ---- common/wgmma.cuh: Hopper warpgroup MMA (sm_90a only) and its shared-memory descriptors -----
// wgmma.mma_async is issued by a warpgroup (4 consecutive warps, the first one's index divisible
// by 4): D[64 x N] (+)= A[64 x 16] * B[16 x N], fp32 accumulators in registers. A comes from
// registers here (the kernels form phi(x) in registers, so it never goes through shared memory);
// its fragment is mma.sync m16n8k16's A fragment, warp w of the warpgroup holding rows 16w..16w+15.
// D's layout per warp: for each 8-column block nb, d[4nb + 2r + e] = (row g + 8r, col 8nb + 2q + e),
// g = lane / 4, q = lane % 4 (mma.sync's accumulator layout, one n8 tile after the other).
// B is read from shared memory through a 64-bit matrix descriptor (PTX ISA, "Matrix Descriptor
// Format"): start address, leading / stride byte offsets, swizzle mode. Ordering rules the kernels
// follow: wgmma_fence() before the first wgmma after registers it reads were written; shared memory
// written by ordinary stores or cp.async is made visible to the tensor cores (the async proxy) by
// fence_proxy_async() in each writing thread before the barrier; the A registers and accumulators
// of an issued wgmma are not touched until a wgmma_wait<> that covers it.
#ifndef VIDRIAL_COMMON_WGMMA_CUH
#define VIDRIAL_COMMON_WGMMA_CUH

namespace vd {

// Swizzle modes of the descriptor (bits 62-63).
enum : u32 { SWIZZLE_NONE = 0, SWIZZLE_128B = 1, SWIZZLE_64B = 2, SWIZZLE_32B = 3 };

// Matrix descriptor: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29), stride byte
// offset >> 4 (32-45), base offset 0 (the buffers are 1024-byte aligned), swizzle mode (62-63).
// Offsets along a matrix add (bytes >> 4) to the low field: it cannot carry past 14 bits because
// shared addresses are below 2^18.
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 leading_bytes, u32 stride_bytes, u32 swizzle) {
  return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(leading_bytes >> 4) << 16) | ((u64)(stride_bytes >> 4) << 32) |
         ((u64)swizzle << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// Shared memory written through the generic proxy (st.shared, cp.async) -> visible to wgmma / TMA.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Pins accumulators after a wait: the compiler may not move their reads above it.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

{% macro wgmma_rs(n, ty) %}
// D[64 x {{ n }}] += A (registers) * B (descriptor), {{ ty }} inputs; TRANS_B = 1: B stored N-major.
// scale_d = 0 overwrites D (no zero fill needed), 1 accumulates.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_{{ ty }}(float (&d)[{{ n // 2 }}], const u32 (&a)[4], u64 desc, int scale_d) {
  asm volatile(
      "{ \n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %{{ n // 2 + 5 }}, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n{{ n }}k16.f32.{{ ty }}.{{ ty }} "
      "{ {% for i in range(n // 2) %}%{{ i }}{{ ", " if not loop.last }}{% endfor %} }, "
      "{ %{{ n // 2 }}, %{{ n // 2 + 1 }}, %{{ n // 2 + 2 }}, %{{ n // 2 + 3 }} }, %{{ n // 2 + 4 }}, p, 1, 1, %{{ n // 2 + 6 }};\n"
      "}\n"
      : {% for i in range(n // 2) %}"+f"(d[{{ i }}]){{ ", " if not loop.last }}{% endfor %}

      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(TRANS_B));
}
{% endmacro %}
{% for ty in ("bf16", "f16") %}
{% for n in wgmma_ns %}
{{ wgmma_rs(n, ty) }}
{% endfor %}
{% endfor %}

}  // namespace vd

#endif  // VIDRIAL_COMMON_WGMMA_CUH
