// Attention for one query per (row, head): a decode step's self- and cross-attention, AVX2 + FMA, or AVX-512.
//
// torch's CPU flash attention is built for blocks of queries; with one query it read the KV cache at ~5 GB/s
// per thread inside a musicgen-small step (600 frames of context: ~26 ms of CPU per step for 118 MB) and cost
// 20-90 us per call even over a few keys. This streams each key and value row once, at memory speed.
//
// Arithmetic, for each (row, head) on its own (so any split of rows and heads gives the same bits):
//   s[j] = dot(q, k[j]) * scale + mask[j]     (dot: 8 or 16 lanes of FMA over head_dim, then a fixed pairwise sum
//                                             that does not depend on how many keys are summed together)
//   p[j] = exp(s[j] - max s)                  (exp_ps below, ~1 ulp)
//   out  = (sum_j p[j] v[j]) * (1 / sum_j p[j])
// scale = 1 / sqrt(head_dim). Keys and values are float32 or bfloat16 (widened exactly); the output is float32.
// Where head_dim is not a multiple of 8, or without AVX2, scaled_dot_product_attention runs instead.
#pragma once

#include <torch/extension.h>

#include "elastic_pool.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

#ifdef MUSICGEN_HAVE_AVX2_OPS
// exp(x) for float: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial for e^r, then 2^n into the exponent.
// Below -87.3 (where e^x leaves the normal range) the result is 0: a masked key (mask = float's minimum)
// weighs exactly nothing.
inline __m256 exp_ps(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

// 8 floats from float32 or bfloat16 (bfloat16 is the top half of a float32: exact).
template <typename T>
inline __m256 load8(const T* p);
template <>
inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

// 8 floats from 8 int8 (an int8 cache; its scale is applied after the dot product).
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float sum8(__m256 v) {  // ((0+1) + (2+3)) + ((4+5) + (6+7)): the order sum8x4 gives each of its four
  const __m256 pairs = _mm256_hadd_ps(v, v);
  const __m256 quads = _mm256_hadd_ps(pairs, pairs);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
}

// The four sums of a0..a3, each in sum8's order, in one pass (three hadds instead of four reductions).
inline __m128 sum8x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 quads = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1));
}
// The vector operations of one width: Lanes8 (AVX2) and Lanes16 (AVX-512, where the build has it), so that one
// body below serves both.
struct Lanes8 {
  using V = __m256;
  static constexpr int n = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const at::BFloat16* p) { return load8(p); }
  static V load(const int8_t* p) { return load8(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V exp(V x) { return exp_ps(x); }
  static float sum(V v) { return sum8(v); }
  static __m128 sum4(V a0, V a1, V a2, V a3) { return sum8x4(a0, a1, a2, a3); }
};

#ifdef MUSICGEN_HAVE_VNNI
// exp_ps above on 16 lanes, op for op.
inline __m512 exp_ps16(__m512 x) {
  const __mmask16 too_small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~too_small), p, _mm512_castsi512_ps(exponent));
}

struct Lanes16 {
  using V = __m512;
  static constexpr int n = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const at::BFloat16* p) {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
  }
  static V load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V exp(V x) { return exp_ps16(x); }
  static __m256 halves(V v) {  // lanes i and i + 8 added
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));  // AVX-512F only
    return _mm256_add_ps(_mm512_castps512_ps256(v), high);
  }
  static float sum(V v) { return sum8(halves(v)); }  // the two halves added, then sum8's order
  static __m128 sum4(V a0, V a1, V a2, V a3) { return sum8x4(halves(a0), halves(a1), halves(a2), halves(a3)); }
};
#endif

