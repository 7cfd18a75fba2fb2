// Element types the core knows. Compute is f32 (or bf16 GEMM operands with f32 accumulation);
// f16/bf16 are storage formats for base weights (converted in the GEMM's packing or on load);
// i32 holds token ids, positions and sequence offsets. nf4, nf4dq and int8 are quantized 2-D
// weights [rows, cols] in the bitsandbytes formats (see QuantLayout), dequantized while a GEMM
// packs its panels; a tensor of those dtypes is one blob (codes + statistics).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace mlora {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, I32 = 3, NF4 = 4, NF4DQ = 5, INT8 = 6 };

inline bool dtype_quantized(DType t) { return t == DType::NF4 || t == DType::NF4DQ || t == DType::INT8; }

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    default: return 0;  // quantized: no per-element size (quant_layout)
  }
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::NF4: return "nf4";
    case DType::NF4DQ: return "nf4dq";
    case DType::INT8: return "int8";
  }
  return "?";
}

inline bool dtype_from_name(const std::string& s, DType* out) {
  if (s == "f32" || s == "float32") {
    *out = DType::F32;
    return true;
  }
  if (s == "f16" || s == "float16") {
    *out = DType::F16;
    return true;
  }
  if (s == "bf16" || s == "bfloat16") {
    *out = DType::BF16;
    return true;
  }
  if (s == "i32" || s == "int32") {
    *out = DType::I32;
    return true;
  }
  if (s == "nf4") {
    *out = DType::NF4;
    return true;
  }
  if (s == "nf4dq") {
    *out = DType::NF4DQ;
    return true;
  }
  if (s == "int8") {
    *out = DType::INT8;
    return true;
  }
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
      do {
        e++;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
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

// Byte layout of a quantized weight blob [rows, cols] (n = rows·cols elements, flat row-major,
// as bitsandbytes flattens it). Every section starts on a 64-byte boundary.
//   nf4:   codes  u8[ceil(n/2)]   two 4-bit NF4 indices per byte, element 2j in the high nibble
//          absmax f32[blocks]     per block of 64 consecutive elements
//   nf4dq: codes as nf4; absmax u8[blocks] (8-bit dynamic code of absmax - offset),
//          code f32[256] (the dynamic code), offset f32, nested f32[ceil(blocks/256)]
//          (absmax of each 256-block of the 8-bit absmax codes)
//   int8:  codes  i8[n]           row-wise: w = (CB · SCB[row]) · (1/127)
//          absmax f32[rows]       SCB
constexpr int64_t kNf4Block = 64, kNf4NestedBlock = 256;
struct QuantLayout {
  size_t absmax = 0, code = 0, offset = 0, nested = 0, bytes = 0;
  int64_t blocks = 0, nested_blocks = 0;
};
inline size_t align64(size_t x) { return (x + 63) & ~size_t(63); }
inline QuantLayout quant_layout(DType t, int64_t rows, int64_t cols) {
  QuantLayout l;
  const int64_t n = rows * cols;
  if (t == DType::INT8) {
    l.absmax = align64(size_t(n));
    l.blocks = rows;
    l.bytes = l.absmax + size_t(rows) * 4;
    return l;
  }
  l.blocks = (n + kNf4Block - 1) / kNf4Block;
  l.absmax = align64(size_t((n + 1) / 2));
  if (t == DType::NF4) {
    l.bytes = l.absmax + size_t(l.blocks) * 4;
    return l;
  }
  l.nested_blocks = (l.blocks + kNf4NestedBlock - 1) / kNf4NestedBlock;
  l.code = align64(l.absmax + size_t(l.blocks));
  l.offset = l.code + 256 * 4;
  l.nested = align64(l.offset + 4);
  l.bytes = l.nested + size_t(l.nested_blocks) * 4;
  return l;
}

// The bitsandbytes NF4 code book (functional.py get_4bit_type; kernels.cu nf4_dequantization_lut).
inline constexpr float kNf4Code[16] = {-1.0f,
                                       -0.6961928009986877f,
                                       -0.5250730514526367f,
                                       -0.39491748809814453f,
                                       -0.28444138169288635f,
                                       -0.18477343022823334f,
                                       -0.09105003625154495f,
                                       0.0f,
                                       0.07958029955625534f,
                                       0.16093020141124725f,
                                       0.24611230194568634f,
                                       0.33791524171829224f,
                                       0.44070982933044434f,
                                       0.5626170039176941f,
                                       0.7229568362236023f,
                                       1.0f};

// A read-only view of a weight matrix in whatever storage dtype it has. rows/cols are only
// needed (and only set) for quantized weights; bf16_compute asks the GEMM to round both
// operands to bf16 and accumulate in f32.
struct WeightRef {
  const void* ptr = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  bool bf16_compute = false;
  // The GEMM's B operand already in its micro-kernel layout (cpu::gemm_pack_panels, made once
  // for a frozen weight): the GEMM then packs nothing. Only for the one GEMM orientation and
  // bf16_compute it was packed for; nullptr: pack per call.
  const float* panels = nullptr;
  float at(int64_t i) const {
    switch (dtype) {
      case DType::F32: return static_cast<const float*>(ptr)[i];
      case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(ptr)[i]);
      case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(ptr)[i]);
      default: return 0.f;  // quantized: dequant_scalar (cpu/quant.cc)
    }
  }
};

}  // namespace mlora
