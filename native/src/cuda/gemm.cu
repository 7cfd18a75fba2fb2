// GEMM: C = alpha·op(A)·op(B) + beta·C, row-major, A f32, B f32/f16/bf16 (base weights).
//
// Two implementations:
// - cuBLAS, loaded at run time with dlopen (no cuBLAS headers or libraries exist where this is
//   built). We declare the handful of entry points and enum values we use ourselves. cuBLAS
//   is column-major: a row-major M×N matrix with leading dimension ld is, to cuBLAS, its N×M
//   transpose with the same ld. So row-major C = op(A)·op(B) is column-major
//   Cᵀ = op(B)ᵀ·op(A)ᵀ: we call cuBLAS with the operands swapped (B first), m and n swapped,
//   and the same transpose flags. cublasGemmEx needs A and B of one type: for bf16/f16 weights
//   the activations are converted to that type in scratch (f32 accumulation, f32 C); f32
//   weights use exact f32 compute (MLORA_CUDA_TF32=1 allows TF32).
// - our own shared-memory tiled kernel (64×64 tiles, 4×4 outputs per thread, f32 FMA), used
//   when cuBLAS is missing, for shapes past cuBLAS's int range, for MLORA_CUDA_GEMM=fallback
//   (tests cross-check cuBLAS with it), and as the grouped kernel behind the segmented LoRA
//   products (several small problems in one launch, with the dropout mask applied on load).
// Accumulation: C is written with beta (beta = 0 never reads C).
#include <dlfcn.h>
#include <glob.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "../core/dropout_hash.h"
#include "common.cuh"

namespace mlora::cuda {

// ------------------------------------------------------------------------------------------
// cuBLAS at run time

namespace {
// Values from cublas_api.h / library_types.h (stable ABI since CUDA 11).
using cublasHandle_t = void*;
using cublasStatus_t = int;
constexpr int CUBLAS_OP_N = 0, CUBLAS_OP_T = 1;
constexpr int CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77;
constexpr int CUBLAS_GEMM_DEFAULT = -1;
constexpr int kCudaR32F = 0, kCudaR16F = 2, kCudaR16BF = 14;
}  // namespace

struct Cublas {
  void* lib = nullptr;
  std::string path;
  int version[3] = {0, 0, 0};
  cublasStatus_t (*create)(cublasHandle_t*) = nullptr;
  cublasStatus_t (*destroy)(cublasHandle_t) = nullptr;
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t) = nullptr;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, int, int, int, int, int, const void*, const void*, int, int, const void*,
                            int, int, const void*, void*, int, int, int, int) = nullptr;
  cublasStatus_t (*get_property)(int, int*) = nullptr;
  const char* (*status_string)(cublasStatus_t) = nullptr;
};

