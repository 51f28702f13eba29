{% raw %}
// ---- common/sympow.cuh: THE symmetric power feature map on the device (MATH.md section 2) ------
// Block table, coefficients and factor indices, used by the forward (update_state, query_state),
// the backward (common/feature_bwd.cuh) and decode_step; namespace vd, no inline PTX.
// The feature order is vidrial/kernels/power_retention/sympow.py: feature f lies in block
// f / T^p at offset e = f % T^p = a_1*T^(p-1) + ... + a_p; the block is the multiset of tile
// indices (i_1 <= ... <= i_p). Factor j of feature f is x[i_j*T + a_j]; the coefficient is
// sqrt(dup(block)), dup = p! / prod(multiplicity!).
//
// Block table: one u32 per block, byte j = i_{j+1} (tile indices < 256). It is a small device
// tensor built once per (head_dim, deg, d_tile) from sympow.py's own enumeration and cached per
// device by the launcher. Why a table and not constants in the source: for p=4 or d_tile=1 the
// number of blocks reaches tens of thousands (d=32, p=4, T=1: 52360), too big for __constant__
// and slow to compile as literals; a table also keeps one cubin per (layout, tile config) and
// guarantees the kernel uses exactly the Python order. Each thread reads it once per row it owns,
// in the prologue, so its cost does not depend on the sequence length.
#ifndef VIDRIAL_COMMON_SYMPOW_CUH
#define VIDRIAL_COMMON_SYMPOW_CUH

namespace vd {

constexpr int ipow(int b, int e) {
  int r = 1;
  for (int i = 0; i < e; ++i) r *= b;
  return r;
}

// Tile index i_{j+1} of a packed block.
__device__ __forceinline__ int tile_of(unsigned packed, int j) { return (int)((packed >> (8 * j)) & 0xffu); }

// sqrt(p! / prod(multiplicity!)) of a block (tile indices non-decreasing: equal ones are adjacent,
// so counting runs gives the multiplicities).
template <int P>
__device__ __forceinline__ float block_coef(unsigned packed) {
  int denom = 1, run = 1;
#pragma unroll
  for (int j = 1; j < P; ++j) {
    run = (tile_of(packed, j) == tile_of(packed, j - 1)) ? run + 1 : 1;
    denom *= run;  // accumulates run! over every run
  }
  int pf = 1;
#pragma unroll
  for (int j = 2; j <= P; ++j) pf *= j;
  return sqrtf((float)(pf / denom));
}

// Factor indices of feature f (caller clamps f into [0, D)).
template <int T, int P>
__device__ __forceinline__ void sympow_factors(const unsigned int* __restrict__ blocks, int f, int (&idx)[P]) {
  constexpr int BS = ipow(T, P);
  const int blk = f / BS;
  int e = f - blk * BS;
  const unsigned int packed = __ldg(blocks + blk);
#pragma unroll
  for (int j = P - 1; j >= 0; --j) {
    const int a = e % T;
    e /= T;
    idx[j] = tile_of(packed, j) * T + a;
  }
}

// sqrt(dup(block)) of feature f.
template <int T, int P>
__device__ __forceinline__ float sympow_coef(const unsigned int* __restrict__ blocks, int f) {
  constexpr int BS = ipow(T, P);
  return block_coef<P>(__ldg(blocks + f / BS));
}

}  // namespace vd

#endif  // VIDRIAL_COMMON_SYMPOW_CUH
{% endraw %}
