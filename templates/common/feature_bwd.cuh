{% raw %}
// ---- common/feature_bwd.cuh: the chain rule of the feature map on tensor cores (MATH.md section 4) ----
// For a tile of rows x (raw inputs, one row per thread of a warp) and a state X [D][HD] (bf16):
//   dphi'[row][f] = U[row] . X[f] + w[row] xs[f]       (U: bf16 rows, e.g. dY; xs: fp32 [D])
//   dx[row]  += chain(x[row], dphi'[row])              (d/dx of sum_f dphi'_f phi_f(x))
//   dot[row] += phi(x[row]) . xs                       (optional)
//   out[row] += phi(x[row])^T X                        (optional: phi written by the chain, bf16)
// query_state_bwd rows: U = dY, X = Sbar, xs = sbar, w = -(dY.Y). update_state_bwd: U = V, X = dS
// (bf16), xs = ds, w = 1, and dV = phi(k)^T dS from the phi the chain step writes.
// Namespace vd; builds on common/ptx.cuh, elem.cuh and sympow.cuh (include them first). Pieces:
//   StateTile      cp.async staging of TK features of X (bf16) and xs (fp32), STAGES buffers
//   load_u_frags   a warp's 32 rows of U as mma A fragments, kept in registers for the whole loop
//   dphi_gemm      32 rows x SUB=64 features (or NF=32, half the accumulators): mma.sync m16n8k16
//                  bf16, fp32 accumulate (dphi_gemm_smem: U's fragments from shared memory instead)
//   store_dphi     fragments -> the warp's scratch [32][SUB] fp32 (swizzled: conflict-free both ways)
//   SympowChain::step   one thread = one row: the sympow chain rule over those SUB features; with PHI it
//                  also writes phi(x[row]) over them (bf16) into its own scratch row (phi_idx)
//   phi_x_gemm     out[32 rows][HD] += phi (scratch, bf16) x X (the stage's rows, ldmatrix.trans)
#ifndef VIDRIAL_COMMON_FEATURE_BWD_CUH
#define VIDRIAL_COMMON_FEATURE_BWD_CUH

namespace vd {

constexpr int SUB = 64;       // features per warp GEMM step (8 n8 tiles)
constexpr int WROWS = 32;     // rows per warp: two m16 tiles, one row per lane in the chain
constexpr int PS = SUB + 8;   // scratch row stride in floats (8 mod 32, see scratch_idx)

template <int HD>
struct Geometry {
  static constexpr int LD = HD + 8;   // 16-bit elements per padded row: 16-byte rows, ldmatrix conflict-free
  static constexpr int CH = HD / 8;   // 16-byte chunks per row
  static constexpr int KS = HD / 16;  // mma k steps
  // per-warp scratch (floats): U staging (bf16 [32][LD]) before the loop, dphi' [32][PS] in it
  static constexpr int SCRATCH = WROWS * PS > WROWS * LD / 2 ? WROWS * PS : WROWS * LD / 2;
  static_assert(HD % 16 == 0, "head dim: a multiple of 16");
};

// Float index of (row, feature k < SUB) in a scratch: rows 4..7 of every 8 swap neighbouring
// 16-byte chunks, so the fragment stores (8 rows x 4 pairs) and the one-row-per-lane float4 reads
// both hit 32 distinct banks.
__device__ __forceinline__ int scratch_idx(int row, int k) {
  return row * PS + (((k >> 2) ^ ((row >> 2) & 1)) << 2) + (k & 3);
}

// Float index of row's phi (bf16, SUB values = SUB/2 floats) inside a scratch: the row's own dphi'
// row, shifted by 4 floats in rows 4..7 of every 8 so that the ldmatrix reads of phi_x_gemm (8 rows of
// 16 bytes, row stride PS = 8 mod 32 floats) hit 32 distinct banks. SympowChain::step<.., PHI> writes the
// phi of features [f, f+8) at phi_idx + f/2 after reading the dphi' of features [0, f+8); the floats
// it overwrites hold dphi' of features < f/2 + 12 <= f + 8 (f >= 8; f = 0: features 0..3, read):
// consumed, and only the thread's own row (row = lane) is touched, so no barrier is needed.
__device__ __forceinline__ int phi_idx(int row) { return row * PS + (((row >> 2) & 1) << 2); }

// TK features of X (rows padded to LD) and of xs per stage. Features >= D repeat the last valid
// row / 4 values (no zero-fill needed): their dphi' columns are computed but never read.
template <int HD, int TK, int STAGES>
struct StateTile {
  using Geo = Geometry<HD>;
  static constexpr int X_FLOATS = TK * Geo::LD / 2;
  static constexpr int FLOATS = STAGES * (X_FLOATS + TK);
  static_assert(TK % SUB == 0, "a stage holds whole GEMM steps");

