"""Per-sequence generation state and the batched decoder step.

A `SequenceState` is everything one sequence (one server session) needs between steps: its delay grid, its
self-attention cache, its cross-attention keys/values, its sampling parameters and its own random generator.
`step_sequences` advances any set of them together by one decoder step (one column each); sequences may join
or leave between calls. (The codec's own step is `streaming_codec.decode_step`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decoder import MusicgenDecoder
from .delay import DelayGrid
from .sampling import SamplingParams, choose_tokens
from .state import CrossAttentionKV, KVCache


@dataclass
class SequenceState:
    grid: DelayGrid
    cache: KVCache
    cross: CrossAttentionKV
    params: SamplingParams
    generator: torch.Generator
    steps: int = 0
    extra: dict = field(default_factory=dict)  # room for the caller's bookkeeping (e.g. the session's id)

    @property
    def finished(self) -> bool:
        return self.grid.finished

    def pending_columns(self) -> torch.Tensor:
        """(codebooks, n) columns the decoder has not read yet: the whole prompt first, then one per step."""
        return self.grid.tokens[:, self.cache.length: self.grid.next_column]


@dataclass(frozen=True)
class StepResult:
    column: torch.Tensor  # (codebooks,) the column just generated, delay layout
    column_index: int
    completed_frame: int | None  # frame whose last codebook this column holds (prompt frames included)
    completed_codes: torch.Tensor | None  # (codebooks,) that frame's codes, aligned; None with no frame


def step_sequences(decoder: MusicgenDecoder, states: list[SequenceState], graphs=None) -> list[StepResult]:
    """Advance every state by one column. States reading the same number of columns share one forward
    (the usual case: one column each); a state still to prefill its prompt runs in its own group.
    `graphs` (a cuda_graphs.GraphCache) replays a captured step when the same set of states repeats."""
    if not states:
        return []
    for state in states:
        if state.finished:
            raise ValueError("step_sequences on a finished sequence")
    graphed = graphs.logits(decoder, states) if graphs is not None else None
    if graphed is not None:
        return _sample(states, [value[:, :, -1] for value in graphed])
    groups: dict[int, list[int]] = {}
    pending = [state.pending_columns() for state in states]
    for index, columns in enumerate(pending):
        groups.setdefault(columns.shape[1], []).append(index)
    logits: list[torch.Tensor | None] = [None] * len(states)
    device = decoder.layer_norm.weight.device
    for members in groups.values():
        out = decoder([pending[i].to(device) for i in members], [states[i].cache for i in members],
                      [states[i].cross for i in members])
        for i, value in zip(members, out):
            logits[i] = value[:, :, -1]
    return _sample(states, logits)


def _sample(states: list[SequenceState], logits: list[torch.Tensor]) -> list[StepResult]:
    results = []
    for state, value in zip(states, logits):
        tokens = choose_tokens(value, state.params, state.generator)
        index = state.grid.next_column
        column = state.grid.place(tokens.cpu())
        state.steps += 1
        frame = state.grid.completed_frame()
        codes = None if frame is None else state.grid.frame(frame).clone()
        results.append(StepResult(column.clone(), index, frame, codes))
    return results
