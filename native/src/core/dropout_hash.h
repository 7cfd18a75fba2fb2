// The LoRA dropout mask, shared by the CPU and CUDA kernels so both backends (and a replay)
// draw exactly the same mask. The mask is never stored: element (row, col) of an adapter's
// input is kept or dropped as a pure function of (seed, row position, column), where the row
// position is LoraSegment::position + (row - row_start), a global index that does not change
// when the micro-batch is re-run after a fault.
//
//   rowkey = mix64(seed ^ mix64(position + golden))
//   z      = mix64(rowkey + (col / 2) · golden2)        one 64-bit hash per column pair
//   u      = low 32 bits of z for even col, high 32 bits for odd col
//   dropped  <=>  u < floor(p · 2³²);  kept elements are scaled by 1/(1−p) (inverted dropout)
// p == 0 keeps everything without hashing.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MLORA_HD __host__ __device__ __forceinline__
#else
#define MLORA_HD inline
#endif

namespace mlora {

// splitmix64's finaliser: a bijection on 64-bit words with good avalanche.
MLORA_HD uint64_t dropout_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

MLORA_HD uint64_t dropout_rowkey(uint64_t seed, int64_t position) {
  return dropout_mix64(seed ^ dropout_mix64(uint64_t(position) + 0x9e3779b97f4a7c15ULL));
}

// The hash of the column pair (col & ~1, col | 1) of a row.
MLORA_HD uint64_t dropout_pair(uint64_t rowkey, int64_t column) {
  return dropout_mix64(rowkey + uint64_t(column >> 1) * 0xc2b2ae3d27d4eb4fULL);
}

MLORA_HD uint32_t dropout_threshold(float p) { return uint32_t(double(p) * 4294967296.0); }
MLORA_HD float dropout_keep_scale(float p) { return float(1.0 / (1.0 - double(p))); }

// The factor element (position, column) is multiplied by: 0 (dropped) or 1/(1-p) (kept).
MLORA_HD float dropout_factor(uint64_t seed, int64_t position, int64_t column, float p) {
  if (p <= 0.f) return 1.f;
  const uint64_t z = dropout_pair(dropout_rowkey(seed, position), column);
  const uint32_t u = (column & 1) ? uint32_t(z >> 32) : uint32_t(z);
  return u < dropout_threshold(p) ? 0.f : dropout_keep_scale(p);
}

}  // namespace mlora
