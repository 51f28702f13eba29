{% raw %}
// ---- common/bwd_prims.cuh: device primitives of the backward kernels (MATH.md section 4) ------
// Self-contained (only <cuda_bf16.h>, <cuda_fp16.h>); everything in namespace vbwd.
// Feature order: vidrial/kernels/power_retention/sympow.py. A block is a u32 of the block table
// (byte j = tile index i_{j+1}, non-decreasing); feature e of a block (0 <= e < T^P) has offsets
// a_1..a_P with e = a_1 T^(P-1) + ... + a_P; factor j is x[i_j T + a_j]; coefficient sqrt(dup).
#ifndef VIDRIAL_COMMON_BWD_PRIMS_CUH
#define VIDRIAL_COMMON_BWD_PRIMS_CUH
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vbwd {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

// 16-byte shared-memory load (p must be 16-byte aligned; the CPU execution of the tests checks it).
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
// N consecutive floats from shared memory with the widest aligned loads (N % 4 == 0: float4).
template <int N>
__device__ __forceinline__ void ldv(float (&dst)[N], const float* p) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = ld4(p + i);
      dst[i] = v.x; dst[i + 1] = v.y; dst[i + 2] = v.z; dst[i + 3] = v.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const float2 v = ld2(p + i);
      dst[i] = v.x; dst[i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = p[i];
  }
}

// D += A B, mma.sync m16n8k8, tf32 operands (rounded to nearest from fp32), fp32 accumulate.
// Fragments (g = lane / 4, t = lane % 4): a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];
// b = B[t][g], B[t+4][g]; c = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
// Warp-collective: every lane of the warp calls it (the CPU execution of the tests emulates it
// with CTA-wide barriers, so there every warp of the CTA must call it the same number of times).
__device__ __forceinline__ void mma_tf32(float (&c)[4], const float (&a)[4], const float (&b)[2]) {
#ifdef VBWD_HOST_CHECK
  vbwd_host_mma_tf32(c, a, b);
#else
  unsigned r[6];
  const float in[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
#pragma unroll
  for (int i = 0; i < 6; ++i) asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r[i]) : "f"(in[i]));  // round, not truncate
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]), "r"(r[4]), "r"(r[5]));
#endif
}

__device__ __forceinline__ int tile_of(unsigned packed, int j) { return (int)((packed >> (8 * j)) & 0xffu); }

template <int T, int P>
struct Pow {
  static constexpr int block_size() {
    int s = 1;
    for (int i = 0; i < P; ++i) s *= T;
    return s;
  }
};

// sqrt(p! / prod(multiplicity!)) of a block (tile indices non-decreasing: equal ones are adjacent).
template <int P>
__device__ __forceinline__ float block_coef(unsigned packed) {
  int denom = 1, run = 1;
#pragma unroll
  for (int j = 1; j < P; ++j) {
    run = (tile_of(packed, j) == tile_of(packed, j - 1)) ? run + 1 : 1;
    denom *= run;
  }
  int pf = 1;
#pragma unroll
  for (int j = 2; j <= P; ++j) pf *= j;
  return sqrtf((float)(pf / denom));
}

// phi_f(x) for feature offset e inside a block: coef * prod_j x[i_j T + a_j] (x: one row in smem).
template <int T, int P>
__device__ __forceinline__ float feature(const float* __restrict__ x, unsigned packed, float coef, int e) {
  float v = coef;
#pragma unroll
  for (int j = P - 1; j >= 0; --j) {
    const int a = e % T;
    e /= T;
    v *= x[tile_of(packed, j) * T + a];
  }
  return v;
}

