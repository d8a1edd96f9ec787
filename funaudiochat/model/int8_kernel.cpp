// Weight-only int8 products for CPU decoding: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k].
//
// x [M, K] fp32 (a decode step's few rows), q [N, K] int8, scale [N] fp32 -> y [M, N] fp32. Each weight row is read
// once for all M rows (4 rows of x at a time share a pass over it while it sits in L1), converted to fp32 in
// registers, and multiplied into two fp32 accumulators per row of x: two independent FMA chains hide the FMA's
// latency, which bounds a single-accumulator reduction (inductor's product-and-sum) on small CPUs. Built by
// model/int8_kernel.py for one instruction set (FAC_NS names the op's namespace: one per build).
#include <ATen/Parallel.h>
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

// The rows [0, ROWS) of x (row stride K) times one weight row w -> y[r * ldy], r < ROWS.
template <int ROWS>
inline void rows_times_weight_row(const float* x, int64_t K, const int8_t* w, float s, float* y, int64_t ldy) {
  int64_t k = 0;
  float sums[ROWS];
#if defined(__AVX512F__)
  __m512 acc0[ROWS], acc1[ROWS];
  _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    if (k % 64 == 0) _mm_prefetch((const char*)(w + k + PREFETCH_AHEAD), _MM_HINT_T1);  // (once per cache line)
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) {
      acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k), w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k + 16), w1, acc1[r]);
    }
  }
  _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
#elif defined(__AVX2__)
  __m256 acc0[ROWS], acc1[ROWS];
  _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    if (k % 64 == 0) _mm_prefetch((const char*)(w + k + PREFETCH_AHEAD), _MM_HINT_T1);
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 8))));
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) {
      acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), w0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k + 8), w1, acc1[r]);
    }
  }
  _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; ++r) {
    __m256 v = _mm256_add_ps(acc0[r], acc1[r]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    sums[r] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
#else
  for (int r = 0; r < ROWS; ++r) sums[r] = 0.0f;
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
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
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
