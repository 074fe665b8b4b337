// Int8 x int8 matrix-vector products for the decoder's few-row steps: AVX-512 VNNI, or AVX2 + FMA (every x86-64
// CPU since Haswell / Zen), whichever the compiler was told the machine has (-march=native).
//
// A decoder step multiplies a handful of rows (2 per session with guidance) by every weight matrix once, so it
// is bound by reading the weights. This kernel streams each int8 weight once and reuses it for up to 8 rows
// held in registers, with one vpdpbusd per 64 weight bytes and row. Rows are quantized per row on entry.
//
// Math (exact in int32, then one float scale per row and per output):
//   xq[m, i] = round(x[m, i] / sx[m]) + 128   (uint8; sx[m] = max_i |x[m, i]| / 127, or 1 for a zero row)
//   y[m, o]  = (sum_i xq[m, i] * w[o, i] - 128 * sum_i w[o, i]) * scale[o] * sx[m]
// Layout: packed[o / 16][i / 4][o % 16][i % 4] (int8), the order vpdpbusd reads; out padded to 16, in to 8.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define MUSICGEN_HAVE_VNNI 1
#define MUSICGEN_HAVE_KERNEL 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MUSICGEN_HAVE_AVX2 1
#define MUSICGEN_HAVE_KERNEL 1
#endif
#if defined(__AVX2__) && defined(__FMA__)  // 8-lane helpers and the int4 kernel, on AVX-512 machines too
#include <immintrin.h>
#define MUSICGEN_HAVE_AVX2_OPS 1
#endif


#include "elastic_pool.h"  // the threads that run `linear`
#include "decoder_layer.h"  // the one-column decoder layer built on `linear` below

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>


namespace {

// Rows [0, rows) in groups of kMax, then the rest as one group of its own size: run(m, M) with M a
// std::integral_constant. A step's rows (one per prompt and the unconditional one, per session) then pass over
// the weights ceil(rows / kMax) times: 3 rows once, not as 2 + 1. Every row's result is computed on its own, so
// the grouping does not change a bit.
template <int M, typename Run>
inline void run_rest(int64_t left, int64_t m, Run& run) {
  if constexpr (M > 0) {
    if (left == M)
      run(m, std::integral_constant<int, M>{});
    else
      run_rest<M - 1>(left, m, run);
  }
}

template <int kMax, typename Run>
inline void for_row_groups(int64_t rows, Run&& run) {
  int64_t m = 0;
  for (; m + kMax <= rows; m += kMax) run(m, std::integral_constant<int, kMax>{});
  run_rest<kMax - 1>(rows - m, m, run);
}

// The instruction set this build's kernel uses: "avx512-vnni", "avx2", or "none".
std::string isa() {
#if defined(MUSICGEN_HAVE_VNNI)
  return "avx512-vnni";
#elif defined(MUSICGEN_HAVE_AVX2)
  return "avx2";
#else
  return "none";
#endif
}

bool supported() { return isa() != "none"; }

// Quantize rows of x (rows, in) into xq (rows, in_padded), zero-padded (128 = quantized 0); returns sx.
// Vectorized (AVX-512 or AVX2); every path rounds half to even, as torch.round does. A row holding a NaN or an
// infinity gets scale NaN, so all of its outputs are NaN (as in float arithmetic) rather than quietly finite.
void quantize_rows(const float* x, int64_t rows, int64_t in, int64_t in_padded, uint8_t* xq, float* sx) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * in;
    uint8_t* out = xq + m * in_padded;
    int64_t i = 0;
    float peak = 0.f;
    bool has_nan = false;
#if defined(MUSICGEN_HAVE_VNNI)
    __m512 peaks = _mm512_setzero_ps();
    __mmask16 nans = 0;
    for (; i + 16 <= in; i += 16) {
      const __m512 v = _mm512_loadu_ps(row + i);
      nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      peaks = _mm512_max_ps(peaks, _mm512_abs_ps(v));
    }
    peak = _mm512_reduce_max_ps(peaks);
    has_nan = nans != 0;
#elif defined(MUSICGEN_HAVE_AVX2_OPS)
    __m256 peaks = _mm256_setzero_ps(), nans = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (; i + 8 <= in; i += 8) {
      const __m256 v = _mm256_loadu_ps(row + i);
      nans = _mm256_or_ps(nans, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      peaks = _mm256_max_ps(peaks, _mm256_andnot_ps(sign, v));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, peaks);
    for (float lane : lanes) peak = std::max(peak, lane);  // max is exact: any order
    has_nan = _mm256_movemask_ps(nans) != 0;
#endif
    for (; i < in; ++i) {
      has_nan = has_nan || std::isnan(row[i]);
      peak = std::max(peak, std::fabs(row[i]));
    }
    if (has_nan || !std::isfinite(peak)) {
      std::memset(out, 128, in_padded);
      sx[m] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float scale = peak > 0.f ? peak / 127.f : 1.f;
    const float inverse = 1.f / scale;
    i = 0;
#if defined(MUSICGEN_HAVE_VNNI)
    const __m512 inverses = _mm512_set1_ps(inverse);
    const __m512i offset = _mm512_set1_epi32(128);
    for (; i + 16 <= in; i += 16) {
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + i), inverses)), offset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(q));
    }
