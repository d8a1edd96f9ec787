// Whisper's log mel spectrum, vectorised across frames (`log_mel`):
//   out[m, t] = log10(max(sum_k filters[m, k] |rfft(window * frame_t)[k]|^2, 1e-10))
// wav [S] fp32, frame t = wav[start + 160 t + j], j < 400, reflected at both ends (index -i reads i, S - 1 + i
// reads S - 1 - i), T frames -> out [M, T] fp32; `floor_and_scale_` then applies the clip's max - 8 floor and the
// (x + 4) / 4 scale in one pass. A generic FFT library transforms one frame at a time and shuffles data inside its
// vectors; here each of a vector's LANES lanes holds a different frame, so the 400-point transform is plain scalar
// code run on LANES frames at once (no shuffles), and each mel row of LANES frames is one contiguous store into out.
//
// The 400-point real FFT is a 200-point complex FFT of z[n] = x[2n] + i x[2n+1] (Stockham passes of radix 8, 5, 5,
// so the result comes out in natural order), then the split X[k] = (Z[k] + conj Z[200-k]) / 2
// - i/2 e^(-2 pi i k / 400) (Z[k] - conj Z[200-k]) for k = 0..200. Built by audio/mel_kernel.py (FAC_NS names the
// op's namespace: one per instruction set).
#include "native_parallel.h"
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <immintrin.h>

namespace {

constexpr int N_FFT = 400, HOP = 160, HALF = N_FFT / 2, BINS = HALF + 1;
constexpr int RADICES[] = {8, 5, 5};  // 8 * 5 * 5 = HALF
constexpr int PASSES = 3;

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int LANES = 16;
inline Vec set1(float a) { return _mm512_set1_ps(a); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }   // a * b + c
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); } // c - a * b
inline Vec load(const float* p) { return _mm512_load_ps(p); }
inline Vec loadu(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_store_ps(p, v); }
inline void storeu(float* p, Vec v) { _mm512_storeu_ps(p, v); }
using Index = __m512i;
inline Vec gather(const float* base, Index offsets) { return _mm512_i32gather_ps(offsets, base, 4); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec reciprocal(Vec b) {  // 14-bit estimate and one Newton step: 1 / b to about 2^-23
  Vec r = _mm512_rcp14_ps(b);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.f)));
}
// x = 2^e m with m in [sqrt(1/2), sqrt(2)) (x positive and normal) -> e as a float; m through `mantissa`
inline Vec split_exponent(Vec x, Vec* mantissa) {
  Vec e = _mm512_getexp_ps(x);                                   // floor(log2 x)
  Vec m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
  __mmask16 big = _mm512_cmp_ps_mask(m, set1(1.41421356f), _CMP_GT_OQ);
  *mantissa = _mm512_mask_mul_ps(m, big, m, set1(0.5f));
  return _mm512_mask_add_ps(e, big, e, set1(1.f));
}
#elif defined(__AVX2__)
using Vec = __m256;
constexpr int LANES = 8;
inline Vec set1(float a) { return _mm256_set1_ps(a); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline Vec load(const float* p) { return _mm256_load_ps(p); }
inline Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_store_ps(p, v); }
inline void storeu(float* p, Vec v) { _mm256_storeu_ps(p, v); }
using Index = __m256i;
inline Vec gather(const float* base, Index offsets) { return _mm256_i32gather_ps(base, offsets, 4); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec reciprocal(Vec b) {  // 12-bit estimate and one Newton step: 1 / b to about 2^-22
  Vec r = _mm256_rcp_ps(b);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(b, r, _mm256_set1_ps(2.f)));
}
inline Vec split_exponent(Vec x, Vec* mantissa) {
  __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  Vec m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFF)),
                                              _mm256_set1_epi32(0x3F800000)));  // [1, 2)
  Vec big = _mm256_cmp_ps(m, set1(1.41421356f), _CMP_GT_OQ);
  *mantissa = _mm256_blendv_ps(m, mul(m, set1(0.5f)), big);
  return add(_mm256_cvtepi32_ps(e), _mm256_and_ps(big, set1(1.f)));
}
#else
#error "the mel kernel is built for AVX-512 or AVX2 only"
#endif