// One (row, head) in lanes of L: q (d), keys/values (length rows of d, `stride` apart), mask (length or null),
// out (d); d a multiple of L::n, at most 128. An int8 cache comes with a scale per key and per value
// (key_scales, value_scales: length floats; null for a float cache): s[j] = (dot(q, k[j]) * key_scale[j]) *
// scale + mask[j], and the values are weighed by p[j] * value_scale[j].
template <class L, typename Q, typename T>
void attend_head(const Q* q, const T* keys, const T* values, int64_t stride, const float* mask, int64_t length,
                 int64_t d, float scale, float* out, std::vector<float>& scores, const float* key_scales = nullptr,
                 const float* value_scales = nullptr) {
  using V = typename L::V;
  const int64_t vectors = d / L::n;
  scores.resize(length);
  V qv[128 / L::n];
  for (int64_t c = 0; c < vectors; ++c) qv[c] = L::load(q + L::n * c);
  float peak = -std::numeric_limits<float>::infinity();
  auto finish = [&](int64_t j, float s) {
    if (key_scales) s *= key_scales[j];
    s *= scale;
    if (mask) s += mask[j];
    scores[j] = s;
    peak = std::max(peak, s);
  };
  // Keys and values stream from memory (a step reads the whole cache once): fetch ~6 KB ahead into L2, every
  // line of the next keys (the hardware prefetcher retrains at each 4 KB page and each (row, head) is a new
  // stream), and the first values while the keys are read. On the Xeon an int4 step at 600 frames of context
  // took 19.9 ms with 2 KB against 23.6 without; at 1000 frames 6 KB gave 22.1-22.9 ms against 23.1-24.1 for
  // 2 KB (12 KB: the same as 6).
  const int64_t row_bytes = stride * static_cast<int64_t>(sizeof(T)), ahead = std::max<int64_t>(1, 6144 / row_bytes);
  auto prefetch_row = [&](const T* row) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  };
  for (int64_t j = 0; j < std::min(length, ahead); ++j) prefetch_row(values + j * stride);
  int64_t j0 = 0;
  for (; j0 + 4 <= length; j0 += 4) {  // four keys at once: four FMA chains in flight instead of one
    const T* k = keys + j0 * stride;
    for (int64_t j = j0 + ahead; j < std::min(length, j0 + ahead + 4); ++j) prefetch_row(keys + j * stride);
    V a0 = L::mul(qv[0], L::load(k)), a1 = L::mul(qv[0], L::load(k + stride));
    V a2 = L::mul(qv[0], L::load(k + 2 * stride)), a3 = L::mul(qv[0], L::load(k + 3 * stride));
    for (int64_t c = 1; c < vectors; ++c) {
      a0 = L::fmadd(qv[c], L::load(k + L::n * c), a0);
      a1 = L::fmadd(qv[c], L::load(k + stride + L::n * c), a1);
      a2 = L::fmadd(qv[c], L::load(k + 2 * stride + L::n * c), a2);
      a3 = L::fmadd(qv[c], L::load(k + 3 * stride + L::n * c), a3);
    }
    alignas(16) float sums[4];
    _mm_store_ps(sums, L::sum4(a0, a1, a2, a3));  // each as L::sum would give it, for the tail below
    for (int k = 0; k < 4; ++k) finish(j0 + k, sums[k]);
  }
  for (; j0 < length; ++j0) {  // the same chain per key as above, one key at a time
    const T* k = keys + j0 * stride;
    V acc = L::mul(qv[0], L::load(k));
    for (int64_t c = 1; c < vectors; ++c) acc = L::fmadd(qv[c], L::load(k + L::n * c), acc);
    finish(j0, L::sum(acc));
  }
  V total = L::zero();
  const V peaks = L::set1(peak);
  int64_t j = 0;
  for (; j + L::n <= length; j += L::n) {
    const V p = L::exp(L::sub(L::load(scores.data() + j), peaks));
    L::store(scores.data() + j, p);
    total = L::add(total, p);
  }
  if (j < length) {  // the tail through the same vector exp, padded with -inf (weight 0)
    float tail[L::n];
    for (int64_t t = 0; t < L::n; ++t) tail[t] = j + t < length ? scores[j + t] - peak : -std::numeric_limits<float>::infinity();
    const V p = L::exp(L::load(tail));
    L::store(tail, p);
    for (int64_t t = 0; j + t < length; ++t) scores[j + t] = tail[t];
    total = L::add(total, p);
  }
  const float inverse = 1.f / L::sum(total);
  V acc[128 / L::n];
  for (int64_t c = 0; c < vectors; ++c) acc[c] = L::zero();
  for (int64_t i = 0; i < length; ++i) {
    if (i + ahead < length) prefetch_row(values + (i + ahead) * stride);
    const V p = L::set1(value_scales ? scores[i] * value_scales[i] : scores[i]);
    const T* v = values + i * stride;
    for (int64_t c = 0; c < vectors; ++c) acc[c] = L::fmadd(p, L::load(v + L::n * c), acc[c]);
  }
  for (int64_t c = 0; c < vectors; ++c) L::store(out + L::n * c, L::mul(acc[c], L::set1(inverse)));
}

