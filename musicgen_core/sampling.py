"""Sampling parameters and next-token choice: classifier-free guidance, then temperature, top-k, top-p
(transformers' order), then greedy argmax or a draw from the sequence's own seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .config import GenerationDefaults


@dataclass(frozen=True)
class SamplingParams:
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults, **overrides) -> "SamplingParams":
        """The checkpoint's generation_config.json values, then explicit overrides (None = keep)."""
        params = cls(guidance_scale=defaults.guidance_scale, temperature=defaults.temperature,
                     top_k=defaults.top_k, top_p=defaults.top_p, greedy=not defaults.do_sample)
        given = {key: value for key, value in overrides.items() if value is not None}
        return replace(params, **given).validated()

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def validated(self) -> "SamplingParams":
        """Self, or ValueError naming the first out-of-range field."""
        if not math.isfinite(self.guidance_scale) or not 0.0 <= self.guidance_scale <= 100.0:
            raise ValueError(f"guidance_scale must be in [0, 100], got {self.guidance_scale}")
        if not math.isfinite(self.temperature) or not 0.0 < self.temperature <= 100.0:
            raise ValueError(f"temperature must be in (0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        return self


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def guided_logits(logits: torch.Tensor, params: SamplingParams,
                  weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """logits: (rows, codebooks, vocab) with rows = [conditional_1 .. conditional_n, unconditional] under
    guidance, [conditional_1 .. conditional_n] without; weights: the prompts' normalised weights (None = one
    prompt). The rule and why: `prompts.py`. One prompt is transformers' guidance expression, as written."""
    weights = weights or (1.0,)
    conditional = logits.shape[0] - 1 if params.uses_guidance else logits.shape[0]
    if conditional != len(weights):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(weights)} prompts")
    if not params.uses_guidance:
        if len(weights) == 1:
            return logits[0]
        return sum(logits[i] * weight for i, weight in enumerate(weights))
    unconditional = logits[-1]
    pull = logits[0] - unconditional
    if len(weights) > 1:
        pull = pull * weights[0]
        for i in range(1, len(weights)):
            pull = pull + (logits[i] - unconditional) * weights[i]
    return unconditional + pull * params.guidance_scale


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                  weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """(rows, codebooks, vocab) float32 logits -> (codebooks,) token ids."""
    scores = guided_logits(logits, params, weights)
    if params.greedy:
        return scores.argmax(dim=-1)
    if params.temperature != 1.0:
        scores = scores / params.temperature
    k = params.top_k
    if 0 < k < scores.shape[-1] - 1 and params.top_p >= 1.0:
        # musicgen's default (top-k 250 of 2048): draw among the k best only. One more value tells whether the
        # k-th ties with the next (then transformers keeps every tied token: the general path below).
        values, indices = torch.topk(scores, k + 1, dim=-1)
        if bool((values[..., k - 1] > values[..., k]).all()):
            return indices[..., :k].gather(-1, draw(values[..., :k].softmax(dim=-1), generator)).squeeze(-1)
    if 0 < params.top_k < scores.shape[-1]:  # transformers' TopKLogitsWarper: ties with the k-th stay in
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    return draw(scores.softmax(dim=-1), generator).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(..., n) probabilities -> (..., 1) indices, each i with probability probs[..., i] (to float rounding):
    one uniform number per row placed on the cumulative distribution. torch.multinomial drew n exponential
    numbers per row (its sampler for one draw), ~150 us for musicgen's 4 x 2048 on one core of the Xeon, where
    this, over the top-k only, takes a few. A probability of zero is never drawn. NaN probabilities (logits
    gone bad) raise, as multinomial did."""
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[..., -1:]
    if not bool(torch.isfinite(total).all()):  # a NaN anywhere makes its row's total NaN
        raise ValueError("sampling: the next-token probabilities are not finite")
    uniform = torch.rand(*probs.shape[:-1], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    chosen = torch.searchsorted(cumulative, uniform * total, right=True)
    return chosen.clamp_(max=probs.shape[-1] - 1)