struct Complex {
  Vec re, im;
};
inline Complex cadd(Complex a, Complex b) { return {add(a.re, b.re), add(a.im, b.im)}; }
inline Complex csub(Complex a, Complex b) { return {sub(a.re, b.re), sub(a.im, b.im)}; }
inline Complex cmul(Complex a, float wr, float wi) {  // a * (wr + i wi)
  Vec r = set1(wr), i = set1(wi);
  return {fnmadd(a.im, i, mul(a.re, r)), fmadd(a.re, i, mul(a.im, r))};
}
inline Complex minus_i(Complex a) { return {a.im, sub(set1(0.f), a.re)}; }  // -i * a

// log10(max(x, 1e-10)) for x >= 0: log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^11
// (the next term is below 1e-10 of the sum): fp32 rounding of the result, as a library log is.
inline Vec log10_clamped(Vec x) {
  Vec m, e = split_exponent(vmax(x, set1(1e-10f)), &m);
  Vec s = mul(sub(m, set1(1.f)), reciprocal(add(m, set1(1.f)))), s2 = mul(s, s);
  Vec series = fmadd(s2, set1(1.f / 11), set1(1.f / 9));
  series = fmadd(s2, series, set1(1.f / 7));
  series = fmadd(s2, series, set1(1.f / 5));
  series = fmadd(s2, series, set1(1.f / 3));
  series = fmadd(s2, series, set1(1.f));
  Vec ln_m = mul(add(s, s), series);
  return fmadd(e, set1(0.301029995663981f), mul(ln_m, set1(0.434294481903252f)));  // e log10(2) + ln(m) log10(e)
}

