// Int4 weights (group-wise scales) x int8 activations for the decoder's few-row steps: AVX-512 VNNI, or AVX2 + FMA
// (every x86-64 CPU of this project), whichever the build has, as the int8 kernel. Included by int8_gemv.cpp
// after its helpers (quantize_rows, the GELUs) and attention_one.h (load8, Lanes16), in the same translation unit.
//
// A step is bound by streaming the weights: 4 bits read half the bytes of int8. On AVX2 the u4 weights are the
// unsigned operand of vpmaddubsw directly (no |w| / sign trick as in the int8 kernel), so a weight costs fewer
// instructions too.
//
// Math (exact in int32 per group, then float per group in a fixed order):
//   q[m, i]  = round(x[m, i] / sx[m])  in [-127, 127]   (sx[m] = max_i |x[m, i]| / 127, or 1 for a zero row)
//   d[m,o,g] = sum_{i in group g} q[m, i] * (u[o, i] - 8)   (u = the stored nibble, 0..15; weight = u - 8)
//   acc      = 0;  for g in order: acc = acc + float(d[m,o,g]) * scale[o, g]   (a multiply, then an add; the
//              scale is stored in bfloat16 and widened exactly)
//   y[m, o]  = acc * sx[m]
// Layout: packed[o / 16][i / 8][o % 16][j] (uint8, j < 4) holds input i + j in its low nibble and i + 4 + j in
// its high one; scales[o / 16][g][o % 16] (bfloat16: half the bytes of float32 scales, 5% of what a step reads
// at group 64). Outputs padded to 16, inputs to the group (a multiple of 32).
#pragma once

namespace {

#ifdef MUSICGEN_HAVE_AVX2_OPS
// Output block b (16 outputs: two halves of 8) for M rows. Within 32 inputs the int16 sums cannot overflow
// (4 x 2 x 2 products of |u| <= 15 and |q| <= 127: <= 30480), so they widen to int32 once per 32 inputs.
template <int M>
void gemv4_block(const int8_t* xq, const int32_t* xsum, const float* sx, const uint8_t* packed,
                 const at::BFloat16* scales, float* y, int64_t in_padded, int64_t group, int64_t out, int64_t b,
                 bool gelu) {
  const int64_t groups = in_padded / group;
  const uint8_t* block = packed + b * in_padded * 8;  // 16 outputs x in_padded / 2 bytes
  const at::BFloat16* block_scales = scales + b * groups * 16;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[M][2];
  for (int m = 0; m < M; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t i = g * group; i < (g + 1) * group; i += 32) {
      __m256i part[M][2];
      for (int k = 0; k < 4; ++k) {
        const uint8_t* p = block + (i + 8 * k) * 8;  // 64 bytes per 8 inputs
        _mm_prefetch(reinterpret_cast<const char*>(p) + 4096, _MM_HINT_T0);
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        const __m256i lo0 = _mm256_and_si256(v0, nibble), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nibble);
        const __m256i lo1 = _mm256_and_si256(v1, nibble), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nibble);
        for (int m = 0; m < M; ++m) {
          int32_t first, second;
          std::memcpy(&first, xq + m * in_padded + i + 8 * k, 4);
          std::memcpy(&second, xq + m * in_padded + i + 8 * k + 4, 4);
          const __m256i xa = _mm256_set1_epi32(first), xb = _mm256_set1_epi32(second);
          const __m256i t0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xa), _mm256_maddubs_epi16(hi0, xb));
          const __m256i t1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xa), _mm256_maddubs_epi16(hi1, xb));
          part[m][0] = k ? _mm256_add_epi16(part[m][0], t0) : t0;
          part[m][1] = k ? _mm256_add_epi16(part[m][1], t1) : t1;
        }
      }
      for (int m = 0; m < M; ++m)
        for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(part[m][h], ones));
    }
    const __m256 scale[2] = {load8(block_scales + g * 16), load8(block_scales + g * 16 + 8)};  // widened exactly
    for (int m = 0; m < M; ++m) {
      const __m256i zero_point = _mm256_set1_epi32(8 * xsum[m * groups + g]);  // the weights are u - 8
      for (int h = 0; h < 2; ++h) {
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][h], zero_point));
        total[m][h] = _mm256_add_ps(total[m][h], _mm256_mul_ps(dot, scale[h]));
      }
    }
  }
  const int64_t valid = std::min<int64_t>(16, out - b * 16);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i masks[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lanes),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid) - 8), lanes)};
  for (int m = 0; m < M; ++m) {
    for (int h = 0; h < 2; ++h) {
      __m256 value = _mm256_mul_ps(total[m][h], _mm256_set1_ps(sx[m]));
      if (gelu) value = gelu_ps(value);
      _mm256_maskstore_ps(y + m * out + b * 16 + h * 8, masks[h], value);
    }
  }
}
#endif

