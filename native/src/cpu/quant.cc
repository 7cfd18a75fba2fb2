// Quantized base weights: dequantization (called by the GEMM while it packs B panels, and by
// the dequantize op) and quantization at load time (the quantize op). No gradients: the base
// is frozen, and dX = dY·W runs on the dequantized panels like the forward.
//
// Exactness. bitsandbytes dequantizes in float32 with separate roundings (no fused multiply-add):
// NF4 w = code[q]·absmax', absmax' = (dyn[u8]·nested) + offset; int8 w = (CB·SCB)·(1/127).
// The per-block absmax' is computed in plain (non-FMA) code here, once per 64 elements; the
// vector paths then do one multiply per element (int8: two), so every ISA gives the same bits.
#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../core/thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MLORA_X86 1
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#endif

namespace mlora::cpu {
namespace {

inline const uint8_t* bytes(const WeightRef& w) { return static_cast<const uint8_t*>(w.ptr); }

// absmax' of block b. Kept out of any FMA-enabled function (see the header comment).
__attribute__((noinline)) float nf4_scale(const WeightRef& w, const QuantLayout& L, int64_t b) {
  const uint8_t* base = bytes(w);
  if (w.dtype == DType::NF4) {
    float s;
    std::memcpy(&s, base + L.absmax + size_t(b) * 4, 4);
    return s;
  }
  float code, nested, offset;
  std::memcpy(&code, base + L.code + size_t(base[L.absmax + size_t(b)]) * 4, 4);
  std::memcpy(&nested, base + L.nested + size_t(b / kNf4NestedBlock) * 4, 4);
  std::memcpy(&offset, base + L.offset, 4);
  volatile float prod = code * nested;  // rounded on its own, as torch does, before the add
  return prod + offset;
}

inline float nibble(const uint8_t* q, int64_t i) { return kNf4Code[(i & 1) ? (q[i >> 1] & 15) : (q[i >> 1] >> 4)]; }

// Dequantizes n16 (a multiple of 16) NF4 elements starting at an even element whose byte is q.
using Nf4Run = void (*)(const uint8_t* q, int64_t n16, float s, float* out);
// Dequantizes n int8 elements of one row.
using I8Run = void (*)(const int8_t* q, int64_t n, float scb, float* out);

constexpr float kInv127 = 7.874015718698502e-3f;  // float32(1/127), as bitsandbytes writes it

void nf4_run_scalar(const uint8_t* q, int64_t n16, float s, float* out) {
  for (int64_t i = 0; i < n16; i++) out[i] = nibble(q, i) * s;
}

void i8_run_scalar(const int8_t* q, int64_t n, float scb, float* out) {
  for (int64_t i = 0; i < n; i++) out[i] = (float(q[i]) * scb) * kInv127;
}

void nf4_walk(const WeightRef& w, int64_t i0, int64_t len, float* out, Nf4Run run) {
  const QuantLayout L = quant_layout(w.dtype, w.rows, w.cols);
  const uint8_t* q = bytes(w);
  const int64_t end = i0 + len;
  int64_t i = i0;
  while (i < end) {
    const int64_t b = i / kNf4Block, bend = std::min(end, (b + 1) * kNf4Block);
    const float s = nf4_scale(w, L, b);
    for (; i < bend && (i & 15); i++) *out++ = nibble(q, i) * s;
    const int64_t n16 = (bend - i) & ~int64_t(15);
    if (n16) {
      run(q + (i >> 1), n16, s, out);
      i += n16;
      out += n16;
    }
    for (; i < bend; i++) *out++ = nibble(q, i) * s;
  }
}

void int8_walk(const WeightRef& w, int64_t i0, int64_t len, float* out, I8Run run) {
  const QuantLayout L = quant_layout(w.dtype, w.rows, w.cols);
  const int8_t* q = static_cast<const int8_t*>(w.ptr);
  const float* scb = reinterpret_cast<const float*>(bytes(w) + L.absmax);
  const int64_t end = i0 + len;
  for (int64_t i = i0; i < end;) {
    const int64_t r = i / w.cols, rend = std::min(end, (r + 1) * w.cols);
    run(q + i, rend - i, scb[r], out);
    out += rend - i;
    i = rend;
  }
}

#ifdef MLORA_X86
// 16 NF4 indices from 8 bytes, in element order (high nibble first) as 16 bytes.
AVX2_TARGET inline __m128i nf4_indices16(const uint8_t* q) {
  const __m128i w16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  const __m128i hi = _mm_srli_epi16(w16, 4), lo = _mm_and_si128(w16, _mm_set1_epi16(15));
  return _mm_or_si128(hi, _mm_slli_epi16(lo, 8));
}

AVX2_TARGET inline __m256 nf4_lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  const __m256 lo = _mm256_permutevar8x32_ps(tlo, idx), hi = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 picks the table
}

AVX2_TARGET void nf4_run_avx2(const uint8_t* q, int64_t n16, float s, float* out) {
  const __m256 tlo = _mm256_loadu_ps(kNf4Code), thi = _mm256_loadu_ps(kNf4Code + 8), vs = _mm256_set1_ps(s);
  for (int64_t i = 0; i < n16; i += 16) {
    const __m128i idx = nf4_indices16(q + (i >> 1));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(nf4_lookup8(_mm256_cvtepu8_epi32(idx), tlo, thi), vs));
    _mm256_storeu_ps(out + i + 8,
                     _mm256_mul_ps(nf4_lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8)), tlo, thi), vs));
  }
}

