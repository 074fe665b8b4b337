"""A session's frame source: its decoder sequence, from start through re-primes, appends and prompt changes, and
the completed frames each step yields, numbered in the session's output. Engine thread only."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from musicgen_core import (MAX_PROMPTS, MusicGen, SamplingParams, SequenceState, StepResult, TextConditioning,
                           WeightedPrompts)
from musicgen_core.delay import build_delayed, columns_for, max_frames


@dataclass(frozen=True)
class Limits:
    """A session's context limits, from EngineConfig, the model and the session's request."""

    context_frames: int  # the context window: frames a sequence holds before it re-primes
    reprime_keep_frames: int  # frames of recent context a re-primed sequence starts from


@dataclass(frozen=True)
class Transition:
    """A timed change of prompts: session frame `first + j` is completed (its last codebook sampled) under
    start.blend(target, (j + 1) / frames), so the weights move linearly and frame first + frames - 1 is the
    first under the target alone. `start` holds the mix at the change over both sets' texts."""

    start: WeightedPrompts
    target: WeightedPrompts
    first: int
    frames: int

    def mix_at(self, frame: int) -> WeightedPrompts:
        return self.start.blend(self.target, min(1.0, (frame - self.first + 1) / self.frames))

    @property
    def last(self) -> int:
        return self.first + self.frames - 1


@dataclass(frozen=True)
class MixStep:
    """What `FrameSource.before_step` did to the weights: the frame the coming step completes, the mix it
    completes it under, and whether that ends a transition."""

    frame: int
    mix: WeightedPrompts
    ends_transition: bool


GENERATOR_STATES_KEPT = 512  # steps a rollback may go back (~10 s at 50 frames/s; ~5 KB each)


class TextEncodings:
    """The text encoder's output per prompt text, the most recently used `capacity` kept. The encoder is a pure
    function of the text, so a hit is exact; it spares a musicgen-small session ~45 ms of CPU time each time a
    prompt comes back (a new session, a set-prompt back to an earlier text, every re-prime). Engine thread only."""

    def __init__(self, model: MusicGen, capacity: int = 64):
        self.model, self.capacity = model, capacity
        self._entries: OrderedDict[str, TextConditioning] = OrderedDict()

    def __call__(self, text: str) -> TextConditioning:
        if text in self._entries:
            self._entries.move_to_end(text)
            return self._entries[text]
        conditioning = self.model.encode_text([text])[0]
        self._entries[text] = conditioning
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return conditioning


