// The LoRA dropout mask, shared by the CPU and CUDA kernels so both backends (and a replay)
// draw exactly the same mask. The mask is never stored: element (row, col) of an adapter's
// input is kept or dropped as a pure function of (seed, row position, column), where the row
// position is LoraSegment::position + (row - row_start), i.e. a global index that does not
// change when the micro-batch is re-run after a fault.
//
// keep  <=>  u >= p, with u = the top 24 bits of a 64-bit mix of (seed, position, column),
// scaled to [0, 1). A kept element is multiplied by 1/(1-p) (inverted dropout, as PyTorch).
// p == 0 keeps everything without hashing; p >= 1 drops everything.
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

// A uniform float in [0, 1) with 24 random bits: exact in f32, the same on every backend.
MLORA_HD float dropout_uniform(uint64_t seed, int64_t position, int64_t column) {
  uint64_t h = dropout_mix64(seed ^ 0x9e3779b97f4a7c15ULL);
  h = dropout_mix64(h ^ uint64_t(position));
  h = dropout_mix64(h ^ (uint64_t(column) * 0xd1b54a32d192ed03ULL));
  return float(uint32_t(h >> 40)) * (1.0f / 16777216.0f);
}

// The factor element (position, column) is multiplied by: 0 (dropped) or 1/(1-p) (kept).
MLORA_HD float dropout_factor(uint64_t seed, int64_t position, int64_t column, float p) {
  if (p <= 0.f) return 1.f;
  if (p >= 1.f) return 0.f;
  return dropout_uniform(seed, position, column) >= p ? 1.f / (1.f - p) : 0.f;
}

}  // namespace mlora
