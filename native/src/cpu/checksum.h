// The checksum of an activation slot (actors/shm.ts Slab.seal / verify).
#pragma once
#include <cstddef>
#include <cstdint>

namespace mlora::cpu {

// FNV-1a over n 32-bit words in 32 interleaved lanes (word i into lane i mod 32, lane j seeded
// with seed ^ j), the lanes then folded in order into one FNV chain seeded with `seed`, and the
// words past the last whole 32 after them. One FNV chain is bound by its multiply's latency;
// 32 independent ones keep the multipliers busy (4 AVX2 vectors of 8 lanes). The same value on
// every instruction set (MLORA_GEMM_KERNEL=scalar forces the portable loop).
uint32_t slot_checksum(const uint32_t* w, size_t n, uint32_t seed);

}  // namespace mlora::cpu
