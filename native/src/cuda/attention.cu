// Causal attention over packed variable-length sequences with grouped-query heads,
// flash-style: keys and values stream through shared memory in tiles, each query row keeps a
// running max / sum (online softmax), so memory is linear in the sequence length and no T×T
// matrix ever exists. q[n, hq, d], k/v[n, hkv, d], out[n, hq, d], lse[hq, n] (log-sum-exp per
// row and head, saved so backward recomputes the softmax). cu_seqlens[nseq+1] are row offsets;
// row i attends to keys j with seq_start(i) <= j <= i; with a sliding window W > 0 also
// j > i - W (transformers' sliding-window mask), and a block's key range starts at its first
// row's window, so key tiles wholly outside the window are never loaded.
//
// Varlen without a host round trip: a block takes ROWS consecutive packed rows whatever
// sequences they belong to; its key range is [seq_start(first row), last row] and each row
// masks the keys outside its own sequence (the waste is at most one tile per sequence edge).
//
// Layout inside a block: LANES = D/EPL consecutive threads share one query (or key) row, lane l
// owning columns l, l+LANES, l+2·LANES, ... (conflict-free shared-memory reads); a dot product is
// EPL FMAs plus log2(LANES) shuffles.
//
// Backward (all written, =), deterministic, no atomics:
//   Dr[h, i] = Σ_c dout·out                                          (attn_rowdot_kernel)
//   dQ: query-major, recompute p = exp(s - lse), ds = p·(dout·v - Dr), dq = scale·Σ ds·k
//   dK, dV: key-major, one block per key tile and kv head, looping over the kv head's query
//   heads (GQA) and the query tiles after it: dv = Σ p·dout, dk = scale·Σ ds·q.
#include <type_traits>

#include "common.cuh"