#elif defined(MUSICGEN_HAVE_AVX2_OPS)
    const __m256 inverses = _mm256_set1_ps(inverse);
    const __m256i offset = _mm256_set1_epi32(128);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
    auto quantized = [&](int64_t at) {  // 1..255: the packs below cannot saturate
      return _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + at), inverses)), offset);
    };
    for (; i + 32 <= in; i += 32) {
      const __m256i low = _mm256_packs_epi32(quantized(i), quantized(i + 8));
      const __m256i high = _mm256_packs_epi32(quantized(i + 16), quantized(i + 24));
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(low, high), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), bytes);
    }
#endif
    for (; i < in; ++i) out[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(row[i] * inverse)) + 128);
    for (i = in; i < in_padded; ++i) out[i] = 128;
    sx[m] = scale;
  }
}

#ifdef MUSICGEN_HAVE_VNNI
// erf(x) for float: a rational approximation, odd numerator over even denominator in x^2 on [-4, 4] (beyond,
// erf is +-1 in float); absolute error ~1e-7.
inline __m512 erf_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.f)), _mm512_set1_ps(4.f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.72614225801306e-10f), _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-1.60960333262415e-02f));
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-1.45660718464996e-05f), _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.42647390514189e-02f));
  return _mm512_div_ps(_mm512_mul_ps(x, p), q);
}

// GELU (the erf form): 0.5 x (1 + erf(x / sqrt 2)).
inline __m512 gelu_ps(__m512 x) {
  const __m512 e = erf_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(e, _mm512_set1_ps(1.f)));
}

// Output block b (16 outputs) for M rows starting at xq; gelu: apply GELU to the outputs (fc1 of a decoder
// layer), on the thread that computed them, so the next op does not pull them from the other core's cache.
template <int M>
void gemv_block(const uint8_t* xq, const float* sx, const int8_t* packed, const int32_t* rowsum,
                const float* scale, float* y, int64_t in_padded, int64_t out, int64_t b, bool gelu) {
  {
    const int8_t* block = packed + b * in_padded * 16;
    __m512i acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int64_t i = 0; i < in_padded; i += 8) {  // two independent chains hide vpdpbusd's latency
      // Both lines of the next 128 bytes 4 KB ahead, into L2: 26 GB/s on the 2-core Xeon (a plain streaming
      // read's speed) against 22 GB/s with one T0 prefetch per 128 bytes.
      _mm_prefetch(reinterpret_cast<const char*>(block + i * 16) + 4096, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(block + i * 16) + 4096 + 64, _MM_HINT_T1);
      const __m512i w0 = _mm512_loadu_si512(block + i * 16);
      const __m512i w1 = _mm512_loadu_si512(block + i * 16 + 64);
      for (int m = 0; m < M; ++m) {
        int32_t x0, x1;
        std::memcpy(&x0, xq + m * in_padded + i, 4);
        std::memcpy(&x1, xq + m * in_padded + i + 4, 4);
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], _mm512_set1_epi32(x0), w0);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], _mm512_set1_epi32(x1), w1);
      }
    }
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(rowsum + b * 16), 7);  // 128 * rowsum
    const __m512 weight_scale = _mm512_loadu_ps(scale + b * 16);
    const int64_t valid = std::min<int64_t>(16, out - b * 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    for (int m = 0; m < M; ++m) {
      const __m512i total = _mm512_sub_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]), offset);
      __m512 value = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(total), weight_scale), _mm512_set1_ps(sx[m]));
      if (gelu) value = gelu_ps(value);
      _mm512_mask_storeu_ps(y + m * out + b * 16, mask, value);
    }
  }
}
#endif