// One (row, head), in 16 lanes where the build has AVX-512 and d allows, else 8: q (d), keys/values (length
// rows of d, `stride` apart), mask (length or null), out (d); an int8 cache's scales (see attend_head). d a
// multiple of 8, at most 128.
template <typename Q, typename T>
void attend_one_head(const Q* q, const T* keys, const T* values, int64_t stride, const float* mask, int64_t length,
                     int64_t d, float scale, float* out, std::vector<float>& scores,
                     const float* key_scales = nullptr, const float* value_scales = nullptr) {
#ifdef MUSICGEN_HAVE_VNNI
  if (d % 16 == 0)
    return attend_head<Lanes16>(q, keys, values, stride, mask, length, d, scale, out, scores, key_scales,
                                value_scales);
#endif
  attend_head<Lanes8>(q, keys, values, stride, mask, length, d, scale, out, scores, key_scales, value_scales);
}

#endif

// One head vector of d floats to int8 in [-127, 127] and its scale (max |x| / 127; 0 for a zero vector), x ~
// q * scale, rounded half to even: an int8 cache's arithmetic, for the C++ step and the Python layers alike.
inline float quantize_vector(const float* x, int64_t d, int8_t* q) {
  float peak = 0.f;
  int64_t i = 0;
#if defined(MUSICGEN_HAVE_AVX2_OPS)
  __m256 peaks = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= d; i += 8) peaks = _mm256_max_ps(peaks, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, peaks);
  for (float lane : lanes) peak = std::max(peak, lane);  // max is exact in any order (a NaN lane is dropped...)
#endif
  for (; i < d; ++i) peak = std::max(peak, std::fabs(x[i]));
  for (i = 0; i < d; ++i)
    if (std::isnan(x[i])) peak = std::numeric_limits<float>::quiet_NaN();  // (...so NaN is looked for here)
  if (!(peak > 0.f)) {  // zero (or NaN: kept as a NaN scale, as the activation quantizer does)
    std::fill(q, q + d, int8_t{0});
    return peak == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = peak / 127.f, inverse = 1.f / scale;
  i = 0;
#if defined(MUSICGEN_HAVE_AVX2_OPS)
  // |x| * inverse <= 127 up to rounding: the rounded values fit, and the saturating packs cannot clip them.
  const __m256 inverses = _mm256_set1_ps(inverse);
  for (; i + 16 <= d; i += 16) {
    const __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inverses));
    const __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inverses));
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8);  // in order
    const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), bytes);
  }
#endif
  for (; i < d; ++i) q[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] * inverse), -127.f, 127.f));
  return scale;
}

// x (..., d) float32 -> (int8 of x's shape, scales (...)): kernel.quantize_kv, what the Python layers write into
// an int8 cache.
std::vector<torch::Tensor> quantize_kv(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() >= 1, "quantize_kv: float32 (..., head_dim)");
  const auto flat = x.contiguous();
  const int64_t d = x.size(-1), vectors = d ? flat.numel() / d : 0;
  auto q = at::empty(flat.sizes(), flat.options().dtype(torch::kInt8));
  auto shape = flat.sizes().vec();
  shape.pop_back();
  auto scales = at::empty(shape, flat.options());
  const float* xp = flat.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  for (int64_t v = 0; v < vectors; ++v) sp[v] = quantize_vector(xp + v * d, d, qp + v * d);
  return {q, scales};
}

// query (rows, heads, T, d); keys, values (rows, heads, length, d) with unit stride in d (a cache's slice);
// mask: additive float32 (rows, 1 or heads, 1, length) or none; causal_start >= 0: query t sees keys
// [0, causal_start + t] only (length == causal_start + T: a prefill chunk after causal_start cached
// positions), else every key. -> (rows, heads, T, d) float32. Each (row, head, query) is computed as the one
// query of a step would be, so a chunked prefill gives the bits of a one-shot prefill and of column-by-column
// steps alike.
torch::Tensor attend_one(const torch::Tensor& query, const torch::Tensor& keys, const torch::Tensor& values,
                         const c10::optional<torch::Tensor>& mask, int64_t causal_start,
                         const c10::optional<torch::Tensor>& key_scales,
                         const c10::optional<torch::Tensor>& value_scales) {
  const bool int8_cache = keys.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8_cache == (key_scales.has_value() && value_scales.has_value()),
              "attend_one: an int8 cache takes key_scales and value_scales (rows, heads, length), a float one none");
  if (int8_cache)
    TORCH_CHECK(key_scales->scalar_type() == torch::kFloat32 && value_scales->scalar_type() == torch::kFloat32 &&
                key_scales->dim() == 3 && key_scales->sizes() == value_scales->sizes() &&
                key_scales->size(0) == keys.size(0) && key_scales->size(1) == keys.size(1) &&
                key_scales->size(2) == keys.size(2) && key_scales->stride(2) == 1 && value_scales->stride(2) == 1,
                "attend_one: key_scales / value_scales float32 (rows, heads, length), unit stride in length");
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes() && keys.size(0) == query.size(0) &&
              keys.size(1) == query.size(1) && keys.size(3) == query.size(3),
              "attend_one: query (rows, heads, T, d), keys and values (rows, heads, length, d)");
  const int64_t rows = query.size(0), heads = query.size(1), queries = query.size(2), d = query.size(3);
  const int64_t length = keys.size(2);
  TORCH_CHECK(causal_start < 0 ? !mask || (mask->dim() == 4 && mask->size(2) == 1) : causal_start + queries == length && !mask,
              "attend_one: causal_start + queries must equal the keys' length (and take no mask); a mask is "
              "(rows, 1 or heads, 1, length)");
  bool fast = false;
