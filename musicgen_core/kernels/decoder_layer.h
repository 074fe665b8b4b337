// The decoder's one-column step in C++ (a decode step: one new column per sequence), over the int8 / int4
// kernels' linears or the float kernel's (float32 or bfloat16 weights) (int8_gemv.cpp, the one translation unit
// that includes this header and binds it to Python).
//
// Between the linears a layer does little arithmetic (three layer norms, two attentions over one query, three
// residual adds), and done as ATen operations that glue cost ~200 us a layer on the 2-core Xeon (dispatch,
// allocation, strided copies): ~5 ms of a 15 ms int4 step with the pool's helper idle. Here it is plain loops
// over raw memory, and the 24 layers run in one call.
//
// Bit-identity with the Python layers (MusicgenDecoder._layer, which a prefill runs) holds because both use the
// same arithmetic: the kernel's `layer_norm` (the Python layers of a quantized decoder call it too), the same
// linears, `attend_one_head` per (row, head) with the query rounded to the cache's dtype, float adds, and
// conversions to the cache's dtype by c10's round-to-nearest-even. A float decoder's step is not held to its
// Python layers' bits (those run torch's layer norm, sdpa and matmul): it agrees with them to float rounding,
// and a bfloat16 decoder's step keeps its activations in float32 where the Python layers round them to bfloat16.
#pragma once

#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "attention_one.h"  // attend_one_head: one query per (row, head)
#include "elastic_pool.h"

namespace {

// A/B only (bench_shared_cpu.py): run the kernel's linears and the layer's attention as before the elastic pool,
// at::parallel_for and torch's own threads, OpenMP's fixed shares.
bool g_use_openmp = false;
// A sequence's attention is cut into units of (row, heads) reading about this many bytes of KV cache each (the
// tests lower it to cut every attention). 256 KB is ~15 us of one thread: in a step the pool's helpers are hot
// (a burst), so a region costs a few us; at 300 frames of context on the 2-core Xeon 256 KB made an int8 step
// 31.4 ms against 34.0 with 2 MB.
int64_t g_attention_chunk_bytes = 256 << 10;
// ... and, while the pool is hot (a step on a machine to itself), into at least this many units where a
// sequence has that many (row, head) pairs: by bytes alone, a sequence's attention below ~128 frames of context
// (and every cross-attention over a prompt's few tokens) was one unit, run by the caller while the helpers
// waited: ~0.7 ms of a 10 ms int4 step at context 0-60 on the 2-core Xeon, where a call's fixed cost outweighs
// its few keys. 4 units: the int4 step 2.6-4% faster at context 0, 6.7-7.3% at 60, 4.7% at 1200 (the
// cross-attention), alternating in one process; 8 and 16 no better. Contended (a busy process beside us), every
// extra region is another chance to wait for a preempted helper: an int8 step at 600 frames took 40.7 ms
// against 33.2 with the cross-attention cut in four, so there it stays whole (28.8 / 35.9 against 29.9 / 35.1
// ms at 0 / 600 frames with this rule; the synthetic DAW 27.8 / 33.4 against 28.5 / 33.2).
constexpr int64_t kAttentionLeastUnits = 4;

// Defined in int8_gemv.cpp: x (..., in_features) float32 @ the dequantized packed weight, then GELU if gelu.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor rowsum, torch::Tensor scale,
                     int64_t in_features, int64_t out, bool gelu);
// Defined in int4_gemv.h: the same with group-wise int4 weights.
torch::Tensor linear4(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, int64_t in_features, int64_t out,
                      int64_t group, bool gelu);
// Defined in f32_gemv.h: x float32 @ weight.T, the weight float32 or bfloat16.
torch::Tensor linear_f32(torch::Tensor x, torch::Tensor weight);