namespace mlora::cuda {

namespace {

constexpr int kThreads = 128;

template <int D, int EPL>
struct Cfg {
  static constexpr int LANES = D / EPL;
  static constexpr int ROWS = kThreads / LANES;
  static constexpr int BK = (4096 / D) > 64 ? 64 : 4096 / D;  // keys (or queries) per shared tile
};

__device__ __forceinline__ void seq_bounds(const int32_t* cu, int64_t nseq, int64_t n, int64_t row, int64_t& start,
                                           int64_t& end) {
  int64_t lo = 0, hi = nseq - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  start = cu[lo];
  end = cu[lo + 1];
  // Invalid offsets (reported by attn_check_kernel): fall back to the row alone, never read
  // outside [0, n).
  if (start > row || start < 0) start = row;
  if (end <= row || end > n) end = row + 1;
}

template <int LANES>
__device__ __forceinline__ float lanes_sum(float v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Rows [first, first + TILE) of head h of two [n, heads, d] tensors into shared tiles; zeros
// past `end` (exclusive) and past d. The caller brackets it with __syncthreads().
template <int TILE, int D>
__device__ __forceinline__ void load_tiles(float (&as)[TILE][D], float (&bs)[TILE][D], const float* a, const float* b,
                                           int64_t first, int64_t end, int heads, int h, int d, int t) {
  for (int idx = t; idx < TILE * D; idx += kThreads) {
    int j = idx / D, c = idx % D;
    int64_t r = first + j;
    bool in = r < end && c < d;
    as[j][c] = in ? a[(r * heads + h) * int64_t(d) + c] : 0.f;
    bs[j][c] = in ? b[(r * heads + h) * int64_t(d) + c] : 0.f;
  }
}

// This lane's columns (lane, lane + LANES, ...) of one d-wide row into registers, zeros past d.
template <int EPL, int LANES>
__device__ __forceinline__ void load_lanes(float (&x)[EPL], const float* row, int lane, int d) {
#pragma unroll
  for (int e = 0; e < EPL; e++) {
    int c = e * LANES + lane;
    x[e] = c < d ? row[c] : 0.f;
  }
}

// Whether query row `row` (whose sequence starts at `start`) sees key `key`: causal, in its
// sequence, and inside the sliding window when there is one.
__device__ __forceinline__ bool sees(int64_t row, int64_t start, int64_t key, int64_t window) {
  return key >= start && key <= row && (window <= 0 || key > row - window);
}

// One thread's query row in a block of ROWS rows from r0 (clamped to n - 1 past the end, where
// `valid` is false), where the row's sequence starts, and the block's key range [kbeg, kend):
// from the first row's sequence start (or the oldest key its window sees) to the last row.
struct QueryBlock {
  int64_t row, rowc, start, kbeg, kend;
  bool valid;
};

__device__ __forceinline__ QueryBlock query_block(const int32_t* cu, int64_t nseq, int64_t n, int64_t r0, int lr,
                                                  int rows, int64_t window) {
  QueryBlock b;
  b.row = r0 + lr;
  b.valid = b.row < n;
  b.rowc = b.valid ? b.row : n - 1;
  int64_t end;
  seq_bounds(cu, nseq, n, b.rowc, b.start, end);
  seq_bounds(cu, nseq, n, r0, b.kbeg, end);
  if (window > 0) b.kbeg = max(b.kbeg, r0 - window + 1);  // older keys are outside every row's window
  b.kend = min(r0 + rows, n);                             // exclusive
  return b;
}

__global__ void attn_check_kernel(const int32_t* cu, int64_t nseq, int64_t n, DeviceError* err) {
  if (threadIdx.x != 0) return;
  if (cu[0] != 0) {
    report_error(err, kErrCuSeqlens, 0, cu[0], n);
    return;
  }
  for (int64_t i = 1; i <= nseq; i++)
    if (cu[i] < cu[i - 1] || cu[i] > n) {
      report_error(err, kErrCuSeqlens, i, cu[i], n);
      return;
    }
  if (cu[nseq] != n) report_error(err, kErrCuSeqlens, nseq, cu[nseq], n);
}

template <int D, int EPL>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(float* out, float* lse, const float* q, const float* k, const float* v, const int32_t* cu,
                    int64_t nseq, int64_t n, int hq, int hkv, int d, float scale, int64_t window) {
  using C = Cfg<D, EPL>;
  constexpr int LANES = C::LANES, ROWS = C::ROWS, BK = C::BK;
  __shared__ float Ks[BK][D];
  __shared__ float Vs[BK][D];
  int h = blockIdx.y, g = h / (hq / hkv);
  int t = threadIdx.x, lane = t % LANES;
  const QueryBlock qb = query_block(cu, nseq, n, int64_t(blockIdx.x) * ROWS, t / LANES, ROWS, window);

  float qv[EPL], o[EPL] = {};
  load_lanes<EPL, LANES>(qv, q + (qb.rowc * hq + h) * int64_t(d), lane, d);
  float m = -INFINITY, l = 0.f;
  for (int64_t kt = qb.kbeg; kt < qb.kend; kt += BK) {
    __syncthreads();
    load_tiles<BK, D>(Ks, Vs, k, v, kt, qb.kend, hkv, g, d, t);
    __syncthreads();
    float s[BK];
    float tmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK; j++) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < EPL; e++) dot = fmaf(qv[e], Ks[j][e * LANES + lane], dot);
      dot = lanes_sum<LANES>(dot);
      bool ok = qb.valid && sees(qb.row, qb.start, kt + j, window);
      s[j] = ok ? dot * scale : -INFINITY;
      tmax = fmaxf(tmax, s[j]);
    }
    if (tmax != -INFINITY) {  // no shuffles below: rows may diverge here
      float mnew = fmaxf(m, tmax);
      float corr = m == -INFINITY ? 0.f : expf(m - mnew);
      l *= corr;
#pragma unroll
      for (int e = 0; e < EPL; e++) o[e] *= corr;
#pragma unroll
      for (int j = 0; j < BK; j++) {
        float p = s[j] == -INFINITY ? 0.f : expf(s[j] - mnew);
        l += p;
#pragma unroll
        for (int e = 0; e < EPL; e++) o[e] = fmaf(p, Vs[j][e * LANES + lane], o[e]);
      }
      m = mnew;
    }
  }
  if (!qb.valid) return;
  float inv = l > 0.f ? 1.f / l : 0.f;
  float* orow = out + (qb.row * hq + h) * int64_t(d);
#pragma unroll
  for (int e = 0; e < EPL; e++) {
    int c = e * LANES + lane;
    if (c < d) orow[c] = o[e] * inv;
  }
  if (lane == 0) lse[int64_t(h) * n + qb.row] = l > 0.f ? m + logf(l) : 0.f;
}

// Dr[h, i] = Σ_c dout[i, h, c]·out[i, h, c]: one warp per (row, head).
__global__ void attn_rowdot_kernel(float* dr, const float* dout, const float* out, int64_t n, int hq, int d) {
  int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  int lane = threadIdx.x & 31;
  if (w >= n * hq) return;  // whole warps leave together
  int64_t row = w / hq;
  int h = int(w % hq);
  const float *a = dout + w * d, *b = out + w * d;
  float s = 0.f;
  for (int c = lane; c < d; c += 32) s = fmaf(a[c], b[c], s);
  s = warp_sum(s);
  if (lane == 0) dr[int64_t(h) * n + row] = s;
}

