"""Sampling: transformers' processors on the same logits, per-sequence seeds, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (ClassifierFreeGuidanceLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from musicgen_core import MusicGen, SamplingParams
from musicgen_core.sampling import guided_logits


def kept_tokens(scores: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(scores)


def our_filtered_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Re-run choose_tokens' filtering without the draw, by sampling many times and collecting support."""
    from musicgen_core.sampling import choose_tokens
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(logits.shape[1:], dtype=torch.bool)
    for _ in range(400):
        tokens = choose_tokens(logits, params, generator)
        seen[torch.arange(logits.shape[1]), tokens] = True
    return seen


def test_guidance_matches_transformers_processor():
    logits = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    reference = ClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(4, 1, dtype=torch.long), logits.reshape(8, 64)).reshape(4, 64)
    assert torch.equal(guided_logits(logits, SamplingParams(guidance_scale=3.0)), reference)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.5, 1.0), (8, 0.9, 0.7)],
                         ids=["top_k", "top_p", "all"])
def test_sampled_tokens_stay_in_transformers_support(top_k, top_p, temperature):
    logits = 3 * torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
    scores = logits[0]
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    support = kept_tokens(scores)
    params = SamplingParams(guidance_scale=1.0, temperature=temperature, top_k=top_k, top_p=top_p)
    seen = our_filtered_scores(logits, params)
    assert not (seen & ~support).any()
    assert seen.sum() >= min(support.sum(), 4)


def draw_counts(logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    from musicgen_core.sampling import choose_tokens
    generator = torch.Generator().manual_seed(3)
    counts = torch.zeros(logits.shape[1:])
    for _ in range(draws):
        tokens = choose_tokens(logits, params, generator)
        counts[torch.arange(logits.shape[1]), tokens] += 1
    return counts


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 1.0), (5, 0.8)], ids=["top_k", "full", "top_k_top_p"])
def test_draws_follow_the_filtered_softmax(top_k, top_p):
    """Each kept token comes up as often as its probability says (within 4 standard deviations), whether the
    draw runs over the top-k only or over the whole vocabulary."""
    logits = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(guidance_scale=1.0, top_k=top_k, top_p=top_p)
    scores = logits[0]
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = scores.softmax(dim=-1)
    draws = 6000
    frequency = draw_counts(logits, params, draws) / draws
    tolerance = 4 * (expected * (1 - expected) / draws).sqrt() + 1e-9
    assert ((frequency - expected).abs() <= tolerance).all()


def test_a_token_tied_with_the_kth_stays_in_as_transformers_keeps_it():
    logits = torch.tensor([[[5.0, 4.0, 3.0, 3.0, -1.0, -2.0]]])
    counts = draw_counts(logits, SamplingParams(guidance_scale=1.0, top_k=3), 2000)[0]
    assert counts[2] > 0 and counts[3] > 0 and counts[4:].sum() == 0


def test_non_finite_logits_are_refused_not_sampled():
    from musicgen_core.sampling import choose_tokens
    logits = torch.randn(1, 2, 16)
    logits[0, 1, 3] = math.nan
    for top_k in (5, 0):
        with pytest.raises(ValueError, match="not finite"):
            choose_tokens(logits, SamplingParams(guidance_scale=1.0, top_k=top_k), torch.Generator())


def test_seed_reproduces_and_different_seeds_differ(mono_checkpoint):
    model = MusicGen.from_pretrained(mono_checkpoint)
    first = model.generate("warm lofi beat", frames=12, params=model.default_sampling(seed=11))
    again = model.generate("warm lofi beat", frames=12, params=model.default_sampling(seed=11))
    other = model.generate("warm lofi beat", frames=12, params=model.default_sampling(seed=12))
    assert torch.equal(first.codes, again.codes)
    assert not torch.equal(first.codes, other.codes)


def test_a_sequence_seed_does_not_depend_on_its_batch(mono_checkpoint):
    """Each sequence draws from its own generator, so sampling alone or beside others gives the same codes."""
    model = MusicGen.from_pretrained(mono_checkpoint)
    params = model.default_sampling(seed=5)
    alone = model.start_sequence(model.encode_text(["dark techno"])[0], params, total_frames=10)
    together = model.start_sequence(model.encode_text(["dark techno"])[0], params, total_frames=10)
    neighbour = model.start_sequence(model.encode_text(["ambient"])[0], model.default_sampling(seed=6),
                                     total_frames=10)
    while not alone.finished:
        model.step([alone])
        model.step([neighbour, together])
    assert torch.equal(alone.grid.frames(0, 10), together.grid.frames(0, 10))


@pytest.mark.parametrize("field,value", [("guidance_scale", -1.0), ("guidance_scale", math.nan),
                                         ("temperature", 0.0), ("top_k", -3), ("top_p", 0.0), ("top_p", 1.5),
                                         ("seed", -1)])
def test_out_of_range_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validated()