// Layer norm of `rows` rows of `width` floats: mean and variance each summed in eight interleaved partial sums
// combined in a fixed order, then (x - mean) * (1 / sqrt(var + eps)) * w + b. Within float rounding of torch's
// layer_norm, and the same bits wherever it runs.
void layer_norm_rows(const float* x, int64_t rows, int64_t width, const float* w, const float* b, float eps,
                     float* out) {
  auto total = [width](const float* v, float shift, bool square) {
    float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
      for (int k = 0; k < 8; ++k) {
        const float d = v[i + k] - shift;
        part[k] += square ? d * d : d;
      }
    for (int k = 0; i < width; ++i, ++k) {
      const float d = v[i] - shift;
      part[k] += square ? d * d : d;
    }
    return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
  };
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    const float mean = total(row, 0.f, false) / static_cast<float>(width);
    const float variance = total(row, mean, true) / static_cast<float>(width);
    const float inverse = 1.f / std::sqrt(variance + eps);
    float* y = out + r * width;
    for (int64_t i = 0; i < width; ++i) y[i] = (row[i] - mean) * inverse * w[i] + b[i];
  }
}

// x (..., width) -> the same shape: kernel.layer_norm for the Python layers of a quantized decoder.
torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32 &&
              bias.scalar_type() == torch::kFloat32 && weight.numel() == x.size(-1) && bias.numel() == x.size(-1),
              "layer_norm: float32 x (..., width), weight and bias (width)");
  const auto flat = x.contiguous();
  const auto w = weight.contiguous(), b = bias.contiguous();
  auto out = at::empty_like(flat);
  const int64_t width = x.size(-1);
  layer_norm_rows(flat.data_ptr<float>(), width ? flat.numel() / width : 0, width, w.data_ptr<float>(),
                  b.data_ptr<float>(), static_cast<float>(eps), out.data_ptr<float>());
  return out;
}

// One decoder layer's weights and its one-column step over raw memory. Int8, int4 or float linears; attention in
// the kernel's attend_one_head (head_dim a multiple of 8, at most 128: MusicgenDecoder.use_kernel_layers checks).
class DecoderLayerStep {
 public:
  // norms: (weight, bias) of the self-attention, cross-attention and final layer norms; linears: (packed,
  // rowsum, scale) of qkv, out_proj, cross q_proj, cross out_proj, fc1, fc2, with ins[i], outs[i], gelus[i];
  // groups[i]: 0 for int8 weights, kFloatWeights for a float32 or bfloat16 weight (out, in) in place of packed
  // (rowsum and scale unused), else the int4 group size (its rowsum is unused). Norms of any float dtype.
  DecoderLayerStep(std::vector<torch::Tensor> norms, std::vector<double> eps, std::vector<torch::Tensor> linears,
                   std::vector<int64_t> ins, std::vector<int64_t> outs, std::vector<bool> gelus,
                   std::vector<int64_t> groups, int64_t heads)
      : norms_(std::move(norms)), eps_(std::move(eps)), linears_(std::move(linears)), ins_(std::move(ins)),
        outs_(std::move(outs)), gelus_(std::move(gelus)), groups_(std::move(groups)), heads_(heads) {
    TORCH_CHECK(norms_.size() == 6 && eps_.size() == 3 && linears_.size() == 18 && ins_.size() == 6 &&
                outs_.size() == 6 && gelus_.size() == 6 && groups_.size() == 6, "DecoderLayerStep: 3 norms and 6 linears");
    for (auto& norm : norms_) norm = norm.to(torch::kFloat32).contiguous();
    for (size_t i = 0; i < 6; ++i)
      if (groups_[i] == kFloatWeights) {
        const auto& weight = linears_[3 * i];
        TORCH_CHECK((weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16) &&
                    weight.is_contiguous() && weight.dim() == 2 && weight.size(0) == outs_[i] &&
                    weight.size(1) == ins_[i] && !gelus_[i],
                    "DecoderLayerStep: a float linear is a contiguous float32 or bfloat16 (out, in) weight, no GELU");
      }
    const int64_t width = ins_[0];
    TORCH_CHECK(heads_ > 0 && width % heads_ == 0 && (width / heads_) % 8 == 0 && width / heads_ <= 128,
                "DecoderLayerStep: head_dim must be a multiple of 8 and at most 128");
  }

