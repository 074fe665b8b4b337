"""MusicGen's delay pattern: codebook k of frame f sits in decoder column f + 1 + delay(k).

This module is the one owner of that arithmetic: which frame a column completes, which frames a column
touches, how many frames fit in a number of decoder positions, how many columns a number of frames needs.

Column 0 is the BOS column. A codebook's columns before its first frame, and (for a bounded sequence) past
its last frame, hold the pad id (= BOS id = vocab size); the decoder reads those as input, exactly as
transformers' `build_delay_pattern_mask` lays them out. Mono delays are 0,1,2,3; interleaved stereo codebooks
(even = left, odd = right) share a delay per pair: 0,0,1,1,2,2,3,3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TO_GENERATE = -1


def column_of(frame: int, delay: int) -> int:
    return frame + 1 + delay


def columns_for(frames: int, delays: list[int]) -> int:
    """Decoder positions (columns, BOS included) that `frames` whole frames need."""
    return column_of(frames, max(delays))


def max_frames(positions: int, delays: list[int]) -> int:
    """Whole frames that fit in `positions` decoder positions: the last frame's last codebook needs the last
    column, which must stay below the position limit."""
    return positions - 1 - max(delays)


def build_delayed(frames: torch.Tensor, delays: list[int], pad_id: int, columns: int | None = None,
                  total_frames: int | None = None) -> torch.Tensor:
    """Lay out known frames (codebooks, n) in delayed columns (codebooks, columns); unknown cells are -1.

    Columns before a codebook's first frame are pad; with `total_frames`, so are those after its last frame.
    """
    codebooks, known = frames.shape
    if columns is None:
        columns = known + 1 + max(delays)
    grid = torch.full((codebooks, columns), TO_GENERATE, dtype=torch.long)
    for k, delay in enumerate(delays):
        grid[k, : 1 + delay] = pad_id
        count = max(0, min(columns, column_of(known, delay)) - 1 - delay)
        grid[k, 1 + delay: 1 + delay + count] = frames[k, :count]
        if total_frames is not None:
            grid[k, column_of(total_frames, delay):] = pad_id
    return grid


def revert_delayed(grid: torch.Tensor, delays: list[int], num_frames: int) -> torch.Tensor:
    """(codebooks, columns) delayed layout -> (codebooks, num_frames) aligned frames."""
    return torch.stack([grid[k, 1 + d: 1 + d + num_frames] for k, d in enumerate(delays)])


@dataclass
class DelayGrid:
    """One sequence's token columns: what the decoder reads and where its samples land.

    tokens: (codebooks, capacity) int64; TO_GENERATE marks cells the model fills. `next_column` is the
    column the next step generates; columns before it are complete.
    """

    tokens: torch.Tensor
    delays: list[int]
    prompt_frames: int
    total_frames: int | None
    next_column: int
    initial: torch.Tensor | None = field(default=None, repr=False)  # the layout at start, for rewind

    @classmethod
    def start(cls, prompt: torch.Tensor, delays: list[int], pad_id: int, capacity: int,
              total_frames: int | None = None) -> "DelayGrid":
        """prompt: (codebooks, n) frames to continue from (n may be 0). capacity: columns to allocate."""
        tokens = build_delayed(prompt, delays, pad_id, capacity, total_frames)
        return cls(tokens, delays, prompt.shape[1], total_frames, next_column=1 + prompt.shape[1],
                   initial=tokens.clone())

    def rewind(self, frame: int) -> int:
        """The grid as it was when `first_frame_of_next_column()` first reached `frame` (where a prompt change
        landing at that frame applies): every code sampled since is forgotten. -> the new next_column."""
        if not self.prompt_frames <= frame <= self.first_frame_of_next_column():
            raise ValueError(f"cannot rewind to frame {frame}: generated frames here are "
                             f"{self.prompt_frames}..{self.first_frame_of_next_column()}")
        column = frame + 1 + self.max_delay if frame > self.prompt_frames else 1 + self.prompt_frames
        column = min(column, self.next_column)
        self.tokens[:, column:] = self.initial[:, column:]
        self.next_column = column
        return column

    @property
    def finished(self) -> bool:
        if self.total_frames is None:
            return False
        return self.next_column > self.total_frames + self.max_delay

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    def first_frame_of_next_column(self) -> int:
        """The first frame the next column touches (its last codebook; a prompt frame is never touched): a
        change applied from the next step leaves every frame before this one as it was."""
        return max(self.prompt_frames, self.next_column - 1 - self.max_delay)

    def place(self, sampled: torch.Tensor) -> torch.Tensor:
        """Write sampled tokens (codebooks,) into the free cells of `next_column`, keep forced ones; advance.
        Returns the completed column."""
        column = self.next_column
        if column >= self.capacity:
            raise ValueError(f"delay grid full at column {column}")
        current = self.tokens[:, column]
        self.tokens[:, column] = torch.where(current == TO_GENERATE, sampled.to(current.device), current)
        self.next_column += 1
        return self.tokens[:, column]

    def completed_frame(self) -> int | None:
        """Index of the frame the last placed column completed (its last codebook), if any."""
        frame = self.next_column - 1 - 1 - self.max_delay
        if frame < 0 or (self.total_frames is not None and frame >= self.total_frames):
            return None
        return frame

    def frame(self, index: int) -> torch.Tensor:
        """(codebooks,) codes of a completed frame."""
        return torch.stack([self.tokens[k, column_of(index, d)] for k, d in enumerate(self.delays)])

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """(codebooks, stop - start) codes of completed frames start..stop-1."""
        return torch.stack([self.tokens[k, column_of(start, d): column_of(stop, d)]
                            for k, d in enumerate(self.delays)])
