"""Frame resolver: turns the decoder LM's delayed columns back into whole frames, each as soon as it is complete.

Codebook k of frame f sits in column f + 1 + delay(k) (see delay.py), so frame f is complete after column
f + 1 + max_delay: the resolver holds the max_delay + 1 frames that are partly known and hands out the oldest one
when its last codebook arrives. Mono delays are 0,1,2,3; interleaved stereo 0,0,1,1,2,2,3,3 (even codebooks
left, odd right); any non-decreasing delay list works.

End of stream (`end`): a bounded stream (`total_frames` set) whose LM ran to its last column
(total_frames + max_delay) has every frame complete, so `end` drops nothing and returns []. A stream stopped
anywhere else leaves up to max_delay frames with codebooks never generated; those cannot be decoded, so `end`
drops them and returns their indices. Nothing is ever invented for a missing codebook.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ResolvedFrame:
    index: int  # frame index in the stream (prompt frames included)
    codes: torch.Tensor  # (codebooks,) int64, aligned (delay reverted)


@dataclass
class FrameResolver:
    """Explicit, clonable state: `partial[:, j]` holds what is known of frame `next_frame + j`."""

    delays: list[int]
    partial: torch.Tensor  # (codebooks, max_delay + 1) int64
    total_frames: int | None = None  # frames of a bounded stream; cells of later frames are pads, ignored
    next_column: int = 1  # column the next `push_column` must be
    next_frame: int = 0  # first frame not yet handed out
    ended: bool = False

    @classmethod
    def start(cls, delays: list[int], total_frames: int | None = None) -> "FrameResolver":
        if list(delays) != sorted(delays) or min(delays) < 0:
            raise ValueError(f"delays must be non-negative and non-decreasing, got {delays}")
        partial = torch.full((len(delays), max(delays) + 1), -1, dtype=torch.long)
        return cls(list(delays), partial, total_frames)

    @property
    def max_delay(self) -> int:
        return self.delays[-1]

    def clone(self) -> "FrameResolver":
        return copy.deepcopy(self)

    def push_frames(self, frames: torch.Tensor) -> list[ResolvedFrame]:
        """Prompt frames (codebooks, n), already aligned: complete at once. Only before any column with
        generated codes (no partly known frame). Columns pushed later may repeat these frames' codes in their
        delayed cells (the grid forces them): those cells are ignored."""
        self._check_open()
        if self.next_column != self.next_frame + 1:
            raise ValueError("push_frames after columns were pushed: frames are partly known")
        if frames.dim() != 2 or frames.shape[0] != len(self.delays):
            raise ValueError(f"frames must be ({len(self.delays)}, n), got {tuple(frames.shape)}")
        out = []
        for j in range(frames.shape[1]):
            if self.total_frames is not None and self.next_frame >= self.total_frames:
                raise ValueError(f"more than total_frames={self.total_frames} frames")
            out.append(ResolvedFrame(self.next_frame, frames[:, j].clone()))
            self.next_frame += 1
            self.next_column += 1
        return out

    def push_column(self, column: torch.Tensor, index: int | None = None) -> list[ResolvedFrame]:
        """One delayed column (codebooks,) in order (column 1 first; `index`, if given, is checked).
        Returns the frame it completes (at most one), as a list."""
        self._check_open()
        if column.shape != (len(self.delays),):
            raise ValueError(f"column must be ({len(self.delays)},), got {tuple(column.shape)}")
        c = self.next_column
        if index is not None and index != c:
            raise ValueError(f"expected column {c}, got column {index}")
        for k, delay in enumerate(self.delays):
            frame = c - 1 - delay
            if frame < self.next_frame or (self.total_frames is not None and frame >= self.total_frames):
                continue  # pad (before the codebook starts / after a bounded stream) or an already-known frame
            self.partial[k, frame - self.next_frame] = column[k]
        self.next_column += 1
        done = c - 1 - self.max_delay
        if done < self.next_frame or (self.total_frames is not None and done >= self.total_frames):
            return []
        frame = ResolvedFrame(done, self.partial[:, 0].clone())
        self.partial = torch.roll(self.partial, -1, dims=1)
        self.partial[:, -1] = -1
        self.next_frame += 1
        return [frame]

    def end(self) -> list[int]:
        """Close the stream; returns the indices of the partly generated frames it drops (see module doc)."""
        self._check_open()
        self.ended = True
        started = self.next_column - 1 - self.delays[0]  # frames < started have at least one codebook
        if self.total_frames is not None:
            started = min(started, self.total_frames)
        return list(range(self.next_frame, max(self.next_frame, started)))

    def _check_open(self) -> None:
        if self.ended:
            raise ValueError("the frame resolver has ended")
