// Float32 matrix-vector products for a float decoder's few-row steps, AVX2 + FMA or AVX-512. Included by int8_gemv.cpp
// after attention_one.h (load8, sum8).
//
// torch's small-batch matmul (either F.linear or weight @ x.T) read a musicgen-small step's 1.44 GB of fp32
// weights at ~10 GB/s on the AVX2 EPYC, 2.7x the time of a plain streaming read of the same bytes. This reads
// each weight row once for up to 4 rows of x, two FMA chains per row, in chunks the elastic pool shares out.
// y[m, o] = sum8(a + b) over 16-float steps, then the tail in order: float rounding differs from torch's.
#pragma once

namespace {

#ifdef MUSICGEN_HAVE_AVX2_OPS
template <int M>
void gemv_f32_rows(const float* x, int64_t in, const float* w, int64_t o0, int64_t o1, float* y, int64_t out) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* row = w + o * in;
    __m256 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(row + i) + 2048, _MM_HINT_T0);
      const __m256 w0 = _mm256_loadu_ps(row + i), w1 = _mm256_loadu_ps(row + i + 8);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * in + i), a[m]);
        b[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * in + i + 8), b[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float total = sum8(_mm256_add_ps(a[m], b[m]));
      for (int64_t j = i; j < in; ++j) total += row[j] * x[m * in + j];
      y[m * out + o] = total;
    }
  }
}
#endif

#ifdef MUSICGEN_HAVE_VNNI
// The same with 16 lanes: two chains of 16 per row, both lines of every 128 bytes prefetched into L2 4 KB ahead
// (as the int8 kernel); y[m, o] = the two halves of (a + b) added, then sum8's order, then the tail in order.
template <int M>
void gemv_f32_rows16(const float* x, int64_t in, const float* w, int64_t o0, int64_t o1, float* y, int64_t out) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* row = w + o * in;
    __m512 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + i) + 4096, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(row + i) + 4096 + 64, _MM_HINT_T1);
      const __m512 w0 = _mm512_loadu_ps(row + i), w1 = _mm512_loadu_ps(row + i + 16);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * in + i), a[m]);
        b[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * in + i + 16), b[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m512 sum = _mm512_add_ps(a[m], b[m]);
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1));
      float total = sum8(_mm256_add_ps(_mm512_castps512_ps256(sum), high));
      for (int64_t j = i; j < in; ++j) total += row[j] * x[m * in + j];
      y[m * out + o] = total;
    }
  }
}
#endif

// x (..., in) float32 @ weight (out, in) float32 contiguous -> (..., out). Rows in groups of up to 4.
torch::Tensor linear_f32(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(int4_isa() != "none", "float32 kernel built without AVX2");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32 &&
              weight.dim() == 2 && weight.is_contiguous() && x.size(-1) == weight.size(1),
              "linear_f32: float32 x (..., in) and a contiguous float32 weight (out, in)");
  const int64_t in = weight.size(1), out = weight.size(0);
  auto flat = x.reshape({-1, in}).contiguous();
  const int64_t rows = flat.size(0);
  auto y = torch::empty({rows, out}, flat.options());
#ifdef MUSICGEN_HAVE_AVX2_OPS
  const float* xp = flat.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto body = [&](int64_t o0, int64_t o1) {
    for_row_groups<4>(rows, [&](int64_t m, auto group) {
      constexpr int M = decltype(group)::value;
#ifdef MUSICGEN_HAVE_VNNI
      gemv_f32_rows16<M>(xp + m * in, in, wp, o0, o1, yp + m * out, out);
#else
      gemv_f32_rows<M>(xp + m * in, in, wp, o0, o1, yp + m * out, out);
#endif
    });
  };
  musicgen::ElasticPool::instance().run(out, std::max<int64_t>(1, (64 * 1024) / (in * 4)), body);
#endif
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.view(shape);
}

}  // namespace