#ifdef MUSICGEN_HAVE_VNNI
// The same block with AVX-512 VNNI: 16 outputs per register, vpdpbusd on the nibbles (u8) and the activations
// (s8) straight into int32, so no int16 stage. The int32 group sums are exact either way, and the float
// operations per group are the AVX2 block's, lane for lane: the same bits.
template <int M>
void gemv4_block_vnni(const int8_t* xq, const int32_t* xsum, const float* sx, const uint8_t* packed,
                      const at::BFloat16* scales, float* y, int64_t in_padded, int64_t group, int64_t out, int64_t b,
                      bool gelu) {
  const int64_t groups = in_padded / group;
  const uint8_t* block = packed + b * in_padded * 8;  // 16 outputs x in_padded / 2 bytes
  const at::BFloat16* block_scales = scales + b * groups * 16;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[M][2];  // inputs i..i+3 (low nibbles) and i+4..i+7 (high): two chains
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
      const uint8_t* p = block + i * 8;  // 64 bytes per 8 inputs
      _mm_prefetch(reinterpret_cast<const char*>(p) + 4096, _MM_HINT_T1);  // as the int8 kernel
      const __m512i v = _mm512_loadu_si512(p);
      const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int m = 0; m < M; ++m) {
        int32_t first, second;
        std::memcpy(&first, xq + m * in_padded + i, 4);
        std::memcpy(&second, xq + m * in_padded + i + 4, 4);
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], lo, _mm512_set1_epi32(first));
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], hi, _mm512_set1_epi32(second));
      }
    }
    const __m512 scale = Lanes16::load(block_scales + g * 16);  // widened exactly
    for (int m = 0; m < M; ++m) {
      const __m512i zero_point = _mm512_set1_epi32(8 * xsum[m * groups + g]);  // the weights are u - 8
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]), zero_point));
      total[m] = _mm512_add_ps(total[m], _mm512_mul_ps(dot, scale));
    }
  }
  const int64_t valid = std::min<int64_t>(16, out - b * 16);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  for (int m = 0; m < M; ++m) {
    __m512 value = _mm512_mul_ps(total[m], _mm512_set1_ps(sx[m]));
    if (gelu) value = gelu_ps(value);
    _mm512_mask_storeu_ps(y + m * out + b * 16, mask, value);
  }
}
#endif

// The int4 kernel of this build: "avx512-vnni", "avx2", or "none" where it cannot run int4 weights.
std::string int4_isa() {
#if defined(MUSICGEN_HAVE_VNNI)
  return "avx512-vnni";
#elif defined(MUSICGEN_HAVE_AVX2_OPS)
  return "avx2";
#else
  return "none";
#endif
}

// Output block b for M rows with the best block this build has.
template <int M>
inline void gemv4(const int8_t* xq, const int32_t* xsum, const float* sx, const uint8_t* packed,
                  const at::BFloat16* scales, float* y, int64_t in_padded, int64_t group, int64_t out, int64_t b,
                  bool gelu) {
#if defined(MUSICGEN_HAVE_VNNI)
  gemv4_block_vnni<M>(xq, xsum, sx, packed, scales, y, in_padded, group, out, b, gelu);
#elif defined(MUSICGEN_HAVE_AVX2_OPS)
  gemv4_block<M>(xq, xsum, sx, packed, scales, y, in_padded, group, out, b, gelu);
#endif
}