class FrameSource:
    """The sequence a session generates from. `frames_done` counts the generated frames that have completed
    (session numbering: the audio prompt is not counted); the codes of the most recent window are kept in
    `history` for re-priming.

    The re-prime's next sequence is prepared while the current one plays (`next_columns`): its prompt is the
    last `reprime_keep_frames` frames before the window fills, and the frame at which it fills is known, so
    from that prompt's first frame on, each step feeds the next sequence's cache the column its newest frame
    completes, in the same forward as the session's own step (one pass over the weights for both). At the
    re-prime only the last column or two are left to read: no prefill stall, for this session or the others.
    A text change drops the prepared cache (it was computed under the old text); it is rebuilt from the
    frames known, a chunk per step. A change of weights alone keeps it (weights act after the decoder)."""

    def __init__(self, model: MusicGen, limits: Limits, prompts: WeightedPrompts, params: SamplingParams,
                 total_frames: int | None, encode_text: Callable[[str], TextConditioning]):
        self.model, self.limits, self.encode_text = model, limits, encode_text
        self.prompts, self.params = prompts, params
        self.total_frames = total_frames  # new frames to generate; None = unbounded
        self.state: SequenceState | None = None
        self.generator: torch.Generator | None = None  # one per session, carried across re-primes
        self.frame_offset = 0  # session frame index of the current grid's frame 0
        self.frames_done = 0
        self.history = torch.zeros(model.config.decoder.num_codebooks, 0, dtype=torch.long)
        self.next: SequenceState | None = None  # the re-prime's next sequence, its cache being filled
        self.transition: Transition | None = None  # a timed prompt change in progress
        # the session generator's state before each recent step, by the frame that step first touched: a
        # rollback to that frame draws the same numbers again (bounded: ~10 s of steps)
        self.generator_states: OrderedDict[int, torch.Tensor] = OrderedDict()

    @property
    def finished(self) -> bool:
        return self.state is not None and self.state.finished

    @property
    def full(self) -> bool:
        """The sequence reached its capacity: re-prime before the next step."""
        grid = self.state.grid
        return grid.next_column >= grid.capacity

    def encode_audio(self, audio: np.ndarray) -> torch.Tensor:
        """(channels, samples) at the model's rate -> codes (codebooks, frames)."""
        return self.model.encode_audio(torch.from_numpy(audio)).cpu()

    def start(self, prompt_codes: torch.Tensor | None) -> None:
        """The first sequence, continuing from an audio prompt's codes (None: from nothing)."""
        if prompt_codes is not None:
            self.history = prompt_codes[:, -self.limits.context_frames:]
            prompt_codes = prompt_codes[:, -(self.limits.context_frames - 1):]
        self._start_sequence(prompt_codes)

    def resume(self, codes: torch.Tensor, first_frame: int) -> None:
        """The first sequence of a session continued from its codes (frames [first_frame - n, first_frame)):
        what a re-prime at first_frame would start, so the frames after it are the re-prime's."""
        self.frames_done = first_frame
        if self.total_frames is not None:
            self.total_frames += first_frame  # the duration counts from the resume point
        self.history = codes[:, -self.limits.context_frames:]
        keep = self.limits.reprime_keep_frames
        self._start_sequence(codes[:, -keep:] if keep else None)

    def remember_step(self) -> None:
        """Before a step: the generator state it starts from, for a rollback to the frame it first touches."""
        self.generator_states[self.next_change_frame] = self.generator.get_state()
        while len(self.generator_states) > GENERATOR_STATES_KEPT:
            self.generator_states.popitem(last=False)

    @property
    def earliest_rewind_frame(self) -> int:
        """The first frame a rollback can return to: the current sequence's first generated frame (what came
        before was generated in an earlier sequence), and no earlier than the generator states kept."""
        first = self.frame_offset + self.state.grid.prompt_frames
        if self.generator_states:
            first = max(first, next(iter(self.generator_states)))
        return first

    def rewind(self, frame: int) -> None:
        """Back to just before the step that first touched `frame` (earliest_rewind_frame <= frame <
        frames_done): the grid, the cache length, the history and the generator as they were then; the
        prepared re-prime is dropped. What a prompt change at `frame` would have found."""
        if not self.earliest_rewind_frame <= frame < self.frames_done:
            raise ValueError(f"cannot rewind to frame {frame}: frames {self.earliest_rewind_frame}.."
                             f"{self.frames_done - 1} can be")
        column = self.state.grid.rewind(frame - self.frame_offset)
        self.state.cache.length = column - 1
        dropped = self.frames_done - frame
        self.history = self.history[:, : self.history.shape[1] - dropped]
        self.frames_done = frame
        self.next = None
        self.transition = None
        if frame in self.generator_states:
            self.generator.set_state(self.generator_states[frame])
        for later in [f for f in self.generator_states if f > frame]:
            del self.generator_states[later]

    def recent_codes(self, start: int, stop: int) -> torch.Tensor:
        """(codebooks, stop - start) codes of completed frames [start, stop) still in the history."""
        first = self.frames_done - self.history.shape[1]
        if start < first or stop > self.frames_done:
            raise ValueError(f"frames {start}..{stop - 1} are not in the history ({first}..{self.frames_done - 1})")
        return self.history[:, start - first: stop - first]

    def take(self, result: StepResult | None) -> torch.Tensor | None:
        """The generated frame this step completed, (codebooks,) codes, if any (prompt frames are not output;
        None: the step read a chunk of a long prompt and sampled nothing)."""
        if result is None or result.completed_frame is None or result.completed_frame < self.state.grid.prompt_frames:
            return None
        self.frames_done += 1
        recent = torch.cat([self.history, result.completed_codes[:, None]], dim=1)
        self.history = recent[:, -self.limits.context_frames:]
        return result.completed_codes

    def reprime(self) -> int:
        """The context window is full: a new sequence from the most recent frames, same conditioning (its cache
        as far as `next_columns` filled it). -> the frames kept."""
        keep = self.history[:, -self.limits.reprime_keep_frames:] if self.limits.reprime_keep_frames else None
        prepared, self.next = self.next, None
        self._start_sequence(keep)
        if prepared is not None and keep is not None and prepared.cache.length <= keep.shape[1]:
            self.state.cache = prepared.cache  # holds columns 0 .. length-1 of this very prompt
        return 0 if keep is None else keep.shape[1]

    def next_columns(self, most: int) -> tuple[SequenceState, torch.Tensor] | None:
        """The re-prime's next sequence and the columns of its prompt it can read now (at most `most`; one
        in the steady state), or None. Its prompt is session frames [switch - keep, switch), switch being the
        frame at which the current sequence fills; column c of it needs that prompt's first c frames."""
        keep = self.limits.reprime_keep_frames
        if self.state is None or self.state.grid.total_frames is not None or not keep:
            return None  # this sequence ends the session, or a re-prime keeps nothing
        first = self.frame_offset + max_frames(self.state.grid.capacity, self.model.config.decoder.delays) - keep
        known = min(keep, self.frames_done - first)
        if known < 1:
            return None
        if self.next is None:
            total, capacity = self._shape(keep, first + keep)
            self.next = self.model.start_sequence(self._conditioning(), self.params, None, total_frames=total,
                                                  capacity=capacity, weights=self.prompts.weights)
        done = self.next.cache.length
        stop = min(known, done + most)  # column `keep` is left to the new sequence's first step, which samples
        if stop <= done:
            return None
        decoder = self.model.config.decoder
        prompt = self.history[:, self.history.shape[1] - (self.frames_done - first):][:, :stop]  # what they need
        columns = build_delayed(prompt, decoder.delays, decoder.pad_token_id, stop)[:, done:stop]
        return self.next, columns

    @property
    def next_change_frame(self) -> int:
        """The first frame the next step touches (samples any code of): where a prompt change lands."""
        return self.frame_offset + self.state.grid.first_frame_of_next_column()

    def set_prompt(self, prompts: WeightedPrompts | None, params: SamplingParams | None,
                   transition_frames: int = 0) -> int:
        """New prompts (texts, weights) and/or sampling from the next column; the self-attention cache is kept
        (a new set of prompts continues the rows `WeightedPrompts.rows_from` names). transition_frames > 0:
        the weights move from the mix in effect to the new prompts over that many frames (`Transition`). -> the
        first frame with any code sampled under the change (earlier frames are untouched)."""
        if params is not None:
            if params.uses_guidance != self.params.uses_guidance:
                raise ValueError("sampling.guidance_scale: cannot switch guidance on or off mid-session")
            if params.seed is not None and params.seed != self.params.seed:
                self.generator.manual_seed(params.seed)
            self.params = params
            self.state.params = params
        first = self.next_change_frame
        if prompts is not None:
            running, self.transition = self.transition, None
            if transition_frames > 0:
                start = self._transition_start(prompts, running)
                self.transition = Transition(start, prompts, first, transition_frames)
                prompts = start
            self._use_prompts(prompts)
        return first

    def _transition_start(self, target: WeightedPrompts, running: Transition | None) -> WeightedPrompts:
        """The mix in effect over its texts and the target's: texts at weight 0 that the target drops go, and
        a union past 2 x MAX_PROMPTS (a transition begun during another) starts from the running transition's
        own target instead, so the rows stay bounded."""
        current = self.prompts
        if len(set(current.texts) | set(target.texts)) > 2 * MAX_PROMPTS and running is not None:
            current = running.target
        kept = [(t, w) for t, w in zip(current.texts, current.weights) if w > 0 or t in target.texts]
        return WeightedPrompts(tuple(t for t, _ in kept), tuple(w for _, w in kept)).blend(target, 0.0)

    def before_step(self) -> MixStep | None:
        """Before each step of a transition: the weights for the frame the step completes; after its last
        frame, the target's texts alone (rows of texts it dropped go)."""
        if self.transition is None:
            return None
        frame = self.next_change_frame
        if frame > self.transition.last:
            target, self.transition = self.transition.target, None
            self._use_prompts(target)
            return MixStep(frame, target, False)
        mix = self.transition.mix_at(frame)
        self._use_prompts(mix)
        return MixStep(frame, mix, frame == self.transition.last)

    def _use_prompts(self, prompts: WeightedPrompts) -> None:
        before, self.prompts = self.prompts, prompts
        if prompts.texts != before.texts:
            rows = prompts.rows_from(before) + ([len(before)] if self.params.uses_guidance else [])
            if rows != list(range(self.state.cache.rows)):
                self.state.cache = self.state.cache.select_rows(rows)
            self.state.cross = self.model.cross_attention(self._conditioning(), self.params.uses_guidance)
            self.next = None  # its cache was computed under the old texts
        for state in (self.state, self.next):
            if state is not None:
                state.prompt_weights = prompts.weights

    def append(self, codes: torch.Tensor, replace_context: bool) -> None:
        """Continue from these codes: alone (replace_context: an exact offline continuation of them), or after
        the recent context."""
        context = codes if replace_context else torch.cat([self.history, codes], dim=1)
        keep = min(max(self.limits.reprime_keep_frames, codes.shape[1]), self.limits.context_frames - 1)
        self.history = context[:, -self.limits.context_frames:]
        self.next = None
        self._start_sequence(context[:, -keep:])

    def release(self) -> None:
        self.state = self.next = None
        self.history = self.history[:, :0]

    def _shape(self, prompt_frames: int, frames_done: int) -> tuple[int | None, int]:
        """(total_frames, capacity) of a sequence started at `frames_done` from `prompt_frames` frames."""
        total = None  # a bounded session whose rest fits in this window ends with this sequence
        if self.total_frames is not None:
            remaining = self.total_frames - frames_done
            if prompt_frames + remaining <= self.limits.context_frames:
                total = prompt_frames + remaining
        frames = total if total is not None else self.limits.context_frames
        return total, columns_for(frames, self.model.config.decoder.delays)

    def _start_sequence(self, prompt_codes: torch.Tensor | None) -> None:
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[1]
        total, capacity = self._shape(prompt_frames, self.frames_done)
        self.state = self.model.start_sequence(self._conditioning(), self.params, prompt_codes, total_frames=total,
                                               capacity=capacity, weights=self.prompts.weights)
        if self.generator is None:
            self.generator = self.state.generator
        self.state.generator = self.generator  # a seeded session stays one reproducible stream
        self.frame_offset = self.frames_done - prompt_frames

    def _conditioning(self) -> list[TextConditioning]:
        return [self.encode_text(text) for text in self.prompts.texts]
