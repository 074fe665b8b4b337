"""When a scheduled steering command lands: output samples, frames, and bars and beats of a session tempo.

A change can only happen between frames, so every time is resolved to a frame: a sample to the first frame
starting at or after it, a bar or beat to the frame of its first sample. Engine thread only (the "next bar"
forms depend on how far generation has come).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AT_KINDS = ("sample", "frame", "bar", "beat", "next_bar", "next_beat")


@dataclass(frozen=True)
class Tempo:
    """A session's musical time: `bpm` beats a minute, `beats_per_bar`, beat one (bar 0) at output sample
    `beat_one_sample`."""

    bpm: float
    beats_per_bar: int
    beat_one_sample: int = 0


@dataclass(frozen=True)
class At:
    """When a steering command takes effect: kind one of AT_KINDS, its value (unused by next_bar / next_beat),
    and the request field it came from (errors name it)."""

    kind: str
    value: int = 0
    field: str = "at"


def frame_of_sample(sample: float, samples_per_frame: float) -> int:
    """The first frame starting at or after an output sample (a change lands between frames)."""
    return max(0, math.ceil(sample / samples_per_frame - 1e-9))


def resolve(at: At, tempo: Tempo | None, samples_per_frame: float, output_rate: int, earliest: int) -> int:
    """The frame `at` names; `earliest` is the first frame the command could still land on (next_bar /
    next_beat pick the first bar line or beat at or after it)."""
    if at.kind == "frame":
        return at.value
    if at.kind == "sample":
        return frame_of_sample(at.value, samples_per_frame)
    if tempo is None:
        raise ValueError(f"{at.field}: a bar or beat needs a session tempo (StartSession.tempo or set_tempo)")
    beat_samples = 60.0 * output_rate / tempo.bpm
    unit = beat_samples * (tempo.beats_per_bar if at.kind in ("bar", "next_bar") else 1)
    if at.kind in ("bar", "beat"):
        return frame_of_sample(tempo.beat_one_sample + at.value * unit, samples_per_frame)
    index = math.floor((earliest * samples_per_frame - tempo.beat_one_sample) / unit)
    while (tempo.beat_one_sample + index * unit < 0  # a bar line before the output's first sample is none
           or frame_of_sample(tempo.beat_one_sample + index * unit, samples_per_frame) < earliest):
        index += 1
    return frame_of_sample(tempo.beat_one_sample + index * unit, samples_per_frame)
