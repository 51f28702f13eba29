{% raw %}
// ---- common/wgmma_chain.cuh: the sympow chain rule on a wgmma accumulator block (p = 2, d_tile = 8) ------
// For the backward kernels whose first GEMM gives dphi for one 64-feature sympow block (i1, i2) in an m64n64
// wgmma accumulator (feature a1*8 + a2 is c x[i1*8+a1] x[i2*8+a2], c = 1 on the diagonal, sqrt 2 off it):
// a thread holds rows g, g+8 of its warp's 16 and features (a1 = 0..7, a2 = 2q, 2q+1), acc[4 a1 + 2 hr + e]
// (mma.sync's accumulator layout, one n8 tile per a1). The chain splits per element:
//   dx[i1*8+a1] += c dphi x[i2*8+a2]  (summed over the quad's a2, then owned by lane q = a1/2)
//   dx[i2*8+a2] += c dphi x[i1*8+a1]  (summed over a1 in the thread: its own a2 = 2q, 2q+1)
// so every (row, dim) of dx is owned by one thread (rows g, g+8; dims = 2q, 2q+1 mod 8) and lives in shared
// memory without synchronisation. The same layout is the A fragment of a second GEMM over the block's
// features (k-step s: a1 = 2s, 2s+1), so phi(x) can be formed in registers for it (PHI).
// Namespace vd; needs common/ptx.cuh (pack_bf16, lds128) and common/elem.cuh (to_f).
#ifndef VIDRIAL_COMMON_WGMMA_CHAIN_CUH
#define VIDRIAL_COMMON_WGMMA_CHAIN_CUH

namespace vd {

// Quad transpose-reduce: v[a] summed over the 4 lanes of a quad; lane q returns the sums of a = 2q, 2q+1.
__device__ __forceinline__ float2 quad_reduce_pairs(const float (&v)[8], int q) {
  const bool hi = q & 2, odd = q & 1;
  float r[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float send = hi ? v[j] : v[j + 4];
    r[j] = (hi ? v[j + 4] : v[j]) + __shfl_xor_sync(0xffffffffu, send, 2);
  }
  float s[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float send = odd ? r[j] : r[j + 2];
    s[j] = (odd ? r[j + 2] : r[j]) + __shfl_xor_sync(0xffffffffu, send, 1);
  }
  return make_float2(s[0], s[1]);
}

// Sum over the 4 lanes of a quad.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Two consecutive fp32 values in shared memory += (a, b).
__device__ __forceinline__ void add2_shared(u32 addr, float a, float b) {
  float x, y;
  asm volatile("ld.shared.v2.f32 { %0, %1 }, [%2];" : "=f"(x), "=f"(y) : "r"(addr));
  asm volatile("st.shared.v2.f32 [%0], { %1, %2 };" :: "r"(addr), "f"(x + a), "f"(y + b));
}

// One block: dphi' = acc + w[hr] xs (xs: the block's 64 fp32 values in shared memory, this lane's pair
// at xs + 8 a1); dx += chain(x, dphi') into the rows' dx (shared, dxrow[hr] = &dx[row][2q], fp32 rows);
// xrow[hr]: the shared address of the row's x (16-bit T_X, 8-element tiles 16 bytes apart).
// PHI: pf = phi(x) of the block as bf16 A fragments of its four k-steps. DOT: dot[hr] += this lane's part
// of phi(x).xs (quad_sum it once at the end).
template <typename T_X, bool PHI, bool DOT>
__device__ __forceinline__ void chain_block(const float (&acc)[32], unsigned packed, const float* xs,
                                            const float (&w)[2], const u32 (&xrow)[2], const u32 (&dxrow)[2],
                                            int q, u32 (&pf)[4][4], float (&dot)[2]) {
  const int i1 = (int)(packed & 0xffu), i2 = (int)((packed >> 8) & 0xffu);
  const float cf = (i1 == i2) ? 1.f : 1.41421356237f;
  float2 sv[8];
#pragma unroll
  for (int a1 = 0; a1 < 8; ++a1) sv[a1] = ld2(xs + a1 * 8);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float x1[8], x2[2];
    {
      const uint4 v = lds128(xrow[hr] + i1 * 16);
      const T_X* e = reinterpret_cast<const T_X*>(&v);
#pragma unroll
      for (int a = 0; a < 8; ++a) x1[a] = to_f(e[a]);
      u32 v2;
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v2) : "r"(xrow[hr] + (i2 * 8 + 2 * q) * 2));
      const T_X* e2 = reinterpret_cast<const T_X*>(&v2);
      x2[0] = cf * to_f(e2[0]);
      x2[1] = cf * to_f(e2[1]);
    }
    float part[8], s0 = 0.f, s1 = 0.f, t0 = 0.f, t1 = 0.f;
#pragma unroll
    for (int a1 = 0; a1 < 8; ++a1) {
      const float d0 = fmaf(w[hr], sv[a1].x, acc[4 * a1 + 2 * hr]);
      const float d1 = fmaf(w[hr], sv[a1].y, acc[4 * a1 + 2 * hr + 1]);
      part[a1] = fmaf(d0, x2[0], d1 * x2[1]);
      s0 = fmaf(d0, x1[a1], s0);
      s1 = fmaf(d1, x1[a1], s1);
      if constexpr (PHI) pf[a1 >> 1][(a1 & 1) * 2 + hr] = pack_bf16(x1[a1] * x2[0], x1[a1] * x2[1]);
      if constexpr (DOT) {
        t0 = fmaf(x1[a1], sv[a1].x, t0);
        t1 = fmaf(x1[a1], sv[a1].y, t1);
      }
    }
    if constexpr (DOT) dot[hr] = fmaf(x2[0], t0, fmaf(x2[1], t1, dot[hr]));
    const float2 own = quad_reduce_pairs(part, q);
    add2_shared(dxrow[hr] + i1 * 32, own.x, own.y);
    add2_shared(dxrow[hr] + i2 * 32, cf * s0, cf * s1);
  }
}

}  // namespace vd
#endif  // VIDRIAL_COMMON_WGMMA_CHAIN_CUH
{% endraw %}
