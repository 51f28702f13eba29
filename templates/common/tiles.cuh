{% raw %}
// ---- common/tiles.cuh: tiles and mma fragments over swizzled shared tiles; vector global I/O ----
// Builds on common/ptx.cuh (include it first); namespace vd, no inline PTX of its own. A tile is
// ROWS x HD bf16 in shared memory, rows of HD elements whose 16-byte chunks are XOR-swizzled so that
// the eight row addresses of an ldmatrix phase hit eight different bank groups (8 consecutive rows,
// same logical chunk). HD is a power of two in 16..256. Fragments follow the PTX ISA layout of
// mma.m16n8k16 (g = lane / 4, t = lane % 4): A regs (g, 2t), (g+8, 2t), (g, 2t+8), (g+8, 2t+8);
// B regs (k = 2t, n = g), (k = 2t+8, n = g); C (g, 2t..2t+1), (g+8, 2t..2t+1).
// (update_state keeps its own swizzle: its k-stage layout is not a [rows][HD] tile.)
#ifndef VIDRIAL_COMMON_TILES_CUH
#define VIDRIAL_COMMON_TILES_CUH

namespace vd {

// Element offset of (row, 16-byte chunk) in a swizzled [rows][HD] bf16 tile.
template <int HD>
__device__ __forceinline__ int swz(int row, int chunk) {
  constexpr int CH = HD / 8;
  static_assert(CH >= 2 && (CH & (CH - 1)) == 0, "HD: a power of two >= 16");
  if constexpr (CH >= 8) {
    return row * HD + ((chunk ^ (row & 7)) << 3);
  } else if constexpr (CH == 4) {
    return row * HD + ((chunk ^ ((row >> 1) & 3)) << 3);
  } else {
    return row * HD + ((chunk ^ ((row >> 2) & 1)) << 3);
  }
}

// ROWS rows of a [*, stride] bf16 global array (row 0 at src) -> swizzled tile at dst (cp.async,
// one commit group per call site). Rows >= valid are zero-filled; `safe` is any readable address.
template <int ROWS, int HD, int THREADS>
__device__ __forceinline__ void load_tile(u32 dst, const __nv_bfloat16* __restrict__ src, long long stride,
                                          int valid, const void* safe) {
  constexpr int CH = HD / 8;
#pragma unroll 4
  for (int i = threadIdx.x; i < ROWS * CH; i += THREADS) {
    const int row = i / CH, ch = i % CH;
    const bool ok = row < valid;
    cp_async_16_zfill(dst + swz<HD>(row, ch) * 2, ok ? (const void*)(src + row * stride + ch * 8) : safe,
                      ok ? 16 : 0);
  }
}

// A fragment: rows r0..r0+15, k = 16 kk..16 kk+15 of a row-major tile (ldmatrix matrices:
// rows 0-7 / 8-15 x k 0-7 / 8-15 in the order of the A registers).
template <int HD>
__device__ __forceinline__ void frag_a(u32 (&a)[4], u32 tile, int r0, int kk, int lane) {
  const int row = r0 + (lane & 7) + (((lane >> 3) & 1) << 3);
  ldmatrix_x4(a[0], a[1], a[2], a[3], tile + swz<HD>(row, 2 * kk + (lane >> 4)) * 2);
}

// B fragments of X * tile^T for the 16 output columns n0..n0+15 (= tile rows), k = 16 kk..: b[0], b[1]
// for columns n0..n0+7 and b[2], b[3] for n0+8..n0+15.
template <int HD>
__device__ __forceinline__ void frag_b(u32 (&b)[4], u32 tile, int n0, int kk, int lane) {
  const int row = n0 + (lane & 7) + ((lane >> 4) << 3);
  ldmatrix_x4(b[0], b[1], b[2], b[3], tile + swz<HD>(row, 2 * kk + ((lane >> 3) & 1)) * 2);
}

// B fragments of X * tile for k = tile rows k0..k0+15 and the 16 output columns 16 dp..16 dp+15
// (= tile columns), through ldmatrix.trans: b[0], b[1] for the first 8 columns, b[2], b[3] next.
template <int HD>
__device__ __forceinline__ void frag_bt(u32 (&b)[4], u32 tile, int k0, int dp, int lane) {
  const int row = k0 + (lane & 7) + (((lane >> 3) & 1) << 3);
  ldmatrix_x4_trans(b[0], b[1], b[2], b[3], tile + swz<HD>(row, 2 * dp + (lane >> 4)) * 2);
}

// A fragment for k = 16 kk..16 kk+15 from the fp32 accumulators of the output column blocks 2 kk
// and 2 kk + 1 of a previous mma (the C layout of two n8 blocks is the A layout of one k16 step).
__device__ __forceinline__ void acc_to_a(u32 (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// ---- vector global loads / stores of fp32 rows (VEC = 4, 2 or 1 consecutive values) --------------
template <int VEC>
__device__ __forceinline__ void load_f(float (&v)[VEC], const float* __restrict__ p) {
  if constexpr (VEC == 4) {
    float4 x = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  } else if constexpr (VEC == 2) {
    float2 x = __ldg(reinterpret_cast<const float2*>(p));
    v[0] = x.x; v[1] = x.y;
  } else {
    v[0] = __ldg(p);
  }
}
template <int VEC>
__device__ __forceinline__ void store_f(float* p, const float (&v)[VEC]) {
  if constexpr (VEC == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else if constexpr (VEC == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else {
    p[0] = v[0];
  }
}
template <int VEC>
__device__ __forceinline__ void store_bf16(__nv_bfloat16* p, const float (&v)[VEC]) {
  if constexpr (VEC == 4) {
    uint2 u = make_uint2(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]));
    *reinterpret_cast<uint2*>(p) = u;
  } else if constexpr (VEC == 2) {
    *reinterpret_cast<unsigned*>(p) = pack_bf16(v[0], v[1]);
  } else {
    p[0] = __float2bfloat16_rn(v[0]);
  }
}

}  // namespace vd

#endif  // VIDRIAL_COMMON_TILES_CUH
{% endraw %}