  static __device__ __forceinline__ const __nv_bfloat16* x(const float* base, int st) {
    return reinterpret_cast<const __nv_bfloat16*>(base + st * X_FLOATS);
  }
  static __device__ __forceinline__ const float* xs(const float* base, int st) {
    return base + STAGES * X_FLOATS + st * TK;
  }
  // Every thread of the CTA calls it (then cp_async_commit); X: [D][HD] bf16, xs: [D] fp32 (16-byte
  // aligned, D % 4 == 0).
  static __device__ __forceinline__ void load(float* base, int st, int f0, const __nv_bfloat16* __restrict__ X,
                                              const float* __restrict__ xsg, int D) {
    const u32 sx = smem_u32(base + st * X_FLOATS);
    for (int i = threadIdx.x; i < TK * Geo::CH; i += blockDim.x) {
      const int row = i / Geo::CH, ch = i % Geo::CH;
      const int f = min(f0 + row, D - 1);
      cp_async_16(sx + (row * Geo::LD + ch * 8) * 2, X + (long long)f * HD + ch * 8);
    }
    const u32 ss = smem_u32(base + STAGES * X_FLOATS + st * TK);
    for (int i = threadIdx.x; i < TK / 4; i += blockDim.x) cp_async_16(ss + 16 * i, xsg + min(f0 + 4 * i, D - 4));
  }
};

// The A fragment (m16n8k16, row-major) of m tile mt, k step ks of a warp's 32 rows u (bf16 [32][LD]
// in shared memory).
template <int HD>
__device__ __forceinline__ void load_a_frag(u32 (&a)[4], const __nv_bfloat16* u, int mt, int ks) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a[0], a[1], a[2], a[3],
              smem_u32(u + (mt * 16 + (lane & 15)) * Geometry<HD>::LD + ks * 16 + (lane >> 4) * 8));
}

// All A fragments of the warp's 32 rows of U.
template <int HD>
__device__ __forceinline__ void load_u_frags(u32 (&a)[2][HD / 16][4], const __nv_bfloat16* u) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) load_a_frag<HD>(a[mt][ks], u, mt, ks);
}

// c[mt][2np] += a[mt] x (b0, b1), c[mt][2np+1] += a[mt] x (b2, b3) for both m tiles (one ldmatrix.x4 of B).
template <int NT>
__device__ __forceinline__ void mma_pair(float (&c)[2][NT][4], int np, const u32 (&a)[2][4], u32 b0, u32 b1, u32 b2,
                                         u32 b3) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    mma_16816_bf16(c[mt][2 * np], a[mt], b0, b1);
    mma_16816_bf16(c[mt][2 * np + 1], a[mt], b2, b3);
  }
}

// c[mt][nt] = U rows (mt*16..) x X features (nt*8..) over HD, for NF (SUB, or SUB/2 to halve the
// accumulators) features starting at x (bf16 rows of LD): B fragments of two n tiles per ldmatrix.x4,
// each used for both m tiles. a_of(ks, a) gives the A fragments of k step ks.
template <int HD, int NF = SUB, typename AOf>
__device__ __forceinline__ void dphi_gemm_by(float (&c)[2][NF / 8][4], const AOf& a_of, const __nv_bfloat16* x) {
  constexpr int LD = Geometry<HD>::LD;
  static_assert(NF % 16 == 0 && NF <= SUB, "whole pairs of n tiles inside a step");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NF / 8; ++nt) c[mt][nt][0] = c[mt][nt][1] = c[mt][nt][2] = c[mt][nt][3] = 0.f;
  // matrices of one x4: (n tile 2np, k lo), (2np, k hi), (2np+1, k lo), (2np+1, k hi)
  const u32 xr = smem_u32(x + ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int ks = 0; ks < HD / 16; ++ks) {
    u32 a[2][4];
    a_of(ks, a);
#pragma unroll
    for (int np = 0; np < NF / 16; ++np) {
      u32 b0, b1, b2, b3;
      ldmatrix_x4(b0, b1, b2, b3, xr + (np * 16 * LD + ks * 16) * 2);
      mma_pair(c, np, a, b0, b1, b2, b3);
    }
  }
}

// U's fragments in registers (load_u_frags).
template <int HD, int NF = SUB>
__device__ __forceinline__ void dphi_gemm(float (&c)[2][NF / 8][4], const u32 (&a)[2][HD / 16][4],
                                          const __nv_bfloat16* x) {
  dphi_gemm_by<HD, NF>(c, [&](int ks, u32 (&o)[2][4]) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][i] = a[mt][ks][i];
  }, x);
}

