{% raw %}
// ---- common/feature_bwd.cuh: tensor-core backward through the feature map (MATH.md section 4) ----
// For a tile of rows x (raw inputs, one row per thread of a warp) and a state X [D][HD] (bf16):
//   dphi'[row][f] = U[row] . X[f] + w[row] xs[f]       (U: bf16 rows, e.g. dY; xs: fp32 [D])
//   dx[row]  += chain(x[row], dphi'[row])              (d/dx of sum_f dphi'_f phi_f(x))
//   dot[row] += phi(x[row]) . xs                       (optional)
// query_state_bwd rows: U = dY, X = Sbar, xs = sbar, w = -(dY.Y). update_state_bwd (dK) can reuse it
// with U = V, X = dS (bf16), xs = ds, w = 1.
// Pieces (include common/mma.cuh and common/bwd_prims.cuh first):
//   StateTile      cp.async staging of TK features of X (bf16) and xs (fp32), STAGES buffers
//   load_u_frags   a warp's 32 rows of U as mma A fragments, kept in registers for the whole loop
//   dphi_gemm      32 rows x SUB=64 features: mma.sync m16n8k16 bf16, fp32 accumulate
//   store_dphi     fragments -> the warp's scratch [32][SUB] fp32 (swizzled: conflict-free both ways)
//   Chain::step    one thread = one row: the sympow chain rule over those SUB features
#ifndef VIDRIAL_COMMON_FEATURE_BWD_CUH
#define VIDRIAL_COMMON_FEATURE_BWD_CUH

namespace vfb {

constexpr int SUB = 64;       // features per warp GEMM step (8 n8 tiles)
constexpr int WROWS = 32;     // rows per warp: two m16 tiles, one row per lane in the chain
constexpr int PS = SUB + 8;   // scratch row stride in floats (8 mod 32, see scratch_idx)

constexpr int ipow(int b, int e) {
  int r = 1;
  for (int i = 0; i < e; ++i) r *= b;
  return r;
}

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

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

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
    for (int k = 0; k < 8; ++k) o[k] = __float2bfloat16_rn(vbwd::to_f(e[k]));
    return out;
  }
}

// N consecutive 16-bit values from shared memory as floats (widest aligned loads).
template <int N, typename TX>
__device__ __forceinline__ void load_vals(float (&out)[N], const TX* p) {
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 8) {
      const float4 raw = vbwd::ld4(reinterpret_cast<const float*>(p + i));
      const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
      for (int k = 0; k < 8; ++k) out[i + k] = vbwd::to_f(e[k]);
    }
  } else if constexpr (N == 4) {
    const float2 raw = vbwd::ld2(reinterpret_cast<const float*>(p));
    const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = vbwd::to_f(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = vbwd::to_f(p[k]);
  }
}

// p[0..N) += s * v (shared memory, one thread's row).
template <int N>
__device__ __forceinline__ void add_scaled(float* p, const float (&v)[N], float s) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 o = vbwd::ld4(p + i);
      *reinterpret_cast<float4*>(p + i) =
          float4{fmaf(s, v[i], o.x), fmaf(s, v[i + 1], o.y), fmaf(s, v[i + 2], o.z), fmaf(s, v[i + 3], o.w)};
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = fmaf(s, v[i], p[i]);
  }
}

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

// A fragments (m16n8k16, row-major) of the warp's 32 rows of U (bf16 [32][LD] in shared memory).
template <int HD>
__device__ __forceinline__ void load_u_frags(u32 (&a)[2][HD / 16][4], const __nv_bfloat16* u) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks)
      ldmatrix_x4(a[mt][ks][0], a[mt][ks][1], a[mt][ks][2], a[mt][ks][3],
                  smem_u32(u + (mt * 16 + (lane & 15)) * Geometry<HD>::LD + ks * 16 + (lane >> 4) * 8));
}

// c[mt][nt] = U rows (mt*16..) x X features (nt*8..) over HD, for SUB features starting at x
// (bf16 rows of LD): B fragments of two n tiles per ldmatrix.x4, each used for both m tiles.
template <int HD>
__device__ __forceinline__ void dphi_gemm(float (&c)[2][SUB / 8][4], const u32 (&a)[2][HD / 16][4],
                                          const __nv_bfloat16* x) {
  constexpr int LD = Geometry<HD>::LD;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < SUB / 8; ++nt) c[mt][nt][0] = c[mt][nt][1] = c[mt][nt][2] = c[mt][nt][3] = 0.f;
  // matrices of one x4: (n tile 2np, k lo), (2np, k hi), (2np+1, k lo), (2np+1, k hi)
  const u32 xr = smem_u32(x + ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int ks = 0; ks < HD / 16; ++ks)