// Chain rule of the sympow map for one input coordinate i = ti*T + a of one row:
//   returns sum over features f of the block with i among its factors of
//   dphi_f * coef * prod_{l != j} x[i_l T + a_l]      (one term per factor position j holding i)
// dphi: the block's T^P values of this row, stride `stride` (floats) between features.
template <int T, int P>
__device__ __forceinline__ float chain_block(const float* __restrict__ x, const float* __restrict__ dphi, int stride,
                                             unsigned packed, float coef, int ti, int a) {
  constexpr int BS = Pow<T, P>::block_size();
  constexpr int OTHERS = BS / T;  // T^(P-1) combinations of the other offsets
  float out = 0.f;
#pragma unroll
  for (int j = 0; j < P; ++j) {
    if (tile_of(packed, j) != ti) continue;
    for (int o = 0; o < OTHERS; ++o) {
      int rem = o, eoff = 0, mult = 1;
      float prod = coef;
#pragma unroll
      for (int l = P - 1; l >= 0; --l) {
        int al;
        if (l == j) {
          al = a;
        } else {
          al = rem % T;
          rem /= T;
          prod *= x[tile_of(packed, l) * T + al];
        }
        eoff += al * mult;
        mult *= T;
      }
      out = fmaf(dphi[eoff * stride], prod, out);
    }
  }
  return out;
}

// Row-stationary loop over the features of one state [D][d] (the backward of a feature-map GEMM).
// CTA = WARPS warps, ROWS = 32*RPL rows (lane owns rows lane + 32 j, j < RPL), features in tiles
// of BPT whole blocks (F). Per row r (x_r = sRow[r], u_r = sU[r], u0_r = sU0[r]) and feature f:
//   phi_f = phi_f(x_r),   dphi_f = scale_d * (X[f] . u_r + xs[f] * u0_r)
//   e_acc += phi_f dphi_f;  dx[i] += d/dx_i sum_f dphi_f phi_f(x_r);  (WANT_DV) dv[c] += phi_f X[f][c]
// Thread (warp w, lane) owns columns c = w + k*WARPS (k < HD/WARPS) of dx and the contiguous
// columns w*CPW .. w*CPW+CPW-1 of dv (16-byte loads of X), for each of its RPL rows.
// MMA: the two GEMMs (dphi = U X^T, dv = phi X) on tensor cores (mma.sync m16n8k8 tf32); phi, the
// gate term and the chain rule stay on the CUDA cores.
template <int HD, int P, int T, int NB, int BPT, int WARPS, int RPL, bool WANT_DV, typename SX_T, bool MMA = false>
struct RowLoop {
  static constexpr int ROWS = 32 * RPL;
  static constexpr int BS = Pow<T, P>::block_size();
  static constexpr int F = BPT * BS;
  static constexpr int FPW = F / WARPS;
  static constexpr int CPW = HD / WARPS;
  static constexpr int KB = FPW < 16 ? FPW : 16;  // phase-A accumulators per row per pass
  static constexpr int RS = HD + 1;   // padded row stride of sRow (scalar, conflict-free per lane)
  static constexpr int RSU = HD + 4;  // row stride of sU (16-byte loads per lane)
  static constexpr int XS = HD + 4;    // row stride of the X tile
  static constexpr int PS = ROWS + 4;  // row stride (per feature) of sPhi / sDphi
  static constexpr long long D = (long long)NB * BS;
  static constexpr int NTILE = (NB + BPT - 1) / BPT;
  // MMA tiling: phase A output ROWS x F in 16x8 tiles, phase B output ROWS x HD
  static constexpr int MT = ROWS / 16;
  static constexpr int A_TILES = MT * (F / 8) / WARPS;   // per warp
  static constexpr int B_TILES = MT * (HD / 8) / WARPS;  // per warp
  // shared memory layout (floats)
  static constexpr int OFF_X = 0;
  static constexpr int OFF_XS = OFF_X + F * XS;
  static constexpr int OFF_ROW = OFF_XS + F;
  static constexpr int OFF_U = (OFF_ROW + ROWS * RS + 3) / 4 * 4;
  static constexpr int OFF_U0 = OFF_U + ROWS * RSU;
  static constexpr int OFF_PHI = OFF_U0 + ROWS;
  static constexpr int OFF_DPHI = OFF_PHI + F * PS;
  static constexpr int OFF_RED = OFF_DPHI + F * PS;
  static constexpr int SMEM_FLOATS = OFF_RED + WARPS * ROWS;
  static_assert(F % WARPS == 0, "features per tile must be a multiple of warps");
  static_assert(HD % (4 * WARPS) == 0, "head dim must be a multiple of 4 * warps");
  static_assert(HD % 4 == 0 && F % 4 == 0, "16-byte loads");
  static_assert(FPW % KB == 0, "features per warp must be a multiple of the phase-A batch");
  static_assert(!MMA || (ROWS % 16 == 0 && F % 8 == 0 && HD % 8 == 0 && (MT * (F / 8)) % WARPS == 0 &&
                         (MT * (HD / 8)) % WARPS == 0 && ROWS * XS <= F * XS + F),
                "MMA tiling: 16-row, 8-feature tiles divided evenly over the warps");