  // One sequence's state as this layer sees it: its self-attention cache (rows, heads, capacity, head_dim) of
  // this layer with `length` positions filled before the step, and its cross-attention keys / values (rows,
  // heads, text, head_dim) with an additive mask (rows, 1 or heads, 1, text).
  static constexpr int64_t kFloatWeights = -1;
  enum class Cache { f32, bf16, int8 };
  struct Sequence {
    int64_t row0, rows, length, capacity;
    void* keys;
    void* values;
    Cache cache;
    float* key_scales;  // int8 cache: (rows, heads, capacity) of this layer; else null
    float* value_scales;
    const void* cross_keys;  // float32, or bfloat16 when cross_bf16 (a bfloat16 decoder's)
    const void* cross_values;
    bool cross_bf16;
    int64_t text;
    const float* mask;
    int64_t mask_heads;
  };

  // x (rows, 1, width) float32 -> the layer's output, the same shape; writes the new column into each cache.
  torch::Tensor step(const torch::Tensor& x, const std::vector<Sequence>& sequences) const {
    const int64_t rows = x.size(0), width = x.size(2), head_dim = width / heads_;
    auto h = at::empty_like(x);
    norm(x, 0, h);
    const auto qkv = apply(0, h);  // (rows, 1, 3 width): q | k | v
    const float* qkv_data = qkv.data_ptr<float>();
    for (const auto& s : sequences)
      for (int64_t r = 0; r < s.rows; ++r)
        for (int64_t head = 0; head < heads_; ++head) {
          const int64_t position = (r * heads_ + head) * s.capacity + s.length, at = position * head_dim;
          const float* row = qkv_data + (s.row0 + r) * 3 * width + head * head_dim;
          switch (s.cache) {
            case Cache::bf16:
              to_cache(row + width, static_cast<at::BFloat16*>(s.keys) + at, head_dim);
              to_cache(row + 2 * width, static_cast<at::BFloat16*>(s.values) + at, head_dim);
              break;
            case Cache::f32:
              to_cache(row + width, static_cast<float*>(s.keys) + at, head_dim);
              to_cache(row + 2 * width, static_cast<float*>(s.values) + at, head_dim);
              break;
            case Cache::int8:
              s.key_scales[position] = quantize_vector(row + width, head_dim, static_cast<int8_t*>(s.keys) + at);
              s.value_scales[position] = quantize_vector(row + 2 * width, head_dim, static_cast<int8_t*>(s.values) + at);
              break;
          }
        }
    auto attended = at::empty_like(x);
    attend(sequences, qkv_data, 3 * width, attended.data_ptr<float>(), width, head_dim, false);
    auto x1 = add(x, apply(1, attended));

    norm(x1, 1, h);
    const auto q = apply(2, h);
    attend(sequences, q.data_ptr<float>(), width, attended.data_ptr<float>(), width, head_dim, true);
    auto x2 = add(x1, apply(3, attended));

    norm(x2, 2, h);
    auto hidden = apply(4, h);
    if (!gelus_[4]) hidden = at::gelu(hidden);
    return add(x2, apply(5, hidden));
  }

 private:
  void norm(const torch::Tensor& x, int index, torch::Tensor& out) const {
    layer_norm_rows(x.data_ptr<float>(), x.size(0), x.size(2), norms_[2 * index].data_ptr<float>(),
                    norms_[2 * index + 1].data_ptr<float>(), static_cast<float>(eps_[index]), out.data_ptr<float>());
  }