#ifdef MUSICGEN_HAVE_AVX2_OPS
// The AVX-512 functions above, op for op on 8 lanes: the same IEEE operations in the same order, so the same
// results lane by lane.
inline __m256 erf_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.f)), _mm256_set1_ps(4.f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.72614225801306e-10f), _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-1.60960333262415e-02f));
  __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(-1.45660718464996e-05f), _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

inline __m256 gelu_ps(__m256 x) {
  const __m256 e = erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(e, _mm256_set1_ps(1.f)));
}
#endif

#ifdef MUSICGEN_HAVE_AVX2
// Output block b (16 outputs, two halves of 8) for M rows, from the same packed layout as the VNNI kernel.
// AVX2 has no u8 x s8 dot product into int32 that cannot saturate, so each 4-byte group is done as
// |w| (u8) x (x - 128 with w's sign) (s8) -> int16 pairs (|pair| <= 2 x 127 x 127: no saturation) -> int32.
// That sums exactly sum_i (xq[i] - 128) w[i], the VNNI kernel's total after its 128 x rowsum correction,
// so the int32 totals, and the floats made from them the same way, are the same.
template <int M>
void gemv_block(const uint8_t* xq, const float* sx, const int8_t* packed, const int32_t* /*rowsum*/,
                const float* scale, float* y, int64_t in_padded, int64_t out, int64_t b, bool gelu) {
  const int8_t* block = packed + b * in_padded * 16;
  __m256i acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i to_signed = _mm256_set1_epi8(static_cast<char>(0x80));  // u8 x -> x - 128 as s8
  for (int64_t i = 0; i < in_padded; i += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(block + i * 16) + 4096, _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + i * 16));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + i * 16 + 32));
    const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
    for (int m = 0; m < M; ++m) {
      int32_t x4;
      std::memcpy(&x4, xq + m * in_padded + i, 4);
      const __m256i xs = _mm256_xor_si256(_mm256_set1_epi32(x4), to_signed);
      acc[m][0] = _mm256_add_epi32(acc[m][0],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xs, w0)), ones));
      acc[m][1] = _mm256_add_epi32(acc[m][1],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xs, w1)), ones));
    }
  }
  const int64_t valid = std::min<int64_t>(16, out - b * 16);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i masks[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lanes),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid) - 8), lanes)};
  for (int half = 0; half < 2; ++half) {
    const __m256 weight_scale = _mm256_loadu_ps(scale + b * 16 + half * 8);
    for (int m = 0; m < M; ++m) {
      __m256 value = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][half]), weight_scale),
                                   _mm256_set1_ps(sx[m]));
      if (gelu) value = gelu_ps(value);
      _mm256_maskstore_ps(y + m * out + b * 16 + half * 8, masks[half], value);
    }
  }
}
#endif


// The threads that run the kernel, the caller included, and how long idle ones spin before they sleep.
void set_parallel(int64_t threads, int64_t spin_us, bool use_openmp, int64_t attention_chunk_bytes,
                  int64_t burst_spin_us) {
  TORCH_CHECK(threads >= 1 && spin_us >= 0 && attention_chunk_bytes >= 1 && burst_spin_us >= 0, "set_parallel: "
              "threads >= 1, spin_us >= 0, attention_chunk_bytes >= 1, burst_spin_us >= 0");
  g_use_openmp = use_openmp;
  g_attention_chunk_bytes = attention_chunk_bytes;
  auto& pool = musicgen::ElasticPool::instance();
  pool.set_threads(static_cast<int>(threads));
  pool.set_spin_us(static_cast<int>(spin_us));
  pool.set_burst_spin_us(static_cast<int>(burst_spin_us));
}

std::vector<int64_t> parallel() {
  auto& pool = musicgen::ElasticPool::instance();
  return {pool.threads(), pool.spin_us(), g_use_openmp ? 1 : 0, g_attention_chunk_bytes, pool.burst_spin_us()};
}