AVX2_TARGET void i8_run_avx2(const int8_t* q, int64_t n, float scb, float* out) {
  const __m256 vs = _mm256_set1_ps(scb), vi = _mm256_set1_ps(kInv127);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(v, vs), vi));
  }
  i8_run_scalar(q + i, n - i, scb, out + i);
}

AVX512_TARGET void nf4_run_avx512(const uint8_t* q, int64_t n16, float s, float* out) {
  const __m512 lut = _mm512_loadu_ps(kNf4Code), vs = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n16; i += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(nf4_indices16(q + (i >> 1)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_permutexvar_ps(idx, lut), vs));
  }
}

AVX512_TARGET void i8_run_avx512(const int8_t* q, int64_t n, float scb, float* out) {
  const __m512 vs = _mm512_set1_ps(scb), vi = _mm512_set1_ps(kInv127);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(v, vs), vi));
  }
  i8_run_scalar(q + i, n - i, scb, out + i);
}
#endif

// ---- quantization

// Index of the nearest code entry: the number of float32 midpoints strictly below x (a value
// exactly on a midpoint takes the lower index, as bitsandbytes' torch backend does).
struct Midpoints {
  std::vector<float> m;
  explicit Midpoints(const float* code, int n) {
    for (int i = 0; i + 1 < n; i++) m.push_back((code[i] + code[i + 1]) / 2.f);
  }
  int index(float x) const { return int(std::lower_bound(m.begin(), m.end(), x) - m.begin()); }
};

std::vector<float> make_dynamic_code() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for i = 0..6 the 2^i
  // midpoints of linspace(0.1, 1, 2^i + 1) (float32) times 10^(i-6), both signs, plus 0 and 1.
  std::vector<float> d;
  for (int i = 0; i < 7; i++) {
    const int n = (1 << i) + 1, half = n / 2;
    const float s = 0.1f, e = 1.0f, step = (e - s) / float(n - 1), scale = float(std::pow(10.0, i - 6));
    std::vector<float> b(static_cast<size_t>(n));
    for (int j = 0; j < n; j++) b[size_t(j)] = j < half ? s + step * float(j) : e - step * float(n - j - 1);
    for (int j = 0; j + 1 < n; j++) {
      const float mean = (b[size_t(j)] + b[size_t(j) + 1]) / 2.f;
      d.push_back(scale * mean);
      d.push_back(-(scale * mean));
    }
  }
  d.push_back(0.f);
  d.push_back(1.f);
  std::sort(d.begin(), d.end());
  return d;
}

float load_src(const WeightRef& w, int64_t i) { return w.at(i); }

void quantize_nf4_blocks(const WeightRef& src, int64_t n, int64_t b0, int64_t b1, uint8_t* codes, float* absmax) {
  static const Midpoints mid(kNf4Code, 16);
  for (int64_t b = b0; b < b1; b++) {
    const int64_t i0 = b * kNf4Block, i1 = std::min(n, i0 + kNf4Block);
    float am = 0.f;
    for (int64_t i = i0; i < i1; i++) am = std::max(am, std::fabs(load_src(src, i)));
    absmax[b] = am;
    const float inv = 1.f / am;
    for (int64_t i = i0; i < i1; i += 2) {
      auto idx = [&](int64_t e) {
        if (e >= i1) return 7;  // the padding element of an odd count: NF4 index 7 (0.0)
        if (am == 0.f) return 7;
        const float x = std::min(1.f, std::max(-1.f, load_src(src, e) * inv));
        return mid.index(x);
      };
      codes[i >> 1] = uint8_t((idx(i) << 4) | idx(i + 1));
    }
  }
}

}  // namespace