  static torch::Tensor add(const torch::Tensor& a, const torch::Tensor& b) {
    auto out = at::empty_like(a);
    const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
    float* po = out.data_ptr<float>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) po[i] = pa[i] + pb[i];
    return out;
  }

  static void to_cache(const float* from, float* to, int64_t n) { std::memcpy(to, from, n * sizeof(float)); }
  static void to_cache(const float* from, at::BFloat16* to, int64_t n) {
    for (int64_t i = 0; i < n; ++i) to[i] = at::BFloat16(from[i]);  // round to nearest even, as torch's .to()
  }

  // Attention of every sequence's rows: self-attention (queries in `queries`, `query_stride` floats a row,
  // against the cache including the new column) or cross-attention (against the conditioning, masked). Out:
  // (rows, width), head after head, as the Python layers' transpose-and-reshape lays it out. Cut into units of
  // (rows, heads) that the pool shares where a sequence reads enough bytes, and into at least
  // kAttentionLeastUnits while the pool is hot.
  void attend(const std::vector<Sequence>& sequences, const float* queries, int64_t query_stride, float* out,
              int64_t width, int64_t head_dim, bool cross) const {
    struct Unit {
      const Sequence* sequence;
      int64_t r0, r1, h0, h1;
    };
    std::vector<Unit> units;
    const int64_t unit_bytes = g_attention_chunk_bytes;
    const int64_t least_units = musicgen::ElasticPool::instance().is_hot() ? kAttentionLeastUnits : 1;
    for (const auto& s : sequences) {
      const int64_t keys = cross ? s.text : s.length + 1;
      const int64_t element = cross ? (s.cross_bf16 ? 2 : 4)
                                    : s.cache == Cache::f32 ? 4 : s.cache == Cache::bf16 ? 2 : 1;
      const int64_t bytes = 2 * s.rows * heads_ * keys * head_dim * element;
      const int64_t pairs = s.rows * heads_, least = std::min(least_units, pairs);
      const int64_t chunks = g_use_openmp ? 1 : std::clamp<int64_t>(bytes / unit_bytes, least, pairs);
      const int64_t row_step = chunks >= s.rows ? 1 : s.rows;  // rows first, then heads within a row
      const int64_t head_groups = std::max<int64_t>(1, chunks / (s.rows / row_step));
      const int64_t per_group = (heads_ + head_groups - 1) / head_groups;
      for (int64_t r = 0; r < s.rows; r += row_step)
        for (int64_t h0 = 0; h0 < heads_; h0 += per_group)
          units.push_back({&s, r, std::min(s.rows, r + row_step), h0, std::min(heads_, h0 + per_group)});
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
    auto run_unit = [&](const Unit& unit) {
      thread_local std::vector<float> scores;
      const Sequence& s = *unit.sequence;
      for (int64_t r = unit.r0; r < unit.r1; ++r)
        for (int64_t head = unit.h0; head < unit.h1; ++head) {
          const float* q = queries + (s.row0 + r) * query_stride + head * head_dim;
          float* o = out + (s.row0 + r) * width + head * head_dim;
          if (cross) {
            const int64_t base = (r * heads_ + head) * s.text * head_dim;
            const float* mask = s.mask ? s.mask + (r * s.mask_heads + (s.mask_heads == 1 ? 0 : head)) * s.text : nullptr;
            if (s.cross_bf16) {  // a bfloat16 decoder's: the float32 query against the widened keys
              attend_one_head(q, static_cast<const at::BFloat16*>(s.cross_keys) + base,
                              static_cast<const at::BFloat16*>(s.cross_values) + base, head_dim, mask, s.text,
                              head_dim, scale, o, scores);
            } else {
              attend_one_head(q, static_cast<const float*>(s.cross_keys) + base,
                              static_cast<const float*>(s.cross_values) + base, head_dim, mask, s.text, head_dim,
                              scale, o, scores);
            }
            continue;
          }
          const int64_t positions = (r * heads_ + head) * s.capacity, base = positions * head_dim;
          if (s.cache == Cache::bf16) {
            at::BFloat16 rounded[128];  // the query in the cache's dtype, as attend_one rounds it
            for (int64_t c = 0; c < head_dim; ++c) rounded[c] = at::BFloat16(q[c]);
            attend_one_head(rounded, static_cast<const at::BFloat16*>(s.keys) + base,
                            static_cast<const at::BFloat16*>(s.values) + base, head_dim, nullptr, s.length + 1,
                            head_dim, scale, o, scores);
          } else if (s.cache == Cache::f32) {
            attend_one_head(q, static_cast<const float*>(s.keys) + base, static_cast<const float*>(s.values) + base,
                            head_dim, nullptr, s.length + 1, head_dim, scale, o, scores);
          } else {
            attend_one_head(q, static_cast<const int8_t*>(s.keys) + base, static_cast<const int8_t*>(s.values) + base,
                            head_dim, nullptr, s.length + 1, head_dim, scale, o, scores, s.key_scales + positions,
                            s.value_scales + positions);
          }
        }
    };
    if (units.size() == sequences.size()) {  // nothing cut: no region
      for (const auto& unit : units) run_unit(unit);
      return;
    }
    musicgen::ElasticPool::instance().run(static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) run_unit(units[u]);
    });
  }

  torch::Tensor apply(size_t index, const torch::Tensor& input) const {
    if (groups_[index] == kFloatWeights) return linear_f32(input, linears_[3 * index]);
    if (groups_[index])
      return linear4(input, linears_[3 * index], linears_[3 * index + 2], ins_[index], outs_[index], groups_[index],
                     gelus_[index]);
    return linear(input, linears_[3 * index], linears_[3 * index + 1], linears_[3 * index + 2], ins_[index],
                  outs_[index], gelus_[index]);
  }

  std::vector<torch::Tensor> norms_;
  std::vector<double> eps_;
  std::vector<torch::Tensor> linears_;
  std::vector<int64_t> ins_;
  std::vector<int64_t> outs_;
  std::vector<bool> gelus_;
  std::vector<int64_t> groups_;
  int64_t heads_;
};