  // Sum over the warps of a per-thread value for each of the thread's rows (every warp gets the sums).
  static __device__ __forceinline__ void row_sum(const float (&v)[RPL], float (&out)[RPL], float* sm) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < RPL; ++j) sm[OFF_RED + w * ROWS + lane + 32 * j] = v[j];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < RPL; ++j) {
      float tot = 0.f;
#pragma unroll
      for (int ww = 0; ww < WARPS; ++ww) tot += sm[OFF_RED + ww * ROWS + lane + 32 * j];
      out[j] = tot;
    }
    __syncthreads();
  }

  // out[j] = sum_f phi_f(x_r) xs[f] for the thread's rows r = lane + 32 j (xs: [D] or null).
  static __device__ __forceinline__ void feature_dot(const float* __restrict__ xs, const unsigned* __restrict__ blocks,
                                                     float* sm, float (&out)[RPL]) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    float acc[RPL];
#pragma unroll
    for (int j = 0; j < RPL; ++j) acc[j] = 0.f;
    for (int tb = 0; tb < NTILE; ++tb) {
      const long long f0 = (long long)tb * F;
      __syncthreads();
      for (int i = threadIdx.x; i < F; i += WARPS * 32)
        sm[OFF_XS + i] = (xs != nullptr && f0 + i < D) ? __ldg(xs + f0 + i) : 0.f;
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < FPW; ++k) {
        const int fl = w * FPW + k;
        const int gb = tb * BPT + fl / BS;
        if (gb < NB) {
          const unsigned packed = __ldg(blocks + gb);
          const float coef = block_coef<P>(packed), xsf = sm[OFF_XS + fl];
#pragma unroll
          for (int j = 0; j < RPL; ++j)
            acc[j] = fmaf(feature<T, P>(sm + OFF_ROW + (lane + 32 * j) * RS, packed, coef, fl % BS), xsf, acc[j]);
        }
      }
    }
    row_sum(acc, out, sm);
  }

  // X: [D][HD] of this (batch, head, chunk); xs: [D] or null. Caller filled sRow, sU, sU0 and synced.
  static __device__ __forceinline__ void run(const SX_T* __restrict__ X, const float* __restrict__ xs, float scale_d,
                                             const unsigned* __restrict__ blocks, float* sm, float (&dx)[RPL][CPW],
                                             float (&dv)[RPL][CPW], float (&e_acc)[RPL]) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    float dvf[(MMA && WANT_DV) ? B_TILES : 1][4];  // phase-B accumulators (MMA fragments)
