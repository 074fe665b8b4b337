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
from .threads import torch_single_threaded


@dataclass
class SequenceState:
    grid: DelayGrid
    cache: KVCache
    cross: CrossAttentionKV
    params: SamplingParams
    generator: torch.Generator
    steps: int = 0
    prompt_weights: tuple[float, ...] = (1.0,)  # normalised, one per conditional row (prompts.py)
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


def step_sequences(decoder: MusicgenDecoder, states: list[SequenceState], graphs=None,
                   max_prefill_columns: int | None = None,
                   prefills: list[tuple[SequenceState, torch.Tensor]] = ()) -> list[StepResult | None]:
    """Advance every state by one column. States reading the same number of columns share one forward
    (the usual case: one column each); a state still to prefill its prompt runs in its own group.
    `graphs` (a cuda_graphs.GraphCache) replays a captured step when the same set of states repeats.

    max_prefill_columns: a state with more pending columns reads only that many this call and samples nothing
    (its result is None): a long prompt is prefilled over several calls, so the others' steps are not held
    behind it. prefills: (state, columns) pairs whose caches take those columns in the same forwards, nothing
    sampled (a sequence prepared in the background). With our kernel's attention every query is computed on
    its own, so how a prompt is cut does not change a bit of the result."""
    if not states and not prefills:
        return []
    for state in states:
        if state.finished:
            raise ValueError("step_sequences on a finished sequence")
    graphed = graphs.logits(decoder, states) if graphs is not None and not prefills and states else None
    if graphed is not None:
        return _sample(states, [value[:, :, -1] for value in graphed])
    pending = [state.pending_columns() for state in states]
    capped = [max_prefill_columns is not None and columns.shape[1] > max_prefill_columns for columns in pending]
    pending = [columns[:, :max_prefill_columns] if cut else columns for columns, cut in zip(pending, capped)]
    members = [*zip(states, pending), *prefills]
    groups: dict[int, list[int]] = {}
    for index, (_, columns) in enumerate(members):
        groups.setdefault(columns.shape[1], []).append(index)
    logits: list[torch.Tensor | None] = [None] * len(members)
    device = decoder.layer_norm.weight.device
    for group in groups.values():
        out = decoder([members[i][1].to(device) for i in group], [members[i][0].cache for i in group],
                      [members[i][0].cross for i in group])
        for i, value in zip(group, out):
            logits[i] = value[:, :, -1]
    sampled = [i for i, cut in enumerate(capped) if not cut]
    results: list[StepResult | None] = [None] * len(states)
    for i, result in zip(sampled, _sample([states[i] for i in sampled], [logits[i] for i in sampled])):
        results[i] = result
    return results


def _sample(states: list[SequenceState], logits: list[torch.Tensor]) -> list[StepResult]:
    with torch_single_threaded():  # (codebooks, vocab) per sequence: too small to share out
        return [_sample_one(state, value) for state, value in zip(states, logits)]


def _sample_one(state: SequenceState, value: torch.Tensor) -> StepResult:
    tokens = choose_tokens(value, state.params, state.generator, state.prompt_weights)
    index = state.grid.next_column
    column = state.grid.place(tokens.cpu())
    state.steps += 1
    frame = state.grid.completed_frame()
    codes = None if frame is None else state.grid.frame(frame).clone()
    return StepResult(column.clone(), index, frame, codes)
