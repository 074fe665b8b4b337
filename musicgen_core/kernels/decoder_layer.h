// One decoder layer for one new column per sequence, in C++ over the int8 kernel's `linear` (int8_gemv.cpp,
// the one translation unit that includes this header and binds both to Python).
#pragma once

#include <omp.h>
#include <ATen/ThreadLocalState.h>
#include <torch/extension.h>

#include <vector>

#include "attention_one.h"  // the step's attention: one query per (row, head)
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

// Defined in int8_gemv.cpp: x (..., in_features) float32 @ the dequantized packed weight, then GELU if gelu.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor rowsum, torch::Tensor scale,
                     int64_t in_features, int64_t out, bool gelu);
// Defined in int4_gemv.h: the same with group-wise int4 weights.
torch::Tensor linear4(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, int64_t in_features, int64_t out,
                      int64_t group, bool gelu);

// One decoder layer for one new column per sequence (a decode step), int8 or int4 linears: the same ATen
// operations in the same order as MusicgenDecoder._layer in Python, so the result is bit-identical, without
// ~40 trips through Python per layer (about 3 ms of a musicgen-small step).
class DecoderLayerStep {
 public:
  // norms: (weight, bias) of the self-attention, cross-attention and final layer norms; linears: (packed,
  // rowsum, scale) of qkv, out_proj, cross q_proj, cross out_proj, fc1, fc2, with ins[i], outs[i], gelus[i];
  // groups[i]: 0 for int8 weights, else the int4 group size (its rowsum is unused).
  DecoderLayerStep(std::vector<torch::Tensor> norms, std::vector<double> eps, std::vector<torch::Tensor> linears,
                   std::vector<int64_t> ins, std::vector<int64_t> outs, std::vector<bool> gelus,
                   std::vector<int64_t> groups, int64_t heads)
      : norms_(std::move(norms)), eps_(std::move(eps)), linears_(std::move(linears)), ins_(std::move(ins)),
        outs_(std::move(outs)), gelus_(std::move(gelus)), groups_(std::move(groups)), heads_(heads) {
    TORCH_CHECK(norms_.size() == 6 && eps_.size() == 3 && linears_.size() == 18 && ins_.size() == 6 &&
                outs_.size() == 6 && gelus_.size() == 6 && groups_.size() == 6, "DecoderLayerStep: 3 norms and 6 linears");
  }

  // x (rows, 1, width); bounds: row offsets of the sequences (size sequences + 1); per sequence: this layer's
  // cache keys/values (rows_i, heads, capacity, head_dim) with `lengths[i]` positions filled (the new column
  // goes there), and the cross-attention keys/values (rows_i, heads, text, head_dim) with its additive mask.
  torch::Tensor step(torch::Tensor x, std::vector<int64_t> bounds, std::vector<torch::Tensor> keys,
                     std::vector<torch::Tensor> values, std::vector<int64_t> lengths,
                     std::vector<torch::Tensor> cross_keys, std::vector<torch::Tensor> cross_values,
                     std::vector<torch::Tensor> cross_masks) const {
    const int64_t rows = x.size(0), width = x.size(2), head_dim = width / heads_;
    const size_t sequences = keys.size();
    auto split_heads = [&](const torch::Tensor& t) { return t.view({t.size(0), 1, heads_, head_dim}).transpose(1, 2); };
    auto merge = [&](const std::vector<torch::Tensor>& parts) {
      auto heads = parts.size() == 1 ? parts[0] : at::cat(parts);
      return heads.to(x.scalar_type()).transpose(1, 2).reshape({rows, 1, width});
    };

    auto h = at::layer_norm(x, {width}, norms_[0], norms_[1], eps_[0]);
    auto qkv = apply(0, h).chunk(3, -1);
    auto q = split_heads(qkv[0]), k = split_heads(qkv[1]), v = split_heads(qkv[2]);
    std::vector<Attention> self_attention;
    for (size_t i = 0; i < sequences; ++i) {
      const int64_t r0 = bounds[i], r1 = bounds[i + 1], end = lengths[i] + 1;
      keys[i].slice(2, lengths[i], end).copy_(k.slice(0, r0, r1));
      values[i].slice(2, lengths[i], end).copy_(v.slice(0, r0, r1));
      self_attention.push_back({q.slice(0, r0, r1).to(keys[i].scalar_type()), keys[i].slice(2, 0, end),
                                values[i].slice(2, 0, end), c10::nullopt});
    }
    x = x + apply(1, merge(attend(self_attention)));

    h = at::layer_norm(x, {width}, norms_[2], norms_[3], eps_[1]);
    q = split_heads(apply(2, h));
    std::vector<Attention> cross_attention;
    for (size_t i = 0; i < sequences; ++i)
      cross_attention.push_back({q.slice(0, bounds[i], bounds[i + 1]), cross_keys[i], cross_values[i],
                                 cross_masks[i]});
    x = x + apply(3, merge(attend(cross_attention)));

    h = at::layer_norm(x, {width}, norms_[4], norms_[5], eps_[2]);
    auto hidden = apply(4, h);
    if (!gelus_[4]) hidden = at::gelu(hidden);
    return x + apply(5, hidden);
  }