#pragma unroll
    for (int i = 0; i < ((MMA && WANT_DV) ? B_TILES : 1); ++i) dvf[i][0] = dvf[i][1] = dvf[i][2] = dvf[i][3] = 0.f;
    for (int tb = 0; tb < NTILE; ++tb) {
      const long long f0 = (long long)tb * F;
      __syncthreads();  // the previous tile's readers are done
      {
        const long long lim = (D - f0) * HD;  // valid elements of this tile
        const SX_T* src = X + f0 * HD;
        for (int i = threadIdx.x; i < F * HD; i += WARPS * 32)
          sm[OFF_X + (i / HD) * XS + i % HD] = (i < lim) ? to_f(src[i]) : 0.f;
        for (int i = threadIdx.x; i < F; i += WARPS * 32)
          sm[OFF_XS + i] = (xs != nullptr && f0 + i < D) ? __ldg(xs + f0 + i) : 0.f;
      }
      __syncthreads();
      if constexpr (MMA) {
        // phase A (tensor cores): C[row][f] = U[row] . X[f] over HD, then dphi = scale_d (C + xs[f] u0[row])
        const int g = lane >> 2, tq = lane & 3;
#pragma unroll 1
        for (int ti = 0; ti < A_TILES; ++ti) {
          const int tile = w + ti * WARPS;
          const int m0 = (tile % MT) * 16, n0 = (tile / MT) * 8;
          float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int k0 = 0; k0 < HD; k0 += 8) {
            const float a[4] = {sm[OFF_U + (m0 + g) * RSU + k0 + tq], sm[OFF_U + (m0 + g + 8) * RSU + k0 + tq],
                                sm[OFF_U + (m0 + g) * RSU + k0 + tq + 4], sm[OFF_U + (m0 + g + 8) * RSU + k0 + tq + 4]};
            const float b[2] = {sm[OFF_X + (n0 + g) * XS + k0 + tq], sm[OFF_X + (n0 + g) * XS + k0 + tq + 4]};
            mma_tf32(c, a, b);
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int r = m0 + g + (q >> 1) * 8, fl = n0 + 2 * tq + (q & 1);
            const bool ok = tb * BPT + fl / BS < NB;
            sm[OFF_DPHI + fl * PS + r] = ok ? scale_d * fmaf(sm[OFF_XS + fl], sm[OFF_U0 + r], c[q]) : 0.f;
          }
        }
        __syncthreads();
        // phi of this lane's rows for the warp's features; the gate term phi.dphi
#pragma unroll 4
        for (int k = 0; k < FPW; ++k) {
          const int fl = w * FPW + k;
          const int gb = tb * BPT + fl / BS;
          const bool ok = gb < NB;
          const unsigned packed = ok ? __ldg(blocks + gb) : 0u;
          const float coef = ok ? block_coef<P>(packed) : 0.f;
#pragma unroll
          for (int j = 0; j < RPL; ++j) {
            const int r = lane + 32 * j;
            const float ph = ok ? feature<T, P>(sm + OFF_ROW + r * RS, packed, coef, fl % BS) : 0.f;
            e_acc[j] = fmaf(ph, sm[OFF_DPHI + fl * PS + r], e_acc[j]);
            sm[OFF_PHI + fl * PS + r] = ph;
          }
        }
        __syncthreads();
        // phase B (tensor cores): dv[row][c] += sum_f phi[row][f] X[f][c]
        if constexpr (WANT_DV) {
#pragma unroll
          for (int ti = 0; ti < B_TILES; ++ti) {
            const int tile = w + ti * WARPS;
            const int m0 = (tile % MT) * 16, n0 = (tile / MT) * 8;
#pragma unroll 2
            for (int k0 = 0; k0 < F; k0 += 8) {
              const float a[4] = {sm[OFF_PHI + (k0 + tq) * PS + m0 + g], sm[OFF_PHI + (k0 + tq) * PS + m0 + g + 8],
                                  sm[OFF_PHI + (k0 + tq + 4) * PS + m0 + g],
                                  sm[OFF_PHI + (k0 + tq + 4) * PS + m0 + g + 8]};
              const float b[2] = {sm[OFF_X + (k0 + tq) * XS + n0 + g], sm[OFF_X + (k0 + tq + 4) * XS + n0 + g]};
              mma_tf32(dvf[ti], a, b);
            }
          }
        }
      } else {
      // phase A: phi and dphi of this lane's rows for the warp's features (KB at a time: registers)
      for (int kb = 0; kb < FPW; kb += KB) {
        float acc[KB][RPL];
#pragma unroll
        for (int k = 0; k < KB; ++k)
#pragma unroll
          for (int j = 0; j < RPL; ++j) acc[k][j] = 0.f;
        const float* xw = sm + OFF_X + (w * FPW + kb) * XS;
#pragma unroll 1
        for (int e = 0; e < HD; e += 4) {
          float4 u[RPL];
#pragma unroll
          for (int j = 0; j < RPL; ++j) u[j] = ld4(sm + OFF_U + (lane + 32 * j) * RSU + e);
#pragma unroll
          for (int k = 0; k < KB; ++k) {
            const float4 x = ld4(xw + k * XS + e);
#pragma unroll
            for (int j = 0; j < RPL; ++j)
              acc[k][j] = fmaf(u[j].x, x.x, fmaf(u[j].y, x.y, fmaf(u[j].z, x.z, fmaf(u[j].w, x.w, acc[k][j]))));
          }
        }
#pragma unroll
        for (int k = 0; k < KB; ++k) {
          const int fl = w * FPW + kb + k;
          const int gb = tb * BPT + fl / BS;
          const bool ok = gb < NB;
          const unsigned packed = ok ? __ldg(blocks + gb) : 0u;
          const float coef = ok ? block_coef<P>(packed) : 0.f;
          const float xsf = sm[OFF_XS + fl];
#pragma unroll
          for (int j = 0; j < RPL; ++j) {
            const int r = lane + 32 * j;
            float ph = 0.f, dph = 0.f;
            if (ok) {
              ph = feature<T, P>(sm + OFF_ROW + r * RS, packed, coef, fl % BS);
              dph = scale_d * fmaf(xsf, sm[OFF_U0 + r], acc[k][j]);
            }
            e_acc[j] = fmaf(ph, dph, e_acc[j]);
            sm[OFF_PHI + fl * PS + r] = ph;
            sm[OFF_DPHI + fl * PS + r] = dph;
          }
        }
      }
      __syncthreads();
      // phase B: dv[c] += sum_f phi_f X[f][c]
      if constexpr (WANT_DV) {
        for (int fl = 0; fl < F; ++fl) {
          float x[CPW];
          ldv<CPW>(x, sm + OFF_X + fl * XS + w * CPW);
#pragma unroll
          for (int j = 0; j < RPL; ++j) {
            const float ph = sm[OFF_PHI + fl * PS + lane + 32 * j];
#pragma unroll
            for (int k = 0; k < CPW; ++k) dv[j][k] = fmaf(ph, x[k], dv[j][k]);
          }
        }
      }
      }
      // phase C: sympow chain rule, column i = w + k*WARPS