namespace {

std::vector<std::string> glob_paths(const std::string& pattern) {
  std::vector<std::string> out;
  glob_t g;
  if (::glob(pattern.c_str(), 0, nullptr, &g) == 0) {
    for (size_t i = 0; i < g.gl_pathc; i++) out.push_back(g.gl_pathv[i]);
  }
  globfree(&g);
  return out;
}

// Candidate files, most specific first. A bare soname goes through the dynamic loader's own
// search (LD_LIBRARY_PATH, the ld.so cache).
std::vector<std::string> cublas_candidates() {
  std::vector<std::string> c;
  if (const char* e = std::getenv("MLORA_CUBLAS")) {
    std::string p = e;
    if (!p.empty() && p.back() == '/') p.pop_back();
    if (p.find(".so") != std::string::npos)
      c.push_back(p);
    else
      for (const char* v : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) c.push_back(p + "/" + v);
  }
  for (const char* v : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) c.push_back(v);
  std::vector<std::string> dirs;
  for (const char* env : {"CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"})
    if (const char* e = std::getenv(env)) {
      dirs.push_back(std::string(e) + "/lib64");
      dirs.push_back(std::string(e) + "/lib");
    }
  dirs.push_back("/usr/local/cuda/lib64");
  dirs.push_back("/usr/local/cuda/targets/x86_64-linux/lib");
  dirs.push_back("/usr/lib/x86_64-linux-gnu");
  for (auto& d : glob_paths("/usr/local/cuda-1[23]*/lib64")) dirs.push_back(d);
  // pip wheels (nvidia-cublas-cu12 / -cu13, PyTorch's dependencies), in venvs, conda, user
  // and system site-packages.
  std::vector<std::string> roots;
  for (const char* env : {"VIRTUAL_ENV", "CONDA_PREFIX"})
    if (const char* e = std::getenv(env)) roots.push_back(e);
  if (const char* h = std::getenv("HOME")) roots.push_back(std::string(h) + "/.local");
  roots.push_back("/usr/local");
  roots.push_back("/usr");
  roots.push_back("/opt/conda");
  for (auto& r : roots) {
    if (r.find("conda") != std::string::npos) dirs.push_back(r + "/lib");
    for (const char* sp : {"site-packages", "dist-packages"}) {
      for (const char* sub : {"nvidia/cu13/lib", "nvidia/cublas/lib", "nvidia/cu12/lib", "torch/lib"}) {
        for (auto& d : glob_paths(r + "/lib/python3*/" + sp + "/" + sub)) dirs.push_back(d);
      }
    }
  }
  for (auto& d : dirs)
    for (const char* v : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) c.push_back(d + "/" + v);
  return c;
}

Cublas* load_cublas(std::string* why) {
  std::string tried;
  for (const std::string& cand : cublas_candidates()) {
    bool has_dir = cand.find('/') != std::string::npos;
    if (has_dir && access(cand.c_str(), R_OK) != 0) continue;
    if (has_dir) {
      // libcublas needs libcublasLt of the same version; load it from the same folder first so
      // the loader finds it even when that folder is not on its search path.
      std::string dir = cand.substr(0, cand.rfind('/') + 1);
      std::string ver = cand.substr(cand.rfind(".so"));
      dlopen((dir + "libcublasLt" + ver).c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
    void* h = dlopen(cand.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      if (has_dir || (e && std::string(e).find("No such file") == std::string::npos))
        tried += "\n  " + cand + ": " + (e ? e : "?");
      continue;
    }
    auto* cb = new Cublas();
    cb->lib = h;
    cb->create = reinterpret_cast<decltype(cb->create)>(dlsym(h, "cublasCreate_v2"));
    cb->destroy = reinterpret_cast<decltype(cb->destroy)>(dlsym(h, "cublasDestroy_v2"));
    cb->set_stream = reinterpret_cast<decltype(cb->set_stream)>(dlsym(h, "cublasSetStream_v2"));
    cb->gemm_ex = reinterpret_cast<decltype(cb->gemm_ex)>(dlsym(h, "cublasGemmEx"));
    cb->get_property = reinterpret_cast<decltype(cb->get_property)>(dlsym(h, "cublasGetProperty"));
    cb->status_string = reinterpret_cast<decltype(cb->status_string)>(dlsym(h, "cublasGetStatusString"));
    if (!cb->create || !cb->destroy || !cb->set_stream || !cb->gemm_ex) {
      tried += "\n  " + cand + ": missing cublasCreate_v2/cublasGemmEx";
      dlclose(h);
      delete cb;
      continue;
    }
    char real[4096];
    cb->path = cand;
    if (dlinfo(h, RTLD_DI_ORIGIN, real) == 0 && cand.find('/') == std::string::npos)
      cb->path = std::string(real) + "/" + cand;
    if (cb->get_property)
      for (int i = 0; i < 3; i++) cb->get_property(i, &cb->version[i]);
    return cb;
  }
  *why = "cuBLAS not found (set MLORA_CUBLAS to libcublas.so.N or its folder)" +
         (tried.empty() ? std::string() : ";" + tried);
  return nullptr;
}

struct CublasOnce {
  Cublas* lib = nullptr;
  std::string why;
  CublasOnce() { lib = load_cublas(&why); }  // never unloaded: other threads may hold handles
};

const CublasOnce& cublas_once() {
  static const CublasOnce once;  // thread-safe initialisation; read-only afterwards
  return once;
}

std::string status_text(const Cublas* cb, cublasStatus_t s) {
  std::string t = "cuBLAS status " + std::to_string(s);
  if (cb->status_string) {
    const char* n = cb->status_string(s);
    if (n) t += std::string(" (") + n + ")";
  }
  return t;
}

}  // namespace

const Cublas* cublas_library(std::string* why) {
  const CublasOnce& o = cublas_once();
  if (!o.lib && why) *why = o.why;
  return o.lib;
}

std::string gemm_backend_description() {
  if (const char* g = std::getenv("MLORA_CUDA_GEMM"))
    if (std::string(g) == "fallback") return "fallback (tiled kernel; MLORA_CUDA_GEMM=fallback)";
  std::string why;
  const Cublas* cb = cublas_library(&why);
  if (!cb) return "fallback (tiled kernel; " + why + ")";
  return "cublas " + std::to_string(cb->version[0]) + "." + std::to_string(cb->version[1]) + "." +
         std::to_string(cb->version[2]) + " (" + cb->path + ")";
}

void* CudaBackend::cublas_handle() {
  if (cublas_tried_) return cublas_;
  cublas_tried_ = true;
  if (force_fallback_) return nullptr;
  const Cublas* cb = cublas_library(nullptr);
  if (!cb) return nullptr;
  activate();
  cublasHandle_t h = nullptr;
  cublasStatus_t s = cb->create(&h);
  if (s != 0) throw Error("cublasCreate: " + status_text(cb, s));
  s = cb->set_stream(h, stream_);
  if (s != 0) {
    cb->destroy(h);
    throw Error("cublasSetStream: " + status_text(cb, s));
  }
  cublas_ = h;
  return cublas_;
}

CudaBackend::~CudaBackend() {
  if (cudaSetDevice(index_) == cudaSuccess) cudaStreamSynchronize(stream_);
  if (cublas_) {
    const Cublas* cb = cublas_library(nullptr);
    if (cb) cb->destroy(cublas_);
  }
  if (err_) cudaFree(err_);
  if (err_host_) cudaFreeHost(err_host_);
  if (stream_) cudaStreamDestroy(stream_);
  cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// The tiled kernel (fallback GEMM and grouped LoRA products)

namespace {

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;  // 256 threads: 16×16, each 4×4

// Element idx of a [ROWS, BK] operand tile as (row, kk), in the order of the operand's memory
// (k contiguous, or rows contiguous), so consecutive threads read consecutive addresses.
template <int ROWS>
__device__ __forceinline__ void tile_index(int idx, bool k_contiguous, int& row, int& kk) {
  if (k_contiguous) {
    kk = idx % BK;
    row = idx / BK;
  } else {
    row = idx % ROWS;
    kk = idx / ROWS;
  }
}

struct GroupParams {
  GemmProblem p[kMaxGroups];
  int tile_start[kMaxGroups + 1];  // prefix sum of tiles per problem
  int count;
};

template <typename LB, bool TA, bool TB, int DROP>
__global__ void __launch_bounds__(256) tiled_gemm_kernel(const __grid_constant__ GroupParams gp) {
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  int bid = int(blockIdx.x);
  int g = 0;
  while (g + 1 < gp.count && gp.tile_start[g + 1] <= bid) g++;
  const GemmProblem& P = gp.p[g];
  int local = bid - gp.tile_start[g];
  int64_t tiles_n = (P.n + BN - 1) / BN;
  int64_t m0 = int64_t(local / tiles_n) * BM, n0 = int64_t(local % tiles_n) * BN;
  const float* A = P.a;
  const typename LB::T* B = static_cast<const typename LB::T*>(P.b);
  int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; i++)
#pragma unroll
    for (int j = 0; j < TN; j++) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < P.k; k0 += BK) {
    // 1024 elements of each tile, 4 per thread, in the operand's memory order (tile_index).
#pragma unroll
    for (int e = 0; e < 4; e++) {
      int ii, kk;
      tile_index<BM>(threadIdx.x + e * 256, !TA, ii, kk);  // A stored [m, k] or (TA) [k, m]
      int64_t gi = m0 + ii, gk = k0 + kk;
      float v = 0.f;
      if (gi < P.m && gk < P.k) {
        v = TA ? A[gk * P.lda + gi] : A[gi * P.lda + gk];
        if (DROP == kDropA) v *= dropout_factor(P.seed, P.position + gi, gk, P.p);
      }
      As[kk][ii] = v;
    }
#pragma unroll
    for (int e = 0; e < 4; e++) {
      int jj, kk;
      tile_index<BN>(threadIdx.x + e * 256, TB, jj, kk);  // B stored (TB) [n, k] or [k, n]
      int64_t gj = n0 + jj, gk = k0 + kk;
      float v = 0.f;
      if (gj < P.n && gk < P.k) {
        v = TB ? LB::load(B, gj * P.ldb + gk) : LB::load(B, gk * P.ldb + gj);
        if (DROP == kDropB) v *= dropout_factor(P.seed, P.position + gk, gj, P.p);
      }
      Bs[kk][jj] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk++) {
      float av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; i++) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; j++) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; i++) {
    int64_t gi = m0 + ty + 16 * i;
    if (gi >= P.m) continue;
#pragma unroll
    for (int j = 0; j < TN; j++) {
      int64_t gj = n0 + tx + 16 * j;
      if (gj >= P.n) continue;
      float v = P.alpha * acc[i][j];
      if (DROP == kDropC) v *= dropout_factor(P.seed, P.position + gi, gj, P.p);
      float* c = P.c + gi * P.ldc + gj;
      *c = P.beta == 0.f ? v : fmaf(P.beta, *c, v);
    }
  }
}

template <typename LB, bool TA, bool TB>
void launch_tiled(const GroupParams& gp, int tiles, DropWhere drop, cudaStream_t s) {
  switch (drop) {
    case kDropNone: tiled_gemm_kernel<LB, TA, TB, kDropNone><<<tiles, 256, 0, s>>>(gp); break;
    case kDropA: tiled_gemm_kernel<LB, TA, TB, kDropA><<<tiles, 256, 0, s>>>(gp); break;
    case kDropB: tiled_gemm_kernel<LB, TA, TB, kDropB><<<tiles, 256, 0, s>>>(gp); break;
    case kDropC: tiled_gemm_kernel<LB, TA, TB, kDropC><<<tiles, 256, 0, s>>>(gp); break;
  }
}

template <typename LB>
void launch_tiled_t(const GroupParams& gp, int tiles, bool ta, bool tb, DropWhere drop, cudaStream_t s) {
  if (ta) {
    if (tb)
      launch_tiled<LB, true, true>(gp, tiles, drop, s);
    else
      launch_tiled<LB, true, false>(gp, tiles, drop, s);
  } else {
    if (tb)
      launch_tiled<LB, false, true>(gp, tiles, drop, s);
    else
      launch_tiled<LB, false, false>(gp, tiles, drop, s);
  }
}

// C = beta·C where k == 0 or alpha == 0 (the product contributes nothing).
__global__ void scale_matrix_kernel(float* c, int64_t m, int64_t n, int64_t ldc, float beta) {
  int64_t total = m * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t r = i / n, col = i % n;
    float* p = c + r * ldc + col;
    *p = beta == 0.f ? 0.f : beta * *p;
  }
}