const float* dynamic_code() {
  static const std::vector<float> code = make_dynamic_code();
  return code.data();
}

void dequant_run(Isa isa, const WeightRef& w, int64_t i0, int64_t len, float* out) {
  if (len <= 0) return;
  Nf4Run nf4 = nf4_run_scalar;
  I8Run i8 = i8_run_scalar;
#ifdef MLORA_X86
  if (isa == Isa::Avx512)
    nf4 = nf4_run_avx512, i8 = i8_run_avx512;
  else if (isa == Isa::Avx2)
    nf4 = nf4_run_avx2, i8 = i8_run_avx2;
#endif
  if (w.dtype == DType::INT8)
    int8_walk(w, i0, len, out, i8);
  else
    nf4_walk(w, i0, len, out, nf4);
}

void quantize(ThreadPool& pool, DType dt, void* dst, WeightRef src, int64_t rows, int64_t cols) {
  const QuantLayout L = quant_layout(dt, rows, cols);
  uint8_t* base = static_cast<uint8_t*>(dst);
  std::memset(base, 0, L.bytes);  // padding between sections is deterministic
  const int64_t n = rows * cols;
  if (dt == DType::INT8) {
    int8_t* cb = reinterpret_cast<int8_t*>(base);
    float* scb = reinterpret_cast<float*>(base + L.absmax);
    pool.parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1, int) {
      std::vector<float> w16(static_cast<size_t>(cols));
      for (int64_t r = r0; r < r1; r++) {
        float am = 0.f;
        for (int64_t c = 0; c < cols; c++) {  // Int8Params: W.to(float16) first
          w16[size_t(c)] = f16_to_f32(f32_to_f16(load_src(src, r * cols + c)));
          am = std::max(am, std::fabs(w16[size_t(c)]));
        }
        scb[r] = am;
        const float s = (1.f / am) * 127.f;
        for (int64_t c = 0; c < cols; c++)
          cb[r * cols + c] =
              am == 0.f ? 0 : int8_t(std::nearbyint(std::min(127.f, std::max(-127.f, w16[size_t(c)] * s))));
      }
    });
    return;
  }
  const bool dq = dt == DType::NF4DQ;
  std::vector<float> am_tmp(dq ? size_t(L.blocks) : 0);
  float* absmax = dq ? am_tmp.data() : reinterpret_cast<float*>(base + L.absmax);
  pool.parallel_for(L.blocks, 256,
                    [&](int64_t b0, int64_t b1, int) { quantize_nf4_blocks(src, n, b0, b1, base, absmax); });
  if (!dq) return;
  // Double quantization: offset = mean(absmax); (absmax - offset) in 8-bit dynamic code, blocks of 256.
  double sum = 0;
  for (int64_t b = 0; b < L.blocks; b++) sum += absmax[b];
  const float offset = float(sum / double(L.blocks));
  const float* code = dynamic_code();
  static const Midpoints mid(dynamic_code(), 256);
  std::memcpy(base + L.code, code, 256 * 4);
  std::memcpy(base + L.offset, &offset, 4);
  float* nested = reinterpret_cast<float*>(base + L.nested);
  for (int64_t nb = 0; nb < L.nested_blocks; nb++) {
    const int64_t b0 = nb * kNf4NestedBlock, b1 = std::min(L.blocks, b0 + kNf4NestedBlock);
    float m = 0.f;
    for (int64_t b = b0; b < b1; b++) m = std::max(m, std::fabs(absmax[b] - offset));
    nested[nb] = m;
    const float inv = 1.f / m;
    for (int64_t b = b0; b < b1; b++)
      base[L.absmax + size_t(b)] =
          uint8_t(m == 0.f ? mid.index(0.f) : mid.index(std::min(1.f, std::max(-1.f, (absmax[b] - offset) * inv))));
  }
}

}  // namespace mlora::cpu
