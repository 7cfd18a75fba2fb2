// Element types the core knows. Compute is f32; f16/bf16 are storage formats for base
// weights (converted in the GEMM's packing or on load); i32 holds token ids, positions and
// sequence offsets.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace mlora {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, I32 = 3 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I32: return 4;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
  }
  return "?";
}

inline bool dtype_from_name(const std::string& s, DType* out) {
  if (s == "f32" || s == "float32") { *out = DType::F32; return true; }
  if (s == "f16" || s == "float16") { *out = DType::F16; return true; }
  if (s == "bf16" || s == "bfloat16") { *out = DType::BF16; return true; }
  if (s == "i32" || s == "int32") { *out = DType::I32; return true; }
  return false;
}

// Scalar conversions (the vectorised paths live in the kernels that need them).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { e++; mant <<= 1; } while ((mant & 0x400u) == 0);
      mant &= 0x3ffu;
      u = sign | (uint32_t(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = int32_t((u >> 23) & 0xffu) - 127 + 15;
  uint32_t mant = u & 0x7fffffu;
  if (((u >> 23) & 0xffu) == 0xffu) return uint16_t(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    mant |= 0x800000u;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return uint16_t(sign | half);
  }
  uint32_t h = sign | (uint32_t(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
  return uint16_t(h);
}

// A read-only view of a weight matrix in whatever storage dtype it has.
struct WeightRef {
  const void* ptr = nullptr;
  DType dtype = DType::F32;
  float at(int64_t i) const {
    switch (dtype) {
      case DType::F32: return static_cast<const float*>(ptr)[i];
      case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(ptr)[i]);
      case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(ptr)[i]);
      default: return 0.f;
    }
  }
};

}  // namespace mlora