 private:
  struct Attention {
    torch::Tensor query, keys, values;
    c10::optional<torch::Tensor> mask;
  };

  // torch's threads at 1 on this thread for one chunk of attention, restored after (a per-thread OpenMP
  // setting; torch's first parallel call on a thread sets it from the global count, so that call is made
  // first). The stepping thread itself is already at 1: the decoder runs pooled steps under
  // threads.pooled_step.
  struct TorchSingleThreaded {
    int saved = (at::get_num_threads(), omp_get_max_threads());
    TorchSingleThreaded() { omp_set_num_threads(1); }
    ~TorchSingleThreaded() { omp_set_num_threads(saved); }
  };

  // Each sequence's attention, cut into units the pool's threads share where it reads enough of the KV cache
  // to be worth it (a region costs a few us, more than a short attention): by rows (guidance gives two), then
  // by groups of heads. Every (row, head) is computed on its own by attend_one, so a slice gives the same values
  // as the whole call.
  std::vector<torch::Tensor> attend(const std::vector<Attention>& parts) const {
    struct Unit {
      size_t part;
      int64_t r0, r1, h0, h1;
    };
    std::vector<Unit> units;
    std::vector<torch::Tensor> outputs;
    // A contended pool (a neighbour on a helper's core) cuts coarser: a unit a preempted helper holds makes the
    // caller wait, and the waits are fewer with fewer units.
    const int64_t unit_bytes = musicgen::ElasticPool::instance().is_hot() ? g_attention_chunk_bytes
                                                                          : 8 * g_attention_chunk_bytes;
    for (size_t i = 0; i < parts.size(); ++i) {
      const auto& keys = parts[i].keys;
      const int64_t rows = keys.size(0);
      const int64_t bytes = 2 * rows * heads_ * keys.size(2) * keys.size(3) * keys.element_size();
      const int64_t chunks = g_use_openmp ? 1 : std::clamp<int64_t>(bytes / unit_bytes, 1, rows * heads_);
      if (chunks == 1) {
        units.push_back({i, 0, rows, 0, heads_});
        outputs.emplace_back();  // the whole call's output, made where it runs
        continue;
      }
      const int64_t row_step = chunks >= rows ? 1 : rows;  // rows first, then heads within a row
      const int64_t head_groups = std::max<int64_t>(1, chunks / (rows / row_step));
      const int64_t per_group = (heads_ + head_groups - 1) / head_groups;
      for (int64_t r = 0; r < rows; r += row_step)
        for (int64_t h0 = 0; h0 < heads_; h0 += per_group)
          units.push_back({i, r, std::min(rows, r + row_step), h0, std::min(heads_, h0 + per_group)});
      outputs.push_back(at::empty({rows, heads_, 1, parts[i].values.size(3)}, parts[i].query.options().dtype(torch::kFloat32)));
    }
    auto run_unit = [&](const Unit& unit) {
      const auto& part = parts[unit.part];
      auto cut = [&](const torch::Tensor& t) { return t.slice(0, unit.r0, unit.r1).slice(1, unit.h0, unit.h1); };
      c10::optional<torch::Tensor> mask;
      if (part.mask) {  // (rows, 1 or heads, 1, keys)
        mask = part.mask->slice(0, unit.r0, unit.r1);
        if (mask->size(1) != 1) mask = mask->slice(1, unit.h0, unit.h1);
      }
      auto result = attend_one(cut(part.query), cut(part.keys), cut(part.values), mask, -1);
      if (outputs[unit.part].defined())  // made beforehand only for a part that was cut
        cut(outputs[unit.part]).copy_(result);
      else
        outputs[unit.part] = result;
    };
    if (units.size() == parts.size()) {  // nothing cut: no pool
      for (const auto& unit : units) run_unit(unit);
      return outputs;
    }
    const at::ThreadLocalState caller_state;  // inference mode and the rest, for the helpers' torch calls
    musicgen::ElasticPool::instance().run(static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard same_state(caller_state);
      TorchSingleThreaded single;  // a helper's own sdpa must not start a team either
      for (int64_t u = begin; u < end; ++u) run_unit(units[u]);
    });
    return outputs;
  }

  torch::Tensor apply(size_t index, const torch::Tensor& input) const {
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

}  // namespace