// Every layer of a decoder for one column per sequence, in one call from Python.
class DecoderStack {
 public:
  explicit DecoderStack(std::vector<DecoderLayerStep> layers) : layers_(std::move(layers)) {}
  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // x (rows, 1, width) float32; bounds: row offsets of the sequences (size sequences + 1); per sequence: its
  // self-attention cache keys / values (layers, rows_i, heads, capacity, head_dim), contiguous, float32,
  // bfloat16 or int8 (then with key / value scales (layers, rows_i, heads, capacity); else empty tensors),
  // `lengths[i]` positions filled (the new column goes there); its cross-attention keys / values
  // (layers, rows_i, heads, text, head_dim) float32 or bfloat16 and additive mask (rows_i, 1 or heads, 1, text),
  // any float dtype. -> the last
  // layer's output (rows, 1, width); the caller advances the caches' lengths.
  torch::Tensor step(torch::Tensor x, const std::vector<int64_t>& bounds, const std::vector<torch::Tensor>& keys,
                     const std::vector<torch::Tensor>& values, const std::vector<torch::Tensor>& key_scales,
                     const std::vector<torch::Tensor>& value_scales, const std::vector<int64_t>& lengths,
                     const std::vector<torch::Tensor>& cross_keys, const std::vector<torch::Tensor>& cross_values,
                     const std::vector<torch::Tensor>& cross_masks) const {
    const size_t count = keys.size();
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == torch::kFloat32 && bounds.size() == count + 1 &&
                values.size() == count && key_scales.size() == count && value_scales.size() == count &&
                lengths.size() == count && cross_keys.size() == count && cross_values.size() == count &&
                cross_masks.size() == count && bounds.back() == x.size(0),
                "DecoderStack.step: x (rows, 1, width) float32 and, per sequence, bounds, caches (with their scales: "
                "empty for a float cache), lengths, cross keys / values and masks");
    x = x.contiguous();
    std::vector<torch::Tensor> masks(count);
    for (size_t i = 0; i < count; ++i) {
      const auto& k = keys[i];
      TORCH_CHECK(k.dim() == 5 && k.size(0) == size() && k.is_contiguous() && values[i].is_contiguous() &&
                  values[i].sizes() == k.sizes() && values[i].scalar_type() == k.scalar_type() &&
                  (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16 ||
                   k.scalar_type() == torch::kInt8) &&
                  k.size(1) == bounds[i + 1] - bounds[i], "DecoderStack.step: a cache must be contiguous "
                  "(layers, rows, heads, capacity, head_dim), float32, bfloat16 or int8, with the sequence's rows");
      if (k.scalar_type() == torch::kInt8)
        TORCH_CHECK(key_scales[i].is_contiguous() && value_scales[i].is_contiguous() &&
                    key_scales[i].scalar_type() == torch::kFloat32 && value_scales[i].scalar_type() == torch::kFloat32 &&
                    key_scales[i].sizes() == k.sizes().slice(0, 4) && value_scales[i].sizes() == k.sizes().slice(0, 4),
                    "DecoderStack.step: an int8 cache's scales are contiguous float32 (layers, rows, heads, capacity)");
      TORCH_CHECK(lengths[i] + 1 <= k.size(3), "KV cache full: ", lengths[i] + 1, " positions > capacity ", k.size(3));
      TORCH_CHECK(cross_keys[i].is_contiguous() && cross_values[i].is_contiguous() &&
                  (cross_keys[i].scalar_type() == torch::kFloat32 || cross_keys[i].scalar_type() == torch::kBFloat16) &&
                  cross_values[i].scalar_type() == cross_keys[i].scalar_type() && cross_keys[i].size(1) == k.size(1),
                  "DecoderStack.step: cross-attention keys / values contiguous float32 or bfloat16 "
                  "(layers, rows, heads, text, d)");
      masks[i] = cross_masks[i].to(torch::kFloat32).contiguous();
    }
    std::vector<DecoderLayerStep::Sequence> sequences(count);
    for (size_t layer = 0; layer < layers_.size(); ++layer) {
      for (size_t i = 0; i < count; ++i) {
        const auto &k = keys[i], &ck = cross_keys[i];
        const int64_t cache_layer = k.stride(0) * k.element_size(), cross_layer = ck.stride(0) * ck.element_size();
        const bool int8 = k.scalar_type() == torch::kInt8;
        const int64_t scale_layer = int8 ? key_scales[i].stride(0) : 0;
        sequences[i] = {bounds[i], bounds[i + 1] - bounds[i], lengths[i], k.size(3),
                        static_cast<char*>(k.data_ptr()) + layer * cache_layer,
                        static_cast<char*>(values[i].data_ptr()) + layer * cache_layer,
                        int8 ? DecoderLayerStep::Cache::int8
                             : k.scalar_type() == torch::kBFloat16 ? DecoderLayerStep::Cache::bf16
                                                                  : DecoderLayerStep::Cache::f32,
                        int8 ? key_scales[i].data_ptr<float>() + layer * scale_layer : nullptr,
                        int8 ? value_scales[i].data_ptr<float>() + layer * scale_layer : nullptr,
                        static_cast<const char*>(ck.data_ptr()) + layer * cross_layer,
                        static_cast<const char*>(cross_values[i].data_ptr()) + layer * cross_layer,
                        ck.scalar_type() == torch::kBFloat16, ck.size(3), masks[i].numel() ? masks[i].data_ptr<float>() : nullptr,
                        masks[i].dim() == 4 ? masks[i].size(1) : 1};
      }
      x = layers_[layer].step(x, sequences);
    }
    return x;
  }

 private:
  std::vector<DecoderLayerStep> layers_;
};

}  // namespace
