{% raw %}
// ---- common/sympow.cuh: on-the-fly symmetric power features (MATH.md section 2) -------------
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

template <int T, int P>
struct SympowShape {
  static constexpr int block_size() {
    int s = 1;
    for (int i = 0; i < P; ++i) s *= T;
    return s;
  }
};

// Factor indices of feature f (caller clamps f into [0, D)).
template <int T, int P>
__device__ __forceinline__ void sympow_factors(const unsigned int* __restrict__ blocks, int f, int (&idx)[P]) {
  constexpr int BS = SympowShape<T, P>::block_size();
  const int blk = f / BS;
  int e = f - blk * BS;
  const unsigned int packed = __ldg(blocks + blk);
#pragma unroll
  for (int j = P - 1; j >= 0; --j) {
    const int a = e % T;
    e /= T;
    idx[j] = (int)((packed >> (8 * j)) & 0xffu) * T + a;
  }
}

// sqrt(dup(block)) of feature f.
template <int T, int P>
__device__ __forceinline__ float sympow_coef(const unsigned int* __restrict__ blocks, int f) {
  constexpr int BS = SympowShape<T, P>::block_size();
  const unsigned int packed = __ldg(blocks + f / BS);
  // tuples are non-decreasing, so equal tile indices are adjacent: count runs
  int denom = 1, run = 1;
#pragma unroll
  for (int j = 1; j < P; ++j) {
    const bool same = ((packed >> (8 * j)) & 0xffu) == ((packed >> (8 * (j - 1))) & 0xffu);
    run = same ? run + 1 : 1;
    denom *= run;  // accumulates run! over every run
  }
  int pfact = 1;
#pragma unroll
  for (int j = 2; j <= P; ++j) pfact *= j;
  return sqrtf((float)(pfact / denom));
}

#endif  // VIDRIAL_COMMON_SYMPOW_CUH
{% endraw %}