// The int8 kernel's unsigned activations (q + 128) made signed in place, and each group's sum for the zero
// point: `groups` runs of `group` bytes (a multiple of 32). The sum of the signed bytes is the sum of the
// unsigned ones less 128 a byte, which vpsadbw adds up 32 at a time.
void to_signed_with_group_sums(uint8_t* bytes, int64_t groups, int64_t group, int32_t* sums) {
  for (int64_t g = 0; g < groups; ++g) {
    uint8_t* run = bytes + g * group;
    int64_t total = 0;
#ifdef MUSICGEN_HAVE_AVX2_OPS
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i partial = _mm256_setzero_si256();
    for (int64_t i = 0; i < group; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(run + i));
      partial = _mm256_add_epi64(partial, _mm256_sad_epu8(v, _mm256_setzero_si256()));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(run + i), _mm256_xor_si256(v, flip));
    }
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), partial);
    total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#else
    for (int64_t i = 0; i < group; ++i) {
      total += run[i];
      run[i] ^= 0x80;
    }
#endif
    sums[g] = static_cast<int32_t>(total - 128 * group);
  }
}

// x: (..., in_features) float32; packed, scales from int8_kernel.pack_int4(); returns (..., out) float32.
torch::Tensor linear4(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, int64_t in_features, int64_t out,
                      int64_t group, bool gelu) {
  TORCH_CHECK(int4_isa() != "none", "int4 kernel built without AVX2");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "int4 linear takes float32 CPU input");
  TORCH_CHECK(group >= 32 && group % 32 == 0, "int4 group size must be a positive multiple of 32, got ", group);
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4 &&
              packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed: uint8 [out/16, in/8, 16, 4]");
  const int64_t blocks = packed.size(0), in_padded = packed.size(1) * 8;
  TORCH_CHECK(in_padded % group == 0 && scales.dim() == 3 && scales.size(0) == blocks &&
              scales.size(1) == in_padded / group && scales.size(2) == 16 && scales.scalar_type() == torch::kBFloat16 &&
              scales.is_contiguous() && out > blocks * 16 - 16 && out <= blocks * 16,
              "scales / group / out do not match the packed weight");
  const int64_t in = x.size(-1);
  TORCH_CHECK(in == in_features && (in + group - 1) / group * group == in_padded, "input width ", in,
              " does not match the weight's ", in_features);
  auto flat = x.reshape({-1, in}).contiguous();
  const int64_t rows = flat.size(0), groups = in_padded / group;
  Activations& a = activations(rows, in_padded, groups);
  quantize_rows(flat.data_ptr<float>(), rows, in, in_padded, a.quantized.data(), a.scales.data());
  uint8_t* bytes = a.quantized.data();
  int32_t* sums = a.group_sums.data();
  to_signed_with_group_sums(bytes, rows * groups, group, sums);
  auto y = torch::empty({rows, out}, flat.options());
#ifdef MUSICGEN_HAVE_AVX2_OPS
  const int8_t* q = reinterpret_cast<const int8_t*>(bytes);
  const float* s = a.scales.data();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const at::BFloat16* ws = scales.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t block_bytes = in_padded * 8;
  const int64_t tile = std::max<int64_t>(1, (256 * 1024) / block_bytes);  // as in `linear`: a prefill's rows
  auto body = [&](int64_t b0, int64_t b1) {
    for (int64_t t0 = b0; t0 < b1; t0 += tile) {
      const int64_t t1 = std::min(b1, t0 + tile);
      auto run = [&](int64_t m, auto rows_in_group) {
        constexpr int M = decltype(rows_in_group)::value;
        for (int64_t b = t0; b < t1; ++b)
          gemv4<M>(q + m * in_padded, sums + m * groups, s + m, w, ws, yp + m * out, in_padded, group, out, b, gelu);
      };
#ifdef MUSICGEN_HAVE_VNNI  // 8 rows share a weight load (16 accumulators fit AVX-512's 32 registers, not AVX2's 16)
      for_row_groups<8>(rows, run);
#else
      for_row_groups<4>(rows, run);
#endif
    }
  };
  if (g_use_openmp || (rows > 8 && at::get_num_threads() > 1))  // as in `linear`
    at::parallel_for(0, blocks, 4, body);
  else
    musicgen::ElasticPool::instance().run(blocks, std::max<int64_t>(1, (64 * 1024) / block_bytes), body);
#endif
  auto shape = x.sizes().vec();
  shape.back() = out;
  return y.view(shape);
}

}  // namespace