#ifdef MUSICGEN_HAVE_AVX2_OPS
  fast = d % 8 == 0 && d <= 128 && length > 0 && keys.stride(3) == 1 && values.stride(3) == 1 &&
         keys.strides() == values.strides() && keys.scalar_type() == values.scalar_type() &&
         (keys.scalar_type() == torch::kFloat32 || keys.scalar_type() == torch::kBFloat16 || int8_cache) &&
         (!mask || (mask->scalar_type() == torch::kFloat32 && mask->size(0) == rows &&
                    (mask->size(1) == 1 || mask->size(1) == heads) && mask->size(3) == length));
#endif
  if (!fast) {
    TORCH_CHECK(!int8_cache, "attend_one: an int8 cache needs head_dim a multiple of 8 (at most 128) and AVX2");
    c10::optional<torch::Tensor> full_mask = mask;
    if (causal_start >= 0 && queries > 1)
      full_mask = at::ones({queries, length}, keys.options().dtype(torch::kBool)).tril(causal_start);
    auto out = at::scaled_dot_product_attention(query.to(keys.scalar_type()), keys, values, full_mask, 0.0, false,
                                                c10::nullopt, false);
    return out.to(torch::kFloat32);
  }
  auto out = at::empty({rows, heads, queries, d}, query.options().dtype(torch::kFloat32));
#ifdef MUSICGEN_HAVE_AVX2_OPS
  // A float cache sees q rounded to its dtype, as the Python path rounds it; an int8 cache, q as it is.
  const auto q = (int8_cache ? query.to(torch::kFloat32) : query.to(keys.scalar_type())).contiguous();
  const auto m = mask ? mask->contiguous() : torch::Tensor();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  auto run = [&](auto query_tag, auto cache_tag, int64_t u0, int64_t u1) {
    using Q = decltype(query_tag);
    using T = decltype(cache_tag);
    thread_local std::vector<float> scores;
    const Q* qp = reinterpret_cast<const Q*>(q.data_ptr());
    const T* kp = reinterpret_cast<const T*>(keys.data_ptr());
    const T* vp = reinterpret_cast<const T*>(values.data_ptr());
    for (int64_t u = u0; u < u1; ++u) {  // unit u: (row, head)
      const int64_t r = u / heads, h = u % heads;
      const int64_t offset = r * keys.stride(0) + h * keys.stride(1);
      const float* mp = mask ? m.data_ptr<float>() + r * m.stride(0) + (m.size(1) == 1 ? 0 : h * m.stride(1)) : nullptr;
      const float* ks = int8_cache ? key_scales->data_ptr<float>() + r * key_scales->stride(0) + h * key_scales->stride(1) : nullptr;
      const float* vs = int8_cache ? value_scales->data_ptr<float>() + r * value_scales->stride(0) + h * value_scales->stride(1) : nullptr;
      for (int64_t t = 0; t < queries; ++t)
        attend_one_head<Q, T>(qp + (u * queries + t) * d, kp + offset, vp + offset, keys.stride(2), mp,
                              causal_start < 0 ? length : causal_start + t + 1, d, scale,
                              out.data_ptr<float>() + (u * queries + t) * d, scores, ks, vs);
    }
  };
  auto body = [&](int64_t u0, int64_t u1) {
    if (int8_cache)
      run(float{}, int8_t{}, u0, u1);
    else if (keys.scalar_type() == torch::kFloat32)
      run(float{}, float{}, u0, u1);
    else
      run(at::BFloat16{}, at::BFloat16{}, u0, u1);
  };
  // A prefill's many queries are shared out by (row, head); a step's one query is cut by the decoder layer
  // (a nested region here runs inline).
  if (queries > 1)
    musicgen::ElasticPool::instance().run(rows * heads, 1, body);
  else
    body(0, rows * heads);
#endif
  return out;
}

}  // namespace
