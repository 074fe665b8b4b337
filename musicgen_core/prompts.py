"""Weighted prompts: several texts steering one sequence, each its own conditional row beside the
unconditional one.

Guidance over several conditions (the rule `sampling.guided_logits` applies):

    guided = uncond + g * sum_i w_i * (cond_i - uncond),   weights normalised to sum 1

Each prompt pulls the distribution away from the unconditional one in its own direction, by its share of the
guidance scale. Normalising keeps `guidance_scale` meaning what it means for one prompt (the total pull),
however many prompts there are, and makes (1, 0) the first prompt alone and (0.5, 0.5) halfway between.
A single prompt at any weight is today's classifier-free guidance, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

MAX_PROMPTS = 4  # each adds a decoder row: the step reads the weights once for all rows, attention is per row


class PromptSetError(ValueError):
    """A bad set of weighted prompts; `field` names the offending entry (e.g. prompts[1].weight)."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


@dataclass(frozen=True)
class WeightedPrompts:
    """texts[i] (empty = unconditional) at weights[i]; weights >= 0, normalised to sum 1."""

    texts: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def single(cls, text: str | None) -> "WeightedPrompts":
        return cls((text or "",), (1.0,))

    @classmethod
    def of(cls, pairs: Iterable[tuple[str | None, float]], field: str = "prompts") -> "WeightedPrompts":
        """Validated and normalised; PromptSetError naming `field[i].weight` (or `field`) otherwise."""
        pairs = [(text or "", weight) for text, weight in pairs]
        if not pairs:
            raise PromptSetError(field, "give at least one prompt")
        if len(pairs) > MAX_PROMPTS:
            raise PromptSetError(field, f"at most {MAX_PROMPTS} prompts, got {len(pairs)}")
        for index, (text, weight) in enumerate(pairs):
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise PromptSetError(f"{field}[{index}].weight", f"must be finite and >= 0, got {weight}")
            if text in (earlier for earlier, _ in pairs[:index]):
                raise PromptSetError(f"{field}[{index}].text", f"{text!r} appears twice; give it one weight")
        largest = max(weight for _, weight in pairs)
        if largest <= 0:
            raise PromptSetError(field, "the weights sum to 0; give at least one a positive weight")
        scaled = [weight / largest for _, weight in pairs]  # no overflow summing weights near the float limit
        total = math.fsum(scaled)
        return cls(tuple(text for text, _ in pairs), tuple(weight / total for weight in scaled))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label(self) -> str:
        """The text of a single prompt; `text=weight | ...` for several."""
        if len(self.texts) == 1:
            return self.texts[0]
        return " | ".join(f"{text}={weight:.3g}" for text, weight in zip(self.texts, self.weights))

    def with_weights(self, weights: Iterable[float]) -> "WeightedPrompts":
        return WeightedPrompts.of(zip(self.texts, weights))

    def blend(self, target: "WeightedPrompts", amount: float) -> "WeightedPrompts":
        """(1 - amount) x these weights + amount x target's, over these texts then target's new ones (a text
        missing from a set has weight 0 there): a step of a timed transition, amount in [0, 1]."""
        texts = self.texts + tuple(text for text in target.texts if text not in self.texts)
        before = [self.weights[self.texts.index(t)] if t in self.texts else 0.0 for t in texts]
        after = [target.weights[target.texts.index(t)] if t in target.texts else 0.0 for t in texts]
        return WeightedPrompts(texts, tuple((1.0 - amount) * b + amount * a for b, a in zip(before, after)))

    def rows_from(self, before: "WeightedPrompts") -> list[int]:
        """For each of these prompts, the row of `before` whose self-attention history it continues: the same
        text's row, else the row of the heaviest earlier prompt (a single prompt's change keeps its row, so
        several prompts extend that rule)."""
        heaviest = max(range(len(before.weights)), key=lambda i: before.weights[i])
        return [before.texts.index(text) if text in before.texts else heaviest for text in self.texts]