template <int D, int EPL>
__global__ void __launch_bounds__(kThreads)
    attn_dq_kernel(float* dq, const float* dout, const float* q, const float* k, const float* v, const float* lse,
                   const float* dr, const int32_t* cu, int64_t nseq, int64_t n, int hq, int hkv, int d, float scale,
                   int64_t window) {
  using C = Cfg<D, EPL>;
  constexpr int LANES = C::LANES, ROWS = C::ROWS, BK = C::BK;
  __shared__ float Ks[BK][D];
  __shared__ float Vs[BK][D];
  int h = blockIdx.y, g = h / (hq / hkv);
  int t = threadIdx.x, lane = t % LANES;
  const QueryBlock qb = query_block(cu, nseq, n, int64_t(blockIdx.x) * ROWS, t / LANES, ROWS, window);

  float qv[EPL], dov[EPL], acc[EPL] = {};
  int64_t base = (qb.rowc * hq + h) * int64_t(d);
  load_lanes<EPL, LANES>(qv, q + base, lane, d);
  load_lanes<EPL, LANES>(dov, dout + base, lane, d);
  float L = lse[int64_t(h) * n + qb.rowc], Dr = dr[int64_t(h) * n + qb.rowc];
  for (int64_t kt = qb.kbeg; kt < qb.kend; kt += BK) {
    __syncthreads();
    load_tiles<BK, D>(Ks, Vs, k, v, kt, qb.kend, hkv, g, d, t);
    __syncthreads();
    for (int j = 0; j < BK; j++) {
      float sd = 0.f, pd = 0.f;
#pragma unroll
      for (int e = 0; e < EPL; e++) {
        sd = fmaf(qv[e], Ks[j][e * LANES + lane], sd);
        pd = fmaf(dov[e], Vs[j][e * LANES + lane], pd);
      }
      sd = lanes_sum<LANES>(sd);
      pd = lanes_sum<LANES>(pd);
      bool ok = qb.valid && sees(qb.row, qb.start, kt + j, window);
      float p = ok ? expf(sd * scale - L) : 0.f;
      float ds = p * (pd - Dr);
#pragma unroll
      for (int e = 0; e < EPL; e++) acc[e] = fmaf(ds, Ks[j][e * LANES + lane], acc[e]);
    }
  }
  if (!qb.valid) return;
#pragma unroll
  for (int e = 0; e < EPL; e++) {
    int c = e * LANES + lane;
    if (c < d) dq[base + c] = acc[e] * scale;
  }
}

template <int D, int EPL>
__global__ void __launch_bounds__(kThreads)
    attn_dkdv_kernel(float* dk, float* dv, const float* dout, const float* q, const float* k, const float* v,
                     const float* lse, const float* dr, const int32_t* cu, int64_t nseq, int64_t n, int hq, int hkv,
                     int d, float scale, int64_t window) {
  using C = Cfg<D, EPL>;
  constexpr int LANES = C::LANES, ROWS = C::ROWS, BQ = C::BK;
  __shared__ float Qs[BQ][D];
  __shared__ float Os[BQ][D];  // dout
  __shared__ float Ls[BQ], Ds[BQ];
  int g = blockIdx.y, group = hq / hkv;
  int64_t k0 = int64_t(blockIdx.x) * ROWS;
  int t = threadIdx.x, lr = t / LANES, lane = t % LANES;
  int64_t key = k0 + lr;
  bool valid = key < n;
  int64_t keyc = valid ? key : n - 1;
  int64_t kstart, kseqend, dummy, qend;
  seq_bounds(cu, nseq, n, keyc, kstart, kseqend);
  seq_bounds(cu, nseq, n, min(k0 + ROWS, n) - 1, dummy, qend);       // queries end with the last key's sequence
  if (window > 0) qend = min(qend, min(k0 + ROWS, n) - 1 + window);  // later queries see none of these keys

  float kv[EPL], vv[EPL], dka[EPL] = {}, dva[EPL] = {};
  int64_t base = (keyc * hkv + g) * int64_t(d);
  load_lanes<EPL, LANES>(kv, k + base, lane, d);
  load_lanes<EPL, LANES>(vv, v + base, lane, d);
  for (int hi = 0; hi < group; hi++) {
    int h = g * group + hi;
    for (int64_t qt = k0; qt < qend; qt += BQ) {
      __syncthreads();
      load_tiles<BQ, D>(Qs, Os, q, dout, qt, qend, hq, h, d, t);
      for (int i = t; i < BQ; i += kThreads) {
        int64_t qrow = qt + i;
        Ls[i] = qrow < qend ? lse[int64_t(h) * n + qrow] : 0.f;
        Ds[i] = qrow < qend ? dr[int64_t(h) * n + qrow] : 0.f;
      }
      __syncthreads();
      for (int i = 0; i < BQ; i++) {
        float sd = 0.f, pd = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
          sd = fmaf(Qs[i][e * LANES + lane], kv[e], sd);
          pd = fmaf(Os[i][e * LANES + lane], vv[e], pd);
        }
        sd = lanes_sum<LANES>(sd);
        pd = lanes_sum<LANES>(pd);
        int64_t qrow = qt + i;
        // a query in [key, kseqend) is in the key's sequence, which starts at kstart
        bool ok = valid && qrow < kseqend && qrow < qend && sees(qrow, kstart, key, window);
        float p = ok ? expf(sd * scale - Ls[i]) : 0.f;
        float ds = p * (pd - Ds[i]);
#pragma unroll
        for (int e = 0; e < EPL; e++) {
          dva[e] = fmaf(p, Os[i][e * LANES + lane], dva[e]);
          dka[e] = fmaf(ds, Qs[i][e * LANES + lane], dka[e]);
        }
      }
    }
  }
  if (!valid) return;
