"""Ableton Link for the bridges: the shared tempo and where its bars fall, and a session kept in step with it.

Link (through LinkPython-extern, Ableton's own C++ library bound for Python) gives every peer on the network the
same tempo and beat timeline; its clock is CLOCK_MONOTONIC_RAW, so times are converted to and from
`time.monotonic()` by reading both clocks back to back. A session's bars are its `Tempo` (bpm, beats per bar and
`beat_one_sample`, the output sample of a bar line); `LinkedTempo` sets them so that the session's bar lines are
heard on Link's bar lines, using the player's own report of when each output sample reaches the listener
(`heard_at` / `sample_heard_at`: its DAC times, output latency included). Then the server's "next bar" lands on
Link's next bar at the speaker, within half a frame (a change can only happen between frames).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

# Re-anchor when the session's bar line has moved by more than this against Link (device clock drift, an
# underrun's gap): well under a frame (640 samples at 32 kHz), well above rounding.
REANCHOR_SAMPLES = 16


class HeardClock(Protocol):
    """What a player reports about time (client.player.Player, the OSC bridge's ClockPlayer)."""

    def heard_at(self, sample: int) -> float | None: ...

    def sample_heard_at(self, when: float) -> float | None: ...


class LinkUnavailable(RuntimeError):
    """LinkPython-extern is not installed."""


class LinkClock:
    """This process as one Ableton Link peer: `bpm` until it joins a session that has a tempo; `quantum` beats
    to a bar (Link's phase unit)."""

    def __init__(self, bpm: float = 120.0, quantum: int = 4):
        try:
            import link
        except ImportError:
            raise LinkUnavailable("Ableton Link needs LinkPython-extern: pip install LinkPython-extern "
                                  "(or the project's [client] extra)") from None
        self.quantum = quantum
        self._link = link.Link(bpm)
        self._link.enabled = True

    @property
    def peers(self) -> int:
        return self._link.numPeers()

    @property
    def tempo(self) -> float:
        return self._link.captureSessionState().tempo()

    def set_tempo(self, bpm: float) -> None:
        """Propose a tempo to the whole Link session (every peer follows)."""
        state = self._link.captureSessionState()
        state.setTempo(bpm, self._link.clock().micros())
        self._link.commitSessionState(state)

    def link_micros(self, when: float) -> int:
        """Link's clock (microseconds) at time.monotonic() `when`."""
        return round(when * 1e6 + self._offset_micros())

    def beat_at(self, when: float) -> float:
        """Link's beat at time.monotonic() `when` (bar lines are multiples of the quantum)."""
        return self._link.captureSessionState().beatAtTime(self.link_micros(when), self.quantum)

    def beat_at_micros(self, micros: int) -> float:
        return self._link.captureSessionState().beatAtTime(micros, self.quantum)

    def next_bar_at(self, when: float) -> tuple[float, float]:
        """(time.monotonic(), bpm) of the first Link bar line at or after `when`, from one session state."""
        state = self._link.captureSessionState()
        offset = self._offset_micros()
        beat = state.beatAtTime(round(when * 1e6 + offset), self.quantum)
        bar_beat = math.ceil(beat / self.quantum - 1e-9) * self.quantum
        return (state.timeAtBeat(bar_beat, self.quantum) - offset) / 1e6, state.tempo()

    def close(self) -> None:
        self._link.enabled = False

    def _offset_micros(self) -> float:
        """Link's clock minus time.monotonic() in microseconds: the tightest of three back-to-back readings."""
        clock = self._link.clock()
        best = None
        for _ in range(3):
            before = time.monotonic_ns()
            micros = clock.micros()
            after = time.monotonic_ns()
            if best is None or after - before < best[0]:
                best = (after - before, micros - (before + after) / 2000.0)
        return best[1]


@dataclass(frozen=True)
class Anchor:
    """A session tempo that puts its bar lines on Link's: what `set_tempo` is sent."""

    bpm: float
    beats_per_bar: int
    beat_one_sample: int


def anchor(link: LinkClock, player: HeardClock, sample_rate: int, frame_samples: int = 0,
           previous: Anchor | None = None) -> Anchor | None:
    """The session tempo whose bar lines the listener hears on Link's bar lines (None before playback).

    A bar line at Link's next bar, as an output sample, set half a frame (`frame_samples` / 2) early: the server
    lands a change on the first frame at or after a bar line, so that is the frame nearest Link's bar, off by
    at most half a frame either way instead of up to a whole one late. Bars keep their numbers across
    re-anchoring: the new bar line gets the number it had under `previous` (so a drift correction or a tempo
    change does not move `bar N` by a bar). The first anchor (or one that would put bar 0 before the output's
    first sample: a much slower tempo) makes bar 0 the first Link bar line at least half a bar into the output,
    so that drift corrections, which move it by samples either way, never push it below sample 0."""
    now = time.monotonic()
    heard_now = player.sample_heard_at(now)
    if heard_now is None:
        return None
    bar_time, bpm = link.next_bar_at(now)
    bar_samples = link.quantum * 60.0 * sample_rate / bpm
    sample_on_bar = heard_now + (bar_time - now) * sample_rate - frame_samples / 2
    if previous is not None:
        old_bar = previous.beats_per_bar * 60.0 * sample_rate / previous.bpm
        number = round((sample_on_bar - previous.beat_one_sample) / old_bar)
        beat_one = round(sample_on_bar - number * bar_samples)
        if beat_one >= 0:
            return Anchor(bpm, link.quantum, beat_one)
    beat_one = sample_on_bar % bar_samples
    return Anchor(bpm, link.quantum, round(beat_one + bar_samples if beat_one < bar_samples / 2 else beat_one))


def moved(old: Anchor | None, new: Anchor, sample_rate: int) -> bool:
    """Whether `new` is worth sending over `old`: another tempo, or bar lines moved by over REANCHOR_SAMPLES."""
    if old is None or old.bpm != new.bpm or old.beats_per_bar != new.beats_per_bar:
        return True
    bar_samples = old.beats_per_bar * 60.0 * sample_rate / old.bpm
    shift = (new.beat_one_sample - old.beat_one_sample) % bar_samples
    return min(shift, bar_samples - shift) > REANCHOR_SAMPLES


def bar_error_samples(link: LinkClock, heard: float, bpm: float, sample_rate: int, unit_beats: int) -> float:
    """How far from Link's nearest multiple of `unit_beats` (the quantum for a bar, 1 for a beat) the
    listener heard something at time.monotonic() `heard`, in output samples (+ = late)."""
    beat = link.beat_at(heard)
    error_beats = beat - round(beat / unit_beats) * unit_beats
    return error_beats * 60.0 * sample_rate / bpm