// Twiddles of every pass (cos, sin of -2 pi q k / (p r)), and of the real split, computed once in double.
struct Tables {
  std::vector<float> pass[PASSES][2];  // [pass][re|im][q * p + k]
  std::vector<float> split[2];         // [re|im][k]: e^(-2 pi i k / 400)
  Tables() {
    int p = 1;
    for (int s = 0; s < PASSES; ++s) {
      int r = RADICES[s];
      for (int part = 0; part < 2; ++part) pass[s][part].resize(r * p);
      for (int q = 0; q < r; ++q)
        for (int k = 0; k < p; ++k) {
          double angle = -2.0 * M_PI * q * k / (p * r);
          pass[s][0][q * p + k] = (float)std::cos(angle);
          pass[s][1][q * p + k] = (float)std::sin(angle);
        }
      p *= r;
    }
    for (int part = 0; part < 2; ++part) split[part].resize(BINS);
    for (int k = 0; k < BINS; ++k) {
      double angle = -2.0 * M_PI * k / N_FFT;
      split[0][k] = (float)std::cos(angle);
      split[1][k] = (float)std::sin(angle);
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// The r-point DFT of u[0..r) in place (forward: e^(-2 pi i p q / r)).
template <int R>
inline void small_dft(Complex* u) {
  if constexpr (R == 4) {
    Complex s02 = cadd(u[0], u[2]), d02 = csub(u[0], u[2]), s13 = cadd(u[1], u[3]), d13 = minus_i(csub(u[1], u[3]));
    u[0] = cadd(s02, s13);
    u[2] = csub(s02, s13);
    u[1] = cadd(d02, d13);
    u[3] = csub(d02, d13);
  } else if constexpr (R == 8) {  // two 4-point DFTs (even, odd inputs), joined by the twiddles e^(-i pi k / 4)
    Complex e[4] = {u[0], u[2], u[4], u[6]}, o[4] = {u[1], u[3], u[5], u[7]};
    small_dft<4>(e);
    small_dft<4>(o);
    const Vec r = set1(0.70710678118654752f);
    o[1] = {mul(add(o[1].re, o[1].im), r), mul(sub(o[1].im, o[1].re), r)};  // (1 - i) / sqrt 2
    o[2] = minus_i(o[2]);
    o[3] = {mul(sub(o[3].im, o[3].re), r), mul(add(o[3].re, o[3].im), sub(set1(0.f), r))};  // (-1 - i) / sqrt 2
    for (int k = 0; k < 4; ++k) {
      u[k] = cadd(e[k], o[k]);
      u[k + 4] = csub(e[k], o[k]);
    }
  } else {  // R == 5
    const float c1 = (float)std::cos(2 * M_PI / 5), c2 = (float)std::cos(4 * M_PI / 5);
    const float s1 = (float)std::sin(2 * M_PI / 5), s2 = (float)std::sin(4 * M_PI / 5);
    Complex t1 = cadd(u[1], u[4]), t2 = cadd(u[2], u[3]), t3 = csub(u[1], u[4]), t4 = csub(u[2], u[3]);
    Complex a1 = {fmadd(set1(c2), t2.re, fmadd(set1(c1), t1.re, u[0].re)),
                  fmadd(set1(c2), t2.im, fmadd(set1(c1), t1.im, u[0].im))};
    Complex a2 = {fmadd(set1(c1), t2.re, fmadd(set1(c2), t1.re, u[0].re)),
                  fmadd(set1(c1), t2.im, fmadd(set1(c2), t1.im, u[0].im))};
    Complex b1 = {fmadd(set1(s2), t4.re, mul(set1(s1), t3.re)), fmadd(set1(s2), t4.im, mul(set1(s1), t3.im))};
    Complex b2 = {fnmadd(set1(s1), t4.re, mul(set1(s2), t3.re)), fnmadd(set1(s1), t4.im, mul(set1(s2), t3.im))};
    u[0] = cadd(u[0], cadd(t1, t2));
    Complex ib1 = minus_i(b1), ib2 = minus_i(b2);  // y1 = a1 - i b1, y4 = a1 + i b1 (and so for 2, 3)
    u[1] = cadd(a1, ib1);
    u[4] = csub(a1, ib1);
    u[2] = cadd(a2, ib2);
    u[3] = csub(a2, ib2);
  }
}

// One Stockham pass of radix R over HALF complex vectors (src -> dst; dst in re and im planes, LANES floats per
// element): for i < HALF / R, k = i mod p: u_q = src(i + q HALF / R) * w^(q k), DFT_R(u) -> dst[(i - k) R + k + q p].
template <int R, typename Source>
void stockham_pass(Source src, float* dst_re, float* dst_im, int p, const float* w_re, const float* w_im) {
  constexpr int M = HALF / R;
  for (int i = 0; i < M; ++i) {
    int k = i % p, j = (i - k) * R + k;
    Complex u[R];
    for (int q = 0; q < R; ++q) {
      u[q] = src(i + q * M);
      if (q > 0 && p > 1) u[q] = cmul(u[q], w_re[q * p + k], w_im[q * p + k]);
    }
    small_dft<R>(u);
    for (int q = 0; q < R; ++q) {
      store(dst_re + (j + q * p) * LANES, u[q].re);
      store(dst_im + (j + q * p) * LANES, u[q].im);
    }
  }
}

// Sparse filter bank, row by row: the bins [first[m], first[m] + count[m]) of mel row m with their weights.
struct Filters {
  const int64_t* first;
  const int64_t* count;
  const int64_t* offset;  // into weights
  const float* weights;
  int64_t rows;
};

// LANES frames starting at frame t0 (n_valid <= LANES of them real) -> out[:, t0 : t0 + n_valid].
void frames_to_mel(const float* wav, int64_t samples, int64_t start, int64_t t0, int n_valid, const float* window,
                   const Filters& f, float* out, int64_t ld_out) {
  alignas(64) float a_re[HALF * LANES], a_im[HALF * LANES], b_re[HALF * LANES], b_im[HALF * LANES];
  alignas(64) float power[BINS * LANES];
  const Tables& t = tables();
  // lane l reads frame t0 + l (lanes past the valid frames repeat the last one). A block whose frames reach past
  // either end of the wave is copied out first, reflected, into `edge` (frame l at l * 400).
  const int64_t first_sample = start + t0 * HOP, last_sample = first_sample + (n_valid - 1) * HOP + N_FFT - 1;
  const bool inside = first_sample >= 0 && last_sample < samples;
  alignas(64) float edge[LANES * N_FFT];
  if (!inside)
    for (int l = 0; l < n_valid; ++l)
      for (int j = 0; j < N_FFT; ++j) {
        int64_t i = first_sample + l * HOP + j;
        edge[l * N_FFT + j] = wav[i < 0 ? -i : i >= samples ? 2 * (samples - 1) - i : i];
      }
  const float* base = inside ? wav + first_sample : edge;
  const int stride = inside ? HOP : N_FFT;
  alignas(64) int offsets[LANES];
  for (int l = 0; l < LANES; ++l) offsets[l] = (l < n_valid ? l : n_valid - 1) * stride;
  Index index;
  std::memcpy(&index, offsets, sizeof(index));
  auto frames = [&](int n) {  // z[n] = w[2n] x[2n] + i w[2n+1] x[2n+1], gathered across the lanes' frames
    return Complex{mul(gather(base + 2 * n, index), set1(window[2 * n])),
                   mul(gather(base + 2 * n + 1, index), set1(window[2 * n + 1]))};
  };
  auto plane = [](const float* re, const float* im) {
    return [=](int n) { return Complex{load(re + n * LANES), load(im + n * LANES)}; };
  };
  stockham_pass<8>(frames, b_re, b_im, 1, t.pass[0][0].data(), t.pass[0][1].data());
  stockham_pass<5>(plane(b_re, b_im), a_re, a_im, 8, t.pass[1][0].data(), t.pass[1][1].data());
  stockham_pass<5>(plane(a_re, a_im), b_re, b_im, 40, t.pass[2][0].data(), t.pass[2][1].data());
  // split: E = (Z[k] + conj Z[-k]) / 2, O = (Z[k] - conj Z[-k]) / 2, X[k] = E - i w^k O; |X[k]|^2 per bin
  const Vec half = set1(0.5f);
  for (int k = 0; k < BINS; ++k) {
    int kk = k % HALF, mk = (HALF - k) % HALF;
    Vec zr = load(b_re + kk * LANES), zi = load(b_im + kk * LANES);
    Vec cr = load(b_re + mk * LANES), ci = load(b_im + mk * LANES);  // Z[-k], conjugated below
    Complex e = {mul(add(zr, cr), half), mul(sub(zi, ci), half)};
    Complex o = {mul(sub(zr, cr), half), mul(add(zi, ci), half)};
    Complex x = cadd(e, minus_i(cmul(o, t.split[0][k], t.split[1][k])));
    store(power + k * LANES, fmadd(x.re, x.re, mul(x.im, x.im)));
  }
  alignas(64) float row[LANES];
  for (int64_t m = 0; m < f.rows; ++m) {
    Vec acc = set1(0.f);
    const float* w = f.weights + f.offset[m];
    for (int64_t j = 0; j < f.count[m]; ++j) acc = fmadd(set1(w[j]), load(power + (f.first[m] + j) * LANES), acc);
    acc = log10_clamped(acc);
    float* dst = out + m * ld_out + t0;
    if (n_valid == LANES) {
      storeu(dst, acc);
    } else {
      store(row, acc);
      for (int l = 0; l < n_valid; ++l) dst[l] = row[l];
    }
  }
}

// wav [S] fp32, start (sample of frame 0's first, may be negative: reflected), out [M, T] fp32 (rows of any stride),
// window [400], the filter bank row by row (first, count, offset [M] int64, weights fp32) -> out = log10 mel.
void log_mel(const at::Tensor& wav, int64_t start, at::Tensor out, const at::Tensor& window, const at::Tensor& first,
             const at::Tensor& count, const at::Tensor& offset, const at::Tensor& weights) {
  TORCH_CHECK(wav.dim() == 1 && wav.is_contiguous() && wav.scalar_type() == at::kFloat,
              "log_mel: wav must be a contiguous 1-D float32 tensor");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.scalar_type() == at::kFloat,
              "log_mel: out must be a float32 [mels, frames] tensor with contiguous rows");
  const int64_t n_frames = out.size(1), samples = wav.size(0);
  TORCH_CHECK(n_frames == 0 || (start > -samples && start + (n_frames - 1) * HOP + N_FFT - 1 < 2 * samples - 1),
              "log_mel: ", n_frames, " frames from sample ", start, " reach past what reflecting ", samples,
              " samples covers");
  TORCH_CHECK(window.numel() == N_FFT && window.is_contiguous() && window.scalar_type() == at::kFloat,
              "log_mel: window must hold 400 contiguous float32 values");
  for (const at::Tensor* t : {&first, &count, &offset})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == out.size(0) && t->is_contiguous() && t->scalar_type() == at::kLong,
                "log_mel: first, count and offset must be contiguous int64 [mels]");
  TORCH_CHECK(weights.is_contiguous() && weights.scalar_type() == at::kFloat, "log_mel: weights must be float32");
  Filters f{first.data_ptr<int64_t>(), count.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
            weights.data_ptr<float>(), out.size(0)};
  for (int64_t m = 0; m < f.rows; ++m)
    TORCH_CHECK(f.first[m] >= 0 && f.count[m] >= 0 && f.first[m] + f.count[m] <= BINS && f.offset[m] >= 0 &&
                    f.offset[m] + f.count[m] <= weights.numel(),
                "log_mel: mel row ", m, " reaches past the ", BINS, " bins or the weights");
  if (n_frames == 0) return;
  const float* x = wav.data_ptr<float>();
  const float* w = window.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t ld = out.stride(0);
  tables();  // built before the threads start
  int64_t blocks = (n_frames + LANES - 1) / LANES;
  fac::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t t0 = b * LANES;
      frames_to_mel(x, samples, start, t0, (int)std::min<int64_t>(LANES, n_frames - t0), w, f, y, ld);
    }
  });
}

// x fp32 contiguous, in place: (max(x, floor) + 4) / 4, computed as max(x, floor) / 4 + 1 (the same float: a
// quarter is exact), one pass where torch takes three.
void floor_and_scale_(at::Tensor x, double floor) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "floor_and_scale_: x must be contiguous float32");
  float* p = x.data_ptr<float>();
  const Vec f = set1((float)floor), quarter = set1(0.25f), one = set1(1.f);
  fac::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + LANES <= end; i += LANES) storeu(p + i, fmadd(vmax(loadu(p + i), f), quarter, one));
    for (; i < end; ++i) p[i] = std::max(p[i], (float)floor) * 0.25f + 1.f;
  });
}

}  // namespace

TORCH_LIBRARY(FAC_NS, m) {
  m.def("log_mel(Tensor wav, int start, Tensor(a!) out, Tensor window, Tensor first, Tensor count, Tensor offset, "
        "Tensor weights) -> ()");
  m.def("floor_and_scale_(Tensor(a!) x, float floor) -> ()");
}
TORCH_LIBRARY_IMPL(FAC_NS, CPU, m) {
  m.impl("log_mel", &log_mel);
  m.impl("floor_and_scale_", &floor_and_scale_);
}