#pragma unroll
    for (int np = 0; np < SUB / 16; ++np) {
      u32 b0, b1, b2, b3;
      ldmatrix_x4(b0, b1, b2, b3, xr + (np * 16 * LD + ks * 16) * 2);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma_16816_bf16(c[mt][2 * np], a[mt][ks], b0, b1);
        mma_16816_bf16(c[mt][2 * np + 1], a[mt][ks], b2, b3);
      }
    }
}

// Accumulator fragments (row g / g+8, features 2t, 2t+1 of each n tile) -> scratch.
__device__ __forceinline__ void store_dphi(float* scratch, const float (&c)[2][SUB / 8][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < SUB / 8; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        *reinterpret_cast<float2*>(scratch + scratch_idx(mt * 16 + g + 8 * hf, nt * 8 + 2 * tq)) =
            float2{c[mt][nt][2 * hf], c[mt][nt][2 * hf + 1]};
}

// The sympow chain rule for one row over SUB consecutive features, in chunks of CHUNK = T^M
// features (M = the low digits of the feature offset, known at compile time from the position in
// the chunk; the NH = P - M high digits are constant over a chunk). Per chunk of block
// {i_1..i_P} with coefficient c and high factors xh (product H = c prod xh):
//   low slot l:  dx[i_l T + b] += H sum_{k: b_l(k) = b} dphi'_k prod_{l' != l} x_{l'}[b_l'(k)]
//   high slot j: dx[ih_j]      += c prod_{j' != j} xh_j' * sum_k dphi'_k prod_l x_l[b_l(k)]
//   dot          += H sum_k xs_k prod_l x_l[b_l(k)]
template <int T, int P>
struct Chain {
  static constexpr int BS = ipow(T, P);
  static constexpr int low_digits() {
    int m = 0, c = 1;
    while (m < P && c * T <= SUB) {
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
  template <bool DOT, typename TX>
  static __device__ __forceinline__ void step(const TX* x, const float* scratch, const float* xs, float w,
                                              const unsigned* __restrict__ blocks, int f0, int D, float* dx,
                                              float& dot) {
    const int row = threadIdx.x & 31;
#pragma unroll 1
    for (int j = 0; j < SUB / CHUNK; ++j) {
      const int fc = f0 + j * CHUNK;
      if (fc >= D) break;  // uniform over the CTA
      const int gb = fc / BS;
      const unsigned packed = __ldg(blocks + gb);
      const float coef = vbwd::block_coef<P>(packed);
      int ih[NH > 0 ? NH : 1];
      float xh[NH > 0 ? NH : 1];
      float hp = coef;
      int hi = (fc - gb * BS) / CHUNK;
#pragma unroll
      for (int s = NH - 1; s >= 0; --s) {
        ih[s] = vbwd::tile_of(packed, s) * T + hi % T;
        hi /= T;
        xh[s] = vbwd::to_f(x[ih[s]]);
        hp *= xh[s];
      }
      int tl[M > 0 ? M : 1];
      float xl[M > 0 ? M : 1][T], acc[M > 0 ? M : 1][T];
#pragma unroll
      for (int l = 0; l < M; ++l) {
        tl[l] = vbwd::tile_of(packed, NH + l) * T;
        load_vals<T>(xl[l], x + tl[l]);
#pragma unroll
        for (int b = 0; b < T; ++b) acc[l][b] = 0.f;
      }
      float sum_all = 0.f, sum_dot = 0.f;
#pragma unroll
      for (int k0 = 0; k0 < CHUNK; k0 += K4) {
        const int kk = j * CHUNK + k0;
        float dv[K4], sv[K4];
        if constexpr (K4 == 4) {
          const float4 d4 = vbwd::ld4(scratch + scratch_idx(row, kk)), s4 = vbwd::ld4(xs + kk);
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

}  // namespace vfb
#endif  // VIDRIAL_COMMON_FEATURE_BWD_CUH
{% endraw %}