#pragma unroll
      for (int k = 0; k < CPW; ++k) {
        const int i = w + k * WARPS;
        const int ti = i / T, a = i % T;
        for (int bl = 0; bl < BPT; ++bl) {
          const int gb = tb * BPT + bl;
          if (gb >= NB) break;
          const unsigned packed = __ldg(blocks + gb);
          bool hit = false;
#pragma unroll
          for (int jj = 0; jj < P; ++jj) hit |= tile_of(packed, jj) == ti;
          if (!hit) continue;
          const float coef = block_coef<P>(packed);
#pragma unroll
          for (int j = 0; j < RPL; ++j) {
            const int r = lane + 32 * j;
            dx[j][k] += chain_block<T, P>(sm + OFF_ROW + r * RS, sm + OFF_DPHI + (bl * BS) * PS + r, PS, packed,
                                          coef, ti, a);
          }
        }
      }
    }
    if constexpr (MMA && WANT_DV) {
      // fragments -> the (lane = row, contiguous columns) layout of dv, through the X tile's smem
      const int g = lane >> 2, tq = lane & 3;
      __syncthreads();
#pragma unroll
      for (int ti = 0; ti < B_TILES; ++ti) {
        const int tile = w + ti * WARPS;
        const int m0 = (tile % MT) * 16, n0 = (tile / MT) * 8;
#pragma unroll
        for (int q = 0; q < 4; ++q) sm[OFF_X + (m0 + g + (q >> 1) * 8) * XS + n0 + 2 * tq + (q & 1)] = dvf[ti][q];
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < RPL; ++j)
#pragma unroll
        for (int k = 0; k < CPW; ++k) dv[j][k] = sm[OFF_X + (lane + 32 * j) * XS + w * CPW + k];
      __syncthreads();
    }
  }
};

}  // namespace vbwd
#endif  // VIDRIAL_COMMON_BWD_PRIMS_CUH
{% endraw %}
