// Weight-only int8 products for CPU decoding: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k].
//
// x [M, K] fp32 (a decode step's few rows), q [N, K] int8, scale [N] fp32 -> y [M, N] fp32. Each weight row is read
// once for all M rows (4 rows of x at a time share a pass over it while it sits in L1), converted to fp32 in
// registers, and multiplied into independent fp32 accumulators (FMA chains: 2 per row of x, 4 for a single row),
// which hide the FMA's latency that bounds a single-accumulator reduction (inductor's product-and-sum) on small
// CPUs. Built by model/int8_kernel.py for one instruction set (FAC_NS names the op's namespace: one per build).
#include "native_parallel.h"
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int TILE = 4;  // rows of x per pass over a weight row
// Weights are prefetched into L2 this far ahead of the FMAs: without it a core alternates between waiting for memory
// and converting, and streamed int8 weights at about 60 % of the rate it reads them (BENCHMARKS.md, "The int8 decode
// kernel"). Past the end of q it only touches the next bytes of the address space, which a prefetch never faults on.
constexpr int64_t PREFETCH_AHEAD = 4096;

// One vector type per build: LANES fp32 lanes, the int8 -> fp32 conversion of LANES weights, and a horizontal sum.
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int LANES = 16;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec widen(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
using Vec = __m256;
constexpr int LANES = 8;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec widen(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float sum(Vec v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif  // (a scalar build has no vector type: the tail loop of rows_times_weight_row does all of K)

// The rows [0, ROWS) of x (row stride K) times one weight row w -> y[r * ldy], r < ROWS.
template <int ROWS>
inline void rows_times_weight_row(const float* x, int64_t K, const int8_t* w, float s, float* y, int64_t ldy) {
  int64_t k = 0;
  float sums[ROWS] = {};
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int CHAINS = ROWS == 1 ? 4 : 2;  // accumulators per row; CHAINS * LANES weights per iteration
  Vec acc[ROWS][CHAINS];
  _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) for (int c = 0; c < CHAINS; ++c) acc[r][c] = zero();
  for (; k + CHAINS * LANES <= K; k += CHAINS * LANES) {
    _Pragma("GCC unroll 4") for (int c = 0; c < CHAINS; ++c) {
      if ((k + c * LANES) % 64 == 0) _mm_prefetch((const char*)(w + k + c * LANES + PREFETCH_AHEAD), _MM_HINT_T1);
      Vec wc = widen(w + k + c * LANES);  // LANES weights, converted once for all rows
      _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) {
        acc[r][c] = fmadd(load(x + r * K + k + c * LANES), wc, acc[r][c]);
      }
    }
  }
  _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) {
    Vec v = acc[r][0];
    for (int c = 1; c < CHAINS; ++c) v = add(v, acc[r][c]);
    sums[r] = sum(v);
  }
#endif
  for (int r = 0; r < ROWS; ++r) {
    float t = sums[r];
    for (int64_t j = k; j < K; ++j) t += x[r * K + j] * static_cast<float>(w[j]);  // the tail (or all, scalar)
    y[r * ldy] = t * s;
  }
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "int8_mm: x [M, K], q [N, K], scale [N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_mm: x and scale fp32, q int8");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(), "int8_mm: CPU tensors");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "int8_mm: shapes do not match");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous(), "int8_mm: contiguous tensors");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  fac::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = qp + n * K;
      int64_t m = 0;
      for (; m + TILE <= M; m += TILE) rows_times_weight_row<TILE>(xp + m * K, K, w, sp[n], yp + m * N + n, N);
      switch (M - m) {
        case 3: rows_times_weight_row<3>(xp + m * K, K, w, sp[n], yp + m * N + n, N); break;
        case 2: rows_times_weight_row<2>(xp + m * K, K, w, sp[n], yp + m * N + n, N); break;
        case 1: rows_times_weight_row<1>(xp + m * K, K, w, sp[n], yp + m * N + n, N); break;
        default: break;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(FAC_NS, m) { m.def("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(FAC_NS, CPU, m) { m.impl("int8_mm", &int8_mm); }
