#include "checksum.h"

#include "simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mlora::cpu {

namespace {

constexpr uint32_t kPrime = 0x01000193u;
constexpr size_t kLanes = 32;

uint32_t fold(const uint32_t (&h)[kLanes], const uint32_t* w, size_t from, size_t n, uint32_t seed) {
  uint32_t out = seed;
  for (size_t j = 0; j < kLanes; j++) out = (out ^ h[j]) * kPrime;
  for (size_t i = from; i < n; i++) out = (out ^ w[i]) * kPrime;
  return out;
}

uint32_t checksum_portable(const uint32_t* w, size_t n, uint32_t seed) {
  uint32_t h[kLanes];
  for (size_t j = 0; j < kLanes; j++) h[j] = seed ^ uint32_t(j);
  const size_t whole = n - n % kLanes;
  for (size_t i = 0; i < whole; i += kLanes)
    for (size_t j = 0; j < kLanes; j++) h[j] = (h[j] ^ w[i + j]) * kPrime;
  return fold(h, w, whole, n, seed);
}

#ifdef MLORA_SIMD_X86
__attribute__((target("avx2"))) uint32_t checksum_avx2(const uint32_t* w, size_t n, uint32_t seed) {
  const __m256i p = _mm256_set1_epi32(int(kPrime));
  const __m256i s = _mm256_set1_epi32(int(seed));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i h0 = _mm256_xor_si256(s, lane), h1 = _mm256_xor_si256(s, _mm256_add_epi32(lane, _mm256_set1_epi32(8))),
          h2 = _mm256_xor_si256(s, _mm256_add_epi32(lane, _mm256_set1_epi32(16))),
          h3 = _mm256_xor_si256(s, _mm256_add_epi32(lane, _mm256_set1_epi32(24)));
  const size_t whole = n - n % kLanes;
  for (size_t i = 0; i < whole; i += kLanes) {
    const __m256i* x = reinterpret_cast<const __m256i*>(w + i);
    h0 = _mm256_mullo_epi32(_mm256_xor_si256(h0, _mm256_loadu_si256(x)), p);
    h1 = _mm256_mullo_epi32(_mm256_xor_si256(h1, _mm256_loadu_si256(x + 1)), p);
    h2 = _mm256_mullo_epi32(_mm256_xor_si256(h2, _mm256_loadu_si256(x + 2)), p);
    h3 = _mm256_mullo_epi32(_mm256_xor_si256(h3, _mm256_loadu_si256(x + 3)), p);
  }
  uint32_t h[kLanes];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), h0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + 8), h1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + 16), h2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + 24), h3);
  return fold(h, w, whole, n, seed);
}
#endif

}  // namespace

uint32_t slot_checksum(const uint32_t* w, size_t n, uint32_t seed) {
#ifdef MLORA_SIMD_X86
  if (simd::pick_isa({8}) != simd::Isa::Portable) return checksum_avx2(w, n, seed);
#endif
  return checksum_portable(w, n, seed);
}

}  // namespace mlora::cpu