// U's fragments read from shared memory (u: the warp's 32 rows, bf16 [32][LD]) at every k step: for
// head dims whose fragments do not fit in registers next to the caller's accumulators.
template <int HD, int NF = SUB>
__device__ __forceinline__ void dphi_gemm_smem(float (&c)[2][NF / 8][4], const __nv_bfloat16* u,
                                               const __nv_bfloat16* x) {
  dphi_gemm_by<HD, NF>(c, [&](int ks, u32 (&o)[2][4]) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) load_a_frag<HD>(o[mt], u, mt, ks);
  }, x);
}

// out[mt][nt] += phi rows (mt*16..; the warp's scratch at phi_idx, bf16) x X over the first 16 * nk
// of the SUB features starting at x (bf16 rows of LD, feature-major: B fragments by ldmatrix.trans,
// two head-dim n tiles per x4). The forward query_state's GEMM shape.
template <int HD>
__device__ __forceinline__ void phi_x_gemm(float (&out)[2][HD / 8][4], const float* scratch,
                                           const __nv_bfloat16* x, int nk) {
  constexpr int LD = Geometry<HD>::LD;
  const int lane = threadIdx.x & 31;
  u32 pa[2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) pa[mt] = smem_u32(scratch + phi_idx(mt * 16 + (lane & 15))) + (lane >> 4) * 16;
  // matrices of one x4.trans: (features lo, n tile 2np), (features hi, 2np), (lo, 2np+1), (hi, 2np+1)
  const u32 xr = smem_u32(x + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8);
#pragma unroll
  for (int kk = 0; kk < SUB / 16; ++kk) {
    if (kk >= nk) break;  // uniform: the feature tail (D % 16 == 0)
    u32 a[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], pa[mt] + kk * 32);
#pragma unroll
    for (int np = 0; np < HD / 16; ++np) {
      u32 b0, b1, b2, b3;
      ldmatrix_x4_trans(b0, b1, b2, b3, xr + (kk * 16 * LD + np * 16) * 2);
      mma_pair(out, np, a, b0, b1, b2, b3);
    }
  }
}

// Accumulator fragments (row g / g+8, features 2t, 2t+1 of each n tile) -> scratch columns k0 + ..
template <int NF = SUB>
__device__ __forceinline__ void store_dphi(float* scratch, const float (&c)[2][NF / 8][4], int k0 = 0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NF / 8; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        *reinterpret_cast<float2*>(scratch + scratch_idx(mt * 16 + g + 8 * hf, k0 + nt * 8 + 2 * tq)) =
            float2{c[mt][nt][2 * hf], c[mt][nt][2 * hf + 1]};
}

// The sympow chain rule for one row over SUB consecutive features, in chunks of CHUNK = T^M
// features (M = the low digits of the feature offset, known at compile time from the position in
// the chunk; the NH = P - M high digits are constant over a chunk). Per chunk of block
// {i_1..i_P} with coefficient c and high factors xh (product H = c prod xh):
//   low slot l:  dx[i_l T + b] += H sum_{k: b_l(k) = b} dphi'_k prod_{l' != l} x_{l'}[b_l'(k)]
//   high slot j: dx[ih_j]      += c prod_{j' != j} xh_j' * sum_k dphi'_k prod_l x_l[b_l(k)]
//   dot          += H sum_k xs_k prod_l x_l[b_l(k)]
//   phi_k         = H prod_l x_l[b_l(k)]                  (PHI: bf16 into the row's scratch, phi_idx)
template <int T, int P>
struct SympowChain {
  static constexpr int BS = ipow(T, P);
  // p = 4 keeps chunks of 16 features (M = 2): with CHUNK = 64 (M = 3) the xl/acc arrays of step()
  // went to local memory (96-byte stack frame in both mma16 kernels; none with this cap)
  static constexpr int low_digits() {
    int m = 0, c = 1;
    while (m < P && c * T <= (P == 4 ? 16 : SUB)) {
      c *= T;
      ++m;
    }
    return m;
  }
  static constexpr int M = low_digits();
  static constexpr int CHUNK = ipow(T, M);
  static constexpr int NH = P - M;
  static constexpr int K4 = CHUNK < 4 ? CHUNK : 4;
  static_assert(SUB % CHUNK == 0 && BS % CHUNK == 0, "d_tile must be a power of two");

