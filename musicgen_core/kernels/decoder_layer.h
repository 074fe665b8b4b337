// One decoder layer for one new column per sequence, in C++ over the int8 kernel's `linear` (int8_gemv.cpp,
// the one translation unit that includes this header and binds both to Python).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace {

// Defined in int8_gemv.cpp: x (..., in_features) float32 @ the dequantized packed weight, then GELU if gelu.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor rowsum, torch::Tensor scale,
                     int64_t in_features, int64_t out, bool gelu);

// One decoder layer for one new column per sequence (a decode step), int8 linears throughout: the same ATen
// operations in the same order as MusicgenDecoder._layer in Python, so the result is bit-identical, without
// ~40 trips through Python per layer (about 3 ms of a musicgen-small step).
class DecoderLayerStep {
 public:
  // norms: (weight, bias) of the self-attention, cross-attention and final layer norms; linears: (packed,
  // rowsum, scale) of qkv, out_proj, cross q_proj, cross out_proj, fc1, fc2, with ins[i], outs[i], gelus[i].
  DecoderLayerStep(std::vector<torch::Tensor> norms, std::vector<double> eps, std::vector<torch::Tensor> linears,
                   std::vector<int64_t> ins, std::vector<int64_t> outs, std::vector<bool> gelus, int64_t heads)
      : norms_(std::move(norms)), eps_(std::move(eps)), linears_(std::move(linears)), ins_(std::move(ins)),
        outs_(std::move(outs)), gelus_(std::move(gelus)), heads_(heads) {
    TORCH_CHECK(norms_.size() == 6 && eps_.size() == 3 && linears_.size() == 18 && ins_.size() == 6 &&
                outs_.size() == 6 && gelus_.size() == 6, "DecoderLayerStep: 3 norms and 6 linears");
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
    std::vector<torch::Tensor> outputs;
    for (size_t i = 0; i < sequences; ++i) {
      const int64_t r0 = bounds[i], r1 = bounds[i + 1], end = lengths[i] + 1;
      keys[i].slice(2, lengths[i], end).copy_(k.slice(0, r0, r1));
      values[i].slice(2, lengths[i], end).copy_(v.slice(0, r0, r1));
      outputs.push_back(at::scaled_dot_product_attention(
          q.slice(0, r0, r1).to(keys[i].scalar_type()), keys[i].slice(2, 0, end), values[i].slice(2, 0, end),
          c10::nullopt, 0.0, false, c10::nullopt, false));
    }
    x = x + apply(1, merge(outputs));

    h = at::layer_norm(x, {width}, norms_[2], norms_[3], eps_[1]);
    q = split_heads(apply(2, h));
    outputs.clear();
    for (size_t i = 0; i < sequences; ++i)
      outputs.push_back(at::scaled_dot_product_attention(q.slice(0, bounds[i], bounds[i + 1]), cross_keys[i],
                                                         cross_values[i], cross_masks[i], 0.0, false, c10::nullopt,
                                                         false));
    x = x + apply(3, merge(outputs));

    h = at::layer_norm(x, {width}, norms_[4], norms_[5], eps_[2]);
    auto hidden = apply(4, h);
    if (!gelus_[4]) hidden = at::gelu(hidden);
    return x + apply(5, hidden);
  }

 private:
  torch::Tensor apply(size_t index, const torch::Tensor& input) const {
    return linear(input, linears_[3 * index], linears_[3 * index + 1], linears_[3 * index + 2], ins_[index],
                  outs_[index], gelus_[index]);
  }

  std::vector<torch::Tensor> norms_;
  std::vector<double> eps_;
  std::vector<torch::Tensor> linears_;
  std::vector<int64_t> ins_;
  std::vector<int64_t> outs_;
  std::vector<bool> gelus_;
  int64_t heads_;
};

}  // namespace