#pragma unroll
  for (int e = 0; e < EPL; e++) {
    int c = e * LANES + lane;
    if (c < d) {
      dk[base + c] = dka[e] * scale;
      dv[base + c] = dva[e];
    }
  }
}

void check_args(int64_t nseq, int64_t n, int64_t hq, int64_t hkv, int64_t d, const char* what) {
  if (hq <= 0 || hkv <= 0 || hq % hkv != 0)
    throw Error(std::string(what) + ": heads (" + std::to_string(hq) + ") must be a positive multiple of kv heads (" +
                std::to_string(hkv) + ")");
  if (d <= 0 || d > 256)
    throw Error(std::string(what) + ": head_dim " + std::to_string(d) + " is not supported on CUDA (1..256)");
  if (n > 0 && nseq <= 0) throw Error(std::string(what) + ": no sequences (cu_seqlens needs nseq+1 >= 2 entries)");
  if (hq > 65535 || n > (int64_t(1) << 40)) throw Error(std::string(what) + ": too many heads or rows");
}

// Calls f(std::integral_constant<int, D>) with the padded head size for d.
template <typename F>
void with_head_dim(int64_t d, F&& f) {
  if (d <= 32)
    f(std::integral_constant<int, 32>{});
  else if (d <= 64)
    f(std::integral_constant<int, 64>{});
  else if (d <= 128)
    f(std::integral_constant<int, 128>{});
  else
    f(std::integral_constant<int, 256>{});
}

}  // namespace

void attention_forward(Exec& ex, float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* cu_seqlens, int64_t nseq, int64_t n, int64_t hq, int64_t hkv, int64_t d,
                       float scale, int64_t window) {
  check_args(nseq, n, hq, hkv, d, "attention_forward");
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  attn_check_kernel<<<1, 32, 0, s>>>(cu_seqlens, nseq, n, backend_of(ex).device_error());
  check_launch("attn_check_kernel");
  with_head_dim(d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    constexpr int EPL = D < 32 ? D : 32;
    using C = Cfg<D, EPL>;
    dim3 grid(unsigned((n + C::ROWS - 1) / C::ROWS), unsigned(hq));
    attn_fwd_kernel<D, EPL>
        <<<grid, kThreads, 0, s>>>(out, lse, q, k, v, cu_seqlens, nseq, n, int(hq), int(hkv), int(d), scale, window);
  });
  check_launch("attn_fwd_kernel");
}

void attention_backward(Exec& ex, float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* cu_seqlens, int64_t nseq,
                        int64_t n, int64_t hq, int64_t hkv, int64_t d, float scale, int64_t window) {
  check_args(nseq, n, hq, hkv, d, "attention_backward");
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  attn_check_kernel<<<1, 32, 0, s>>>(cu_seqlens, nseq, n, backend_of(ex).device_error());
  check_launch("attn_check_kernel");
  Scratch dr(ex, size_t(hq * n) * sizeof(float));
  attn_rowdot_kernel<<<grid_for(n * hq * 32, 256, INT32_MAX), 256, 0, s>>>(dr.as<float>(), dout, out, n, int(hq),
                                                                           int(d));
  check_launch("attn_rowdot_kernel");
  with_head_dim(d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    constexpr int EPL = D < 16 ? D : 16;
    using C = Cfg<D, EPL>;
    dim3 gq(unsigned((n + C::ROWS - 1) / C::ROWS), unsigned(hq));
    attn_dq_kernel<D, EPL><<<gq, kThreads, 0, s>>>(dq, dout, q, k, v, lse, dr.as<float>(), cu_seqlens, nseq, n, int(hq),
                                                   int(hkv), int(d), scale, window);
    check_launch("attn_dq_kernel");
    dim3 gk(unsigned((n + C::ROWS - 1) / C::ROWS), unsigned(hkv));
    attn_dkdv_kernel<D, EPL><<<gk, kThreads, 0, s>>>(dk, dv, dout, q, k, v, lse, dr.as<float>(), cu_seqlens, nseq, n,
                                                     int(hq), int(hkv), int(d), scale, window);
    check_launch("attn_dkdv_kernel");
  });
}

}  // namespace mlora::cuda
