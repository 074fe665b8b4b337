// Float matrix-vector products for a float decoder's few-row steps: float32 x against float32 or bfloat16 weights,
// AVX2 + FMA or AVX-512. Included by int8_gemv.cpp after attention_one.h (sum8).
//
// torch's small-batch matmul (either F.linear or weight @ x.T) read a musicgen-small step's 1.44 GB of fp32
// weights at ~10 GB/s on the AVX2 EPYC, 2.7x the time of a plain streaming read of the same bytes. This reads
// each weight row once for up to 4 rows of x, two FMA chains per row, in chunks the elastic pool shares out.
// y[m, o] = sum8(a + b) over 16-float steps, then the tail in order: float rounding differs from torch's.
// bfloat16 weights (a bfloat16 decoder on the CPU) are widened exactly to float32 as they are read, and the
// arithmetic stays float32, at half the bytes read (block16 / block32 below).
#pragma once

namespace {

// bfloat16 weights without a cross-lane widening per vector: a bfloat16 pair in a 32-bit lane is two float32 at
// once, the even element by a shift left of 16 and the odd one by clearing the low half. So each block of
// weights (16 with 8 lanes, 32 with 16) gives one vector of its even and one of its odd elements, and x comes
// split the same way (`split_pairs`): the first half of each block its even inputs, the second half its odd
// ones. The tail past the last whole block is x as it was. Float32 weights give a block's two halves as they
// are, against x as it is; either way y[m, o] = the two chains added and reduced, then the tail in order.
template <int Block>
void split_pairs(const float* x, int64_t rows, int64_t in, float* split) {
  const int64_t whole = in / Block * Block;
  for (int64_t m = 0; m < rows; ++m) {
    const float* from = x + m * in;
    float* to = split + m * in;
    for (int64_t i = 0; i < whole; i += Block)
      for (int64_t l = 0; l < Block / 2; ++l) {
        to[i + l] = from[i + 2 * l];
        to[i + Block / 2 + l] = from[i + 2 * l + 1];
      }
    for (int64_t i = whole; i < in; ++i) to[i] = from[i];
  }
}

#ifdef MUSICGEN_HAVE_AVX2_OPS
// A block of 16 weights as two vectors of 8: its halves (float32) or its even and odd elements (bfloat16).
inline void block16(const float* p, __m256& first, __m256& second) {
  first = _mm256_loadu_ps(p);
  second = _mm256_loadu_ps(p + 8);
}
inline void block16(const at::BFloat16* p, __m256& first, __m256& second) {
  const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  first = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  second = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int M, typename W>
void gemv_f32_rows(const float* x, int64_t in, const W* w, int64_t o0, int64_t o1, float* y, int64_t out) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* row = w + o * in;
    __m256 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(row + i) + 2048, _MM_HINT_T0);
      __m256 w0, w1;
      block16(row + i, w0, w1);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * in + i), a[m]);
        b[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * in + i + 8), b[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float total = sum8(_mm256_add_ps(a[m], b[m]));
      for (int64_t j = i; j < in; ++j) total += static_cast<float>(row[j]) * x[m * in + j];
      y[m * out + o] = total;
    }
  }
}
#endif

#ifdef MUSICGEN_HAVE_VNNI
// The same with 16 lanes, blocks of 32: every weight line prefetched into L2 4 KB ahead (as the int8 kernel);
// y[m, o] = the two halves of (a + b) added, then sum8's order, then the tail in order.
inline void block32(const float* p, __m512& first, __m512& second) {
  first = _mm512_loadu_ps(p);
  second = _mm512_loadu_ps(p + 16);
}
inline void block32(const at::BFloat16* p, __m512& first, __m512& second) {
  const __m512i pairs = _mm512_loadu_si512(p);
  first = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  second = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int M, typename W>
void gemv_f32_rows16(const float* x, int64_t in, const W* w, int64_t o0, int64_t o1, float* y, int64_t out) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* row = w + o * in;
    __m512 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + i) + 4096, _MM_HINT_T1);
      if constexpr (sizeof(W) == 4) _mm_prefetch(reinterpret_cast<const char*>(row + i) + 4096 + 64, _MM_HINT_T1);
      __m512 w0, w1;
      block32(row + i, w0, w1);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * in + i), a[m]);
        b[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * in + i + 16), b[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m512 sum = _mm512_add_ps(a[m], b[m]);
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1));
      float total = sum8(_mm256_add_ps(_mm512_castps512_ps256(sum), high));
      for (int64_t j = i; j < in; ++j) total += static_cast<float>(row[j]) * x[m * in + j];
      y[m * out + o] = total;
    }
  }
}
#endif

// x (rows, in) float32 @ weight (out, in) float32 or bfloat16, contiguous -> y (rows, out) float32. Rows in
// groups of up to 4; bfloat16 weights take x split into even and odd halves per block (above).
template <typename W>
void linear_float_into(const float* xp, int64_t rows, int64_t in, const W* wp, int64_t out, float* yp) {
#ifdef MUSICGEN_HAVE_AVX2_OPS
#ifdef MUSICGEN_HAVE_VNNI
  constexpr int kBlock = 32;
#else
  constexpr int kBlock = 16;
#endif
  std::vector<float> split;
  if constexpr (!std::is_same_v<W, float>) {
    split.resize(rows * in);
    split_pairs<kBlock>(xp, rows, in, split.data());
    xp = split.data();
  }
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
  musicgen::ElasticPool::instance().run(out, std::max<int64_t>(1, (64 * 1024) / (in * sizeof(W))), body);
#endif
}

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(int4_isa() != "none", "float32 kernel built without AVX2");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 &&
              (weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16) &&
              weight.dim() == 2 && weight.is_contiguous() && x.size(-1) == weight.size(1),
              "linear_f32: float32 x (..., in) and a contiguous float32 or bfloat16 weight (out, in)");
  const int64_t in = weight.size(1), out = weight.size(0);
  auto flat = x.reshape({-1, in}).contiguous();
  const int64_t rows = flat.size(0);
  auto y = torch::empty({rows, out}, flat.options());
  if (weight.scalar_type() == torch::kBFloat16)
    linear_float_into(flat.data_ptr<float>(), rows, in, weight.data_ptr<at::BFloat16>(), out, y.data_ptr<float>());
  else
    linear_float_into(flat.data_ptr<float>(), rows, in, weight.data_ptr<float>(), out, y.data_ptr<float>());
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.view(shape);
}

}  // namespace