// Converts a rows×cols f32 matrix (leading dimension ld) to contiguous bf16 or f16 bits.
// f16 saturates finite values at ±65504 instead of overflowing to infinity.
template <bool BF16>
__global__ void to_half_kernel(uint16_t* dst, const float* src, int64_t rows, int64_t cols, int64_t ld) {
  int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t r = i / cols, c = i % cols;
    float v = src[r * ld + c];
    if (BF16) {
      dst[i] = f32_to_bf16_bits(v);
    } else {
      if (v > 65504.f) v = 65504.f;
      if (v < -65504.f) v = -65504.f;
      dst[i] = f32_to_f16_bits(v);
    }
  }
}

}  // namespace

void grouped_gemm(Exec& ex, const GemmProblem* probs, int count, bool trans_a, bool trans_b, DType b_dtype,
                  DropWhere drop) {
  cudaStream_t s = enter(ex);
  for (int base = 0; base < count; base += kMaxGroups) {
    GroupParams gp{};
    int64_t tiles = 0;
    int c = 0;
    for (int i = base; i < count && c < kMaxGroups; i++) {
      const GemmProblem& P = probs[i];
      if (P.m <= 0 || P.n <= 0) continue;
      if (P.k <= 0 || P.alpha == 0.f) {  // nothing to multiply: C = beta·C
        if (P.beta != 1.f) {
          scale_matrix_kernel<<<grid_for(P.m * P.n, 256), 256, 0, s>>>(P.c, P.m, P.n, P.ldc, P.beta);
          check_launch("scale_matrix_kernel");
        }
        continue;
      }
      gp.p[c] = P;
      gp.tile_start[c] = int(tiles);
      tiles += ((P.m + BM - 1) / BM) * ((P.n + BN - 1) / BN);
      if (tiles > INT_MAX) throw Error("gemm: problem too large for the tiled kernel (more than 2^31 tiles)");
      c++;
    }
    if (c == 0) continue;
    gp.tile_start[c] = int(tiles);
    gp.count = c;
    switch (b_dtype) {
      case DType::F32: launch_tiled_t<LoadF32>(gp, int(tiles), trans_a, trans_b, drop, s); break;
      case DType::BF16: launch_tiled_t<LoadBF16>(gp, int(tiles), trans_a, trans_b, drop, s); break;
      case DType::F16: launch_tiled_t<LoadF16>(gp, int(tiles), trans_a, trans_b, drop, s); break;
      default: throw Error(std::string("gemm: B must be f32, bf16 or f16, got ") + dtype_name(b_dtype));
    }
    check_launch("tiled_gemm_kernel");
  }
}