// The floor of a bandwidth-bound step: every byte of `tensors` read once, as a step reads its weights (on the
// pool, ~64 KB chunks, both lines of every 128 bytes prefetched into L2 4 KB ahead, in a burst). Returns a
// checksum so that nothing is optimised away.
int64_t stream_read(std::vector<torch::Tensor> tensors) {
  std::atomic<int64_t> checksum{0};
  auto& pool = musicgen::ElasticPool::instance();
  pool.begin_burst();
  for (const auto& tensor : tensors) {
    TORCH_CHECK(tensor.device().is_cpu() && tensor.is_contiguous(), "stream_read: contiguous CPU tensors");
    const char* bytes = static_cast<const char*>(tensor.data_ptr());
    const int64_t lines = tensor.numel() * tensor.element_size() / 128;  // a ragged tail of < 128 bytes is left
    pool.run(lines, 512, [&](int64_t l0, int64_t l1) {
      int64_t sum = 0;
#ifdef MUSICGEN_HAVE_AVX2_OPS
      __m256i acc = _mm256_setzero_si256();
      for (int64_t l = l0; l < l1; ++l) {
        const char* p = bytes + l * 128;
        _mm_prefetch(p + 4096, _MM_HINT_T1);
        _mm_prefetch(p + 4096 + 64, _MM_HINT_T1);
        for (int k = 0; k < 4; ++k)
          acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * k)));
      }
      int64_t lanes[4];
      std::memcpy(lanes, &acc, sizeof lanes);
      sum = lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
#else
      for (int64_t l = l0; l < l1; ++l) sum ^= bytes[l * 128];
#endif
      checksum.fetch_xor(sum);
    });
  }
  pool.end_burst();
  return checksum.load();
}

// {open bursts, contended now (0/1), preemptions seen by helpers so far, microseconds callers spent in regions}
std::vector<int64_t> pool_state() {
  auto& pool = musicgen::ElasticPool::instance();
  return {pool.bursts(), pool.contended() ? 1 : 0, pool.preemptions(), pool.region_us()};
}

// A linear's quantized activations, in buffers kept per thread (the calling thread's; helpers only read them
// during the call): three tensor allocations less per linear, ~435 a step.
struct Activations {
  std::vector<uint8_t> quantized;  // (rows, in_padded)
  std::vector<float> scales;       // (rows)
  std::vector<int32_t> group_sums;  // (rows, groups): int4's zero points
};

Activations& activations(int64_t rows, int64_t in_padded, int64_t groups) {
  thread_local Activations a;
  a.quantized.resize(rows * in_padded);
  a.scales.resize(rows);
  a.group_sums.resize(rows * groups);
  return a;
}

// x: (..., in_features) float32; packed, rowsum, scale from pack(); returns (..., out) float32.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor rowsum, torch::Tensor scale,
                     int64_t in_features, int64_t out, bool gelu) {
  TORCH_CHECK(supported(), "int8 kernel built without AVX-512 VNNI or AVX2");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "int8 linear takes float32 CPU input");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4 &&
              packed.scalar_type() == torch::kInt8 && packed.is_contiguous(), "packed: int8 [out/16, in/4, 16, 4]");
  const int64_t blocks = packed.size(0), in_padded = packed.size(1) * 4;
  TORCH_CHECK(rowsum.scalar_type() == torch::kInt32 && rowsum.is_contiguous() && rowsum.numel() == blocks * 16 &&
              scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == blocks * 16 &&
              out > blocks * 16 - 16 && out <= blocks * 16, "rowsum / scale / out do not match the packed weight");
  const int64_t in = x.size(-1);
  TORCH_CHECK(in == in_features && (in + 7) / 8 * 8 == in_padded, "input width ", in, " does not match the weight's ",
              in_features);
  auto flat = x.reshape({-1, in}).contiguous();
  const int64_t rows = flat.size(0);
  Activations& a = activations(rows, in_padded, 0);
  quantize_rows(flat.data_ptr<float>(), rows, in, in_padded, a.quantized.data(), a.scales.data());
  auto y = torch::empty({rows, out}, flat.options());
