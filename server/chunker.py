"""A session's chunker: resolved frames' codes and final PCM in, frame-aligned AudioChunks out, held at the
pacing lead. It owns what was sent (frames, samples, chunk index), the prompt revisions that label chunks, the
chunk boundaries, and the acks. Engine thread only.

Chunk frames [f, f + n) carry exactly output samples [f * spf, (f + n) * spf) and those frames' codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from musicgen_core import SamplingParams, WeightedPrompts

from .events import AudioChunk


@dataclass(frozen=True)
class Revision:
    """The prompt change (SetPrompt) in effect from `from_frame` on: its number and sampling. The prompts'
    weights are kept per frame beside it (`Chunker.mixes`): a timed transition moves them every frame."""

    number: int
    from_frame: int
    params: SamplingParams


class Chunker:
    def __init__(self, codebooks: int, channels: int, samples_per_frame: int, output_rate: int, chunk_frames: int,
                 lead_seconds: float | None, prompts: WeightedPrompts, params: SamplingParams):
        self.samples_per_frame = samples_per_frame
        self.chunk_frames = chunk_frames
        # Paced: the client's acks hold the session at this lead; unpaced: the transport's delivery acks do.
        self.lead_samples = None if lead_seconds is None else lead_seconds * output_rate
        self.unsent_codes = torch.zeros(codebooks, 0, dtype=torch.long)  # resolved frames not yet in a chunk
        self.unsent_pcm = np.zeros((channels, 0), dtype=np.float32)  # their final audio so far
        self.boundaries: list[int] = []  # frames a chunk must start at (prompt changes, appends, pauses)
        self.revisions = [Revision(0, 0, params)]
        self.mixes: list[tuple[int, WeightedPrompts]] = [(0, prompts)]  # (from frame, prompts and weights)
        self.chunk_index = 0  # AudioChunk.sequence of the next chunk
        self.frames_sent = 0
        self.acked_samples = 0
        self.last_ack = time.monotonic()
        self.held_since: float | None = None  # when the session last began to wait at its lead

    @property
    def samples_sent(self) -> int:
        return self.frames_sent * self.samples_per_frame

    @property
    def revision(self) -> Revision:
        return self.revisions[-1]

    def continue_at(self, frame: int) -> None:
        """A resumed session: numbering (frames, samples, acks) continues from `frame`."""
        self.frames_sent = frame
        self.acked_samples = self.samples_sent
        self.revisions = [replace(r, from_frame=frame) for r in self.revisions]
        self.mixes = [(frame, prompts) for _, prompts in self.mixes]

    def rewind(self, frame: int) -> None:
        """A rollback to `frame`: what was sent from it on is withdrawn and what was not yet sent is dropped;
        the next chunk starts at `frame` (chunk sequence numbers go on increasing)."""
        self.frames_sent = frame
        self.unsent_codes = self.unsent_codes[:, :0]
        self.unsent_pcm = self.unsent_pcm[:, :0]
        self.boundaries = []
        self.mixes = [m for m in self.mixes if m[0] < frame] or self.mixes[:1]
        # revisions stay (their numbers were seen); the next one, from `frame`, is last and so labels what follows

    def add_frame(self, codes: torch.Tensor) -> None:
        self.unsent_codes = torch.cat([self.unsent_codes, codes[:, None]], dim=1)

    def add_pcm(self, pcm: np.ndarray) -> None:
        self.unsent_pcm = np.concatenate([self.unsent_pcm, pcm], axis=1)

    def cut_at(self, frame: int) -> None:
        """A chunk must start at `frame` (it ends the one before early)."""
        self.boundaries.append(frame)

    def revise(self, from_frame: int, prompts: WeightedPrompts, params: SamplingParams) -> Revision:
        """A new prompt revision from `from_frame` on; a chunk starts there, so one label fits all its frames."""
        revision = Revision(self.revision.number + 1, from_frame, params)
        self.revisions.append(revision)
        self.mix_from(from_frame, prompts)
        self.cut_at(from_frame)
        return revision

    def mix_from(self, frame: int, prompts: WeightedPrompts) -> None:
        """The prompts' weights from `frame` on (a chunk reports those of its first frame)."""
        self.mixes = [m for m in self.mixes if m[0] < frame] + [(frame, prompts)]

    def ack(self, samples: int) -> None:
        """Samples played (paced) or delivered (unpaced). The transport checks a client's acks against the
        protocol (never decreasing, never past what it sent); here they are taken as they come."""
        self.acked_samples = samples
        self.last_ack = time.monotonic()

    def stalled(self, now: float, timeout: float, waiting: bool) -> bool:
        """True when the session has waited at its lead for `timeout` seconds with no ack since it began to
        wait; `waiting` False (paused) stops the clock."""
        if not waiting or not self.over_lead():
            self.held_since = None
            return False
        if self.held_since is None:
            self.held_since = now
        return now - max(self.held_since, self.last_ack) >= timeout

    def over_lead(self) -> bool:
        """A paced session keeps the audio sent at most its lead ahead of the acks: it neither steps nor sends
        another chunk while that far ahead (a chunk sent just under the lead may pass it by one)."""
        return self.lead_samples is not None and self.samples_sent - self.acked_samples >= self.lead_samples

    def chunks(self, final: bool = False, force: bool = False) -> list[AudioChunk]:
        """Every chunk whose audio is final; `force` sends a short one (pause), `final` everything (the end)."""
        out = []
        spf = self.samples_per_frame
        while True:
            whole = self.unsent_codes.shape[1] if final else min(self.unsent_pcm.shape[1] // spf,
                                                                 self.unsent_codes.shape[1])
            stop = self.frames_sent + min(whole, self.chunk_frames)
            for boundary in self.boundaries:
                if self.frames_sent < boundary < stop:
                    stop = boundary
            count = stop - self.frames_sent
            if count <= 0 or (count < self.chunk_frames and not (final or force) and stop not in self.boundaries):
                return out
            if not final and self.over_lead():  # the rest waits for acks
                return out
            samples = self.unsent_pcm.shape[1] if final and count == self.unsent_codes.shape[1] else count * spf
            out.append(self._cut(count, samples))

    def _cut(self, count: int, samples: int) -> AudioChunk:
        first = self.frames_sent
        revision = [r for r in self.revisions if r.from_frame <= first][-1]
        mix = [prompts for frame, prompts in self.mixes if frame <= first][-1]
        self.mixes = [m for i, m in enumerate(self.mixes) if m[0] > first or i + 1 == len(self.mixes)
                      or self.mixes[i + 1][0] > first]  # what later chunks may still need
        chunk = AudioChunk(sequence=self.chunk_index, start_sample=self.samples_sent, first_frame=first,
                           frame_count=count, pcm=self.unsent_pcm[:, :samples],
                           codes=self.unsent_codes[:, :count].numpy(), prompt=mix.label,
                           prompt_revision=revision.number, params=revision.params, prompts=mix)
        self.unsent_pcm = self.unsent_pcm[:, samples:]
        self.unsent_codes = self.unsent_codes[:, count:]
        self.boundaries = [b for b in self.boundaries if b > first + count]
        self.chunk_index += 1
        self.frames_sent += count
        return chunk