void gemm(Exec& ex, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, WeightRef b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (dtype_quantized(b.dtype))
    throw Error(std::string("gemm: a ") + dtype_name(b.dtype) + " (quantized) base weight runs on CPU devices only");
  if (m <= 0 || n <= 0) return;
  cudaStream_t s = enter(ex);
  CudaBackend& be = backend_of(ex);
  bool fits_int = m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX;
  void* h = (k > 0 && fits_int) ? be.cublas_handle() : nullptr;
  if (h) {
    const Cublas* cb = cublas_library(nullptr);
    int op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t st;
    if (b.dtype == DType::F32) {
      st = cb->gemm_ex(h, op_b, op_a, int(n), int(m), int(k), &alpha, b.ptr, kCudaR32F, int(ldb), a, kCudaR32F,
                       int(lda), &beta, c, kCudaR32F, int(ldc),
                       be.use_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    } else {
      // The activations in the weights' 16-bit type, contiguous: stored shape rows×cols.
      int64_t rows = trans_a ? k : m, cols = trans_a ? m : k;
      Scratch a16(ex, size_t(rows * cols) * 2);
      bool bf = b.dtype == DType::BF16;
      if (bf)
        to_half_kernel<true><<<grid_for(rows * cols, 256), 256, 0, s>>>(a16.as<uint16_t>(), a, rows, cols, lda);
      else
        to_half_kernel<false><<<grid_for(rows * cols, 256), 256, 0, s>>>(a16.as<uint16_t>(), a, rows, cols, lda);
      check_launch("to_half_kernel");
      int t16 = bf ? kCudaR16BF : kCudaR16F;
      st = cb->gemm_ex(h, op_b, op_a, int(n), int(m), int(k), &alpha, b.ptr, t16, int(ldb), a16.as<uint16_t>(), t16,
                       int(cols), &beta, c, kCudaR32F, int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (st != 0) throw Error("cublasGemmEx: " + status_text(cb, st));
    return;
  }
  GemmProblem p{a, b.ptr, c, lda, ldb, ldc, m, n, k, alpha, beta};  // no dropout
  grouped_gemm(ex, &p, 1, trans_a, trans_b, b.dtype, kDropNone);
}

}  // namespace mlora::cuda