  // x: the thread's row (16-bit, shared memory), scratch: its warp's dphi (row = lane), xs: the
  // stage's SUB values, f0: feature of scratch column 0, dx: the row's fp32 accumulators (shared).
  // PHI: phi(x) of the SUB features replaces the row's dphi' in the scratch (phi_idx; needs whole
  // 16-feature groups per chunk: CHUNK % 16 == 0).
  template <bool DOT, bool PHI = false, typename TX>
  static __device__ __forceinline__ void step(const TX* x, float* scratch, const float* xs, float w,
                                              const unsigned* __restrict__ blocks, int f0, int D, float* dx,
                                              float& dot) {
    static_assert(!PHI || CHUNK % 16 == 0, "phi is written in groups of 8 inside a chunk, read in 16s");
    const int row = threadIdx.x & 31;
#pragma unroll 1
    for (int j = 0; j < SUB / CHUNK; ++j) {
      const int fc = f0 + j * CHUNK;
      if (fc >= D) break;  // uniform over the CTA
      const int gb = fc / BS;
      const unsigned packed = __ldg(blocks + gb);
      const float coef = block_coef<P>(packed);
      int ih[NH > 0 ? NH : 1];
      float xh[NH > 0 ? NH : 1];
      float hp = coef;
      int hi = (fc - gb * BS) / CHUNK;
#pragma unroll
      for (int s = NH - 1; s >= 0; --s) {
        ih[s] = tile_of(packed, s) * T + hi % T;
        hi /= T;
        xh[s] = to_f(x[ih[s]]);
        hp *= xh[s];
      }
      int tl[M > 0 ? M : 1];
      float xl[M > 0 ? M : 1][T], acc[M > 0 ? M : 1][T];
#pragma unroll
      for (int l = 0; l < M; ++l) {
        tl[l] = tile_of(packed, NH + l) * T;
        load_vals<T>(xl[l], x + tl[l]);
#pragma unroll
        for (int b = 0; b < T; ++b) acc[l][b] = 0.f;
      }
      float sum_all = 0.f, sum_dot = 0.f;
      float ph[8];  // PHI: the current group of 8 features
#pragma unroll
      for (int k0 = 0; k0 < CHUNK; k0 += K4) {
        const int kk = j * CHUNK + k0;
        float dv[K4], sv[K4];
        if constexpr (K4 == 4) {
          const float4 d4 = ld4(scratch + scratch_idx(row, kk)), s4 = ld4(xs + kk);
          dv[0] = d4.x; dv[1] = d4.y; dv[2] = d4.z; dv[3] = d4.w;
          sv[0] = s4.x; sv[1] = s4.y; sv[2] = s4.z; sv[3] = s4.w;
        } else {
#pragma unroll
          for (int q = 0; q < K4; ++q) {
            dv[q] = scratch[scratch_idx(row, kk + q)];
            sv[q] = xs[kk + q];
          }
        }
#pragma unroll
        for (int q = 0; q < K4; ++q) {
          const int k = k0 + q;  // compile-time after unrolling: so are the digits below
          const float dp = fmaf(w, sv[q], dv[q]);
          float pre[M + 1];
          pre[0] = 1.f;
#pragma unroll
          for (int l = 0; l < M; ++l) pre[l + 1] = pre[l] * xl[l][(k / ipow(T, M - 1 - l)) % T];
          float suf = 1.f;
#pragma unroll
          for (int l = M - 1; l >= 0; --l) {
            const int b = (k / ipow(T, M - 1 - l)) % T;
            acc[l][b] = fmaf(dp, pre[l] * suf, acc[l][b]);
            suf *= xl[l][b];
          }
          if constexpr (NH > 0) sum_all = fmaf(dp, pre[M], sum_all);
          if constexpr (DOT) sum_dot = fmaf(sv[q], pre[M], sum_dot);
          if constexpr (PHI) {
            ph[k % 8] = hp * pre[M];
            if (k % 8 == 7)  // after the dphi' reads of features < j * CHUNK + k + 1 (see phi_idx)
              *reinterpret_cast<float4*>(scratch + phi_idx(row) + (j * CHUNK + k - 7) / 2) =
                  float4{__uint_as_float(pack_bf16(ph[0], ph[1])), __uint_as_float(pack_bf16(ph[2], ph[3])),
                         __uint_as_float(pack_bf16(ph[4], ph[5])), __uint_as_float(pack_bf16(ph[6], ph[7]))};
          }
        }
      }
      if constexpr (DOT) dot = fmaf(hp, sum_dot, dot);
#pragma unroll
      for (int l = 0; l < M; ++l) add_scaled<T>(dx + tl[l], acc[l], hp);
#pragma unroll
      for (int s = 0; s < NH; ++s) {
        float o = coef * sum_all;
#pragma unroll
        for (int s2 = 0; s2 < NH; ++s2)
          if (s2 != s) o *= xh[s2];
        dx[ih[s]] += o;
      }
    }
  }
};

}  // namespace vd
#endif  // VIDRIAL_COMMON_FEATURE_BWD_CUH
{% endraw %}
