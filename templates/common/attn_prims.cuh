// ---- common/attn_prims.cuh: extra primitives of the intra-chunk attention family ---------------
// Builds on common/mma.cuh (include that first). Inline PTX only.
#ifndef VIDRIAL_COMMON_ATTN_PRIMS_CUH
#define VIDRIAL_COMMON_ATTN_PRIMS_CUH

// cp.async 16 bytes global -> shared (.cg) with zero fill: src_bytes = 16 copies, 0 writes zeros
// (the source is then not read, but must still be a valid address expression).
__device__ __forceinline__ void cp_async_16_zfill(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// 2^x on the SFU (ex2.approx.ftz: flushes denormal results to 0, -inf -> 0).
__device__ __forceinline__ float attn_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#endif  // VIDRIAL_COMMON_ATTN_PRIMS_CUH
