// Every kernel the core has, declared once for each backend from the same list
// (kernels.inc), so the CPU and CUDA backends cannot drift apart in names or arguments.
// The CPU kernels are the oracle for the CUDA ones; tests hold a float64 reference for both.
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/exec.h"

namespace mlora {

// One adapter's share of a segmented LoRA call (see cpu/lora.cc for the maths).
struct LoraSegment {
  int64_t row_start = 0, row_end = 0;  // rows of x/y this adapter owns
  int64_t rank = 0;
  float scale = 1.f;         // alpha / r, or alpha / sqrt(r) with rsLoRA
  float dropout = 0.f;       // probability of zeroing an input element
  uint64_t seed = 0;         // dropout mask = f(seed, row position, column): never stored
  int64_t position = 0;      // global index of row_start, so a mask is the same on replay
  const float* a = nullptr;  // [rank, in]
  const float* b = nullptr;  // [out, rank]
  float* da = nullptr;       // [rank, in], +=
  float* db = nullptr;       // [out, rank], +=
  float* xa = nullptr;       // [rows, rank] saved by forward: dropout(x) · Aᵀ
};

namespace cpu {
#include "kernels.inc"

// Frozen weights packed once (gemm.cc). The GEMM packs its B operand into micro-kernel panels
// on every call, a cost that does not shrink with the rows: at 256 rows it is ~16% of a
// projection's time. A frozen weight [out, in] can be packed once for each of its two GEMMs,
// linear_forward (forward: X·Wᵀ) and linear_backward (dY·W), in the layout and blocking the
// GEMM uses (set per process by the micro-kernel in use), so the GEMM computes the same
// numbers from them, bit for bit. Sizes in floats; the panels go in WeightRef::panels.
int64_t gemm_panel_floats(bool forward, int64_t out, int64_t in, bool bf16_compute);
void gemm_pack_panels(Exec& ex, float* dst, WeightRef w, bool forward, int64_t out, int64_t in);
}  // namespace cpu
#ifdef MLORA_WITH_CUDA
namespace cuda {
#include "kernels.inc"
}
#endif

}  // namespace mlora

// Calls the kernel of the backend the Exec's device belongs to.
#ifdef MLORA_WITH_CUDA
#define MLORA_DISPATCH(ex, fn, ...) \
  ((ex).cuda() ? ::mlora::cuda::fn(ex, __VA_ARGS__) : ::mlora::cpu::fn(ex, __VA_ARGS__))
#else
#define MLORA_DISPATCH(ex, fn, ...) \
  ((ex).cuda() ? throw ::mlora::Error("this build has no CUDA backend (" #fn ")") : ::mlora::cpu::fn(ex, __VA_ARGS__))
#endif