#ifdef MUSICGEN_HAVE_KERNEL
  const uint8_t* q = a.quantized.data();
  const float* s = a.scales.data();
  const int8_t* w = packed.data_ptr<int8_t>();
  const int32_t* r = rowsum.data_ptr<int32_t>();
  const float* ws = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Groups of up to 8 rows share each weight load. With more rows (a prefill), the rows are walked over a tile
  // of ~256 KB of weights at a time, so the tile stays in L2 while every row group passes over it.
  const int64_t tile = std::max<int64_t>(1, (256 * 1024) / (in_padded * 16));
  auto body = [&](int64_t b0, int64_t b1) {
    for (int64_t t0 = b0; t0 < b1; t0 += tile) {
      const int64_t t1 = std::min(b1, t0 + tile);
      for_row_groups<8>(rows, [&](int64_t m, auto group) {
        constexpr int M = decltype(group)::value;
        for (int64_t b = t0; b < t1; ++b) gemv_block<M>(q + m * in_padded, s + m, w, r, ws, yp + m * out, in_padded, out, b, gelu);
      });
    }
  };
  if (g_use_openmp || (rows > 8 && at::get_num_threads() > 1)) {
    // A prefill's many rows (a re-prime, an audio prompt) run with torch's own team, which runs the prefill's
    // attention between them: the pool beside that team made a 600-frame prefill ~12% slower. A short chunk
    // (the decoder runs it with torch single-threaded, as a step) goes to the pool.
    at::parallel_for(0, blocks, 4, body);
  } else {
    // Chunks of ~64 KB of weights for a step's few rows: fine enough to even out a helper that runs late.
    musicgen::ElasticPool::instance().run(blocks, std::max<int64_t>(1, (64 * 1024) / (in_padded * 16)), body);
  }
#endif
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.view(shape);
}

}  // namespace

#include "int4_gemv.h"  // int4 weights: uses quantize_rows and the 8-lane GELU above
#include "f32_gemv.h"  // float32 weights, for float decoders' steps

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this build has a kernel (AVX-512 VNNI or AVX2)");
  m.def("isa", &isa, "the instruction set of this build's kernel: avx512-vnni, avx2 or none");
  // Both release the GIL while they compute, as torch's own operations do: the server's I/O threads run on.
  m.def("set_parallel", &set_parallel, "threads (caller included), idle spin in us, OpenMP instead (A/B only), "
        "KV bytes per attention chunk, idle spin in us inside a burst", pybind11::arg("threads"), pybind11::arg("spin_us"), pybind11::arg("use_openmp"),
        pybind11::arg("attention_chunk_bytes") = 256 << 10, pybind11::arg("burst_spin_us") = 1000);
  m.def("parallel", &parallel, "[threads, spin_us, uses OpenMP, attention_chunk_bytes, burst_spin_us]");
  m.def("begin_burst", [] { musicgen::ElasticPool::instance().begin_burst(); },
        "regions follow closely until end_burst: idle helpers spin burst_spin_us between them (unless contended)");
  m.def("end_burst", [] { musicgen::ElasticPool::instance().end_burst(); }, "closes a begin_burst");
  m.def("stream_read", &stream_read, "read every byte of the tensors once, as a step reads its weights (the floor "
        "of a bandwidth-bound step); a checksum", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("pool_state", &pool_state, "[open bursts, contended now, preemptions seen by helpers, microseconds callers spent in regions]");
  m.def("int4_isa", &int4_isa, "the instruction set of this build's int4 kernel: avx512-vnni, avx2 or none");
  m.def("linear4", &linear4, "y = x @ dequantized(w4).T with per-row int8 activations, group-wise int4 weights "
        "(then GELU if gelu)", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attend_one", &attend_one, "attention computed query by query: (rows, heads, T, d) over keys and values "
        "(rows, heads, length, d), an additive float mask or None, causal from causal_start (-1: not causal); an int8 "
        "cache with its key and value scales (rows, heads, length) -> float32",
        pybind11::arg("query"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("mask") = pybind11::none(),
        pybind11::arg("causal_start") = -1, pybind11::arg("key_scales") = pybind11::none(),
        pybind11::arg("value_scales") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("quantize_kv", &quantize_kv, "(..., head_dim) float32 -> [int8 of the same shape, scales (...)]: an int8 "
        "cache's per-vector quantization", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("linear_f32", &linear_f32, "y = x @ weight.T for float32 x of a few rows, streaming the weight once",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("linear", &linear, "y = x @ dequantized(w).T with per-row int8 activations (then GELU if gelu)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("layer_norm", &layer_norm, "layer norm over the last dimension, the C++ step's arithmetic (float32)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<DecoderLayerStep>(m, "DecoderLayerStep")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<double>, std::vector<torch::Tensor>,
                          std::vector<int64_t>, std::vector<int64_t>, std::vector<bool>, std::vector<int64_t>,
                          int64_t>());
  pybind11::class_<DecoderStack>(m, "DecoderStack")
      .def(pybind11::init<std::vector<DecoderLayerStep>>())
      .def("__len__", &DecoderStack::size)
      .def("step", &DecoderStack::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
