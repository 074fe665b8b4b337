"""T5 text encoder: relative position buckets, RMS layer norm, relu or gated feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import T5Config


class RMSNorm(nn.Module):
    """T5's layer norm: no mean subtraction, no bias, variance taken in float32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int,
                              device: torch.device) -> torch.Tensor:
    """(query_len, key_len) bucket ids for bidirectional attention: exact buckets near, log-spaced far."""
    relative = torch.arange(key_len, device=device)[None, :] - torch.arange(query_len, device=device)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far = torch.clamp(far, max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported T5 activation {name!r}")


class T5SelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        split = lambda t: t.view(batch, length, self.num_heads, self.d_kv).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(2, 3)) + bias  # T5 does not scale by 1/sqrt(d)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, -1)
        return self.o(out)


class T5Layer(nn.Module):
    """Holds `.layer_norm` plus either `.SelfAttention` or `.DenseReluDense`, named as in the checkpoints."""


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = _activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(hidden.to(self.wo.weight.dtype))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        attention, feed_forward = T5Layer(), T5Layer()
        attention.SelfAttention = T5SelfAttention(config, has_relative_bias)
        attention.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        feed_forward.DenseReluDense = T5FeedForward(config)
        feed_forward.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.layer = nn.ModuleList([attention, feed_forward])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attention, feed_forward = self.layer
        x = x + attention.SelfAttention(attention.layer_norm(x), bias)
        return x + feed_forward.DenseReluDense(feed_forward.layer_norm(x))


class T5Encoder(nn.Module):
    """Parameter names follow transformers' T5EncoderModel with the `encoder.` level removed."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.block = nn.ModuleList([T5Block(config, i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (batch, length) -> hidden states (batch, length, d_model)."""
        x = self.shared(input_ids)
        length = input_ids.shape[1]
        buckets = relative_position_buckets(length, length, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance, input_ids.device)
        position_bias = self.block[0].layer[0].SelfAttention.relative_attention_bias(buckets)
        position_bias = position_bias.permute(2, 0, 1)[None].to(x.dtype)  # (1, heads, q, k)
        padding = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        bias = position_bias + padding
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)
