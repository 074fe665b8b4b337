"""How far ahead of real time the engine runs: the running real-time factor of the engine and of each session.

A turn that steps a session gives it one frame (1 / frame_rate seconds of audio) for the turn's busy time: the
batched decoder step plus every stepped session's codec decode and chunking. Waiting (at the lead, paused, for
commands) is not busy time, so the factor says what the engine could sustain, not what the clients asked for:
above 1 it keeps up, below 1 every paced client underruns sooner or later.
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger("musicgen.engine")

WINDOW_SECONDS = 5.0  # of audio: long enough to even out a re-prime, short enough to show a new load at once
RECOVERED_ABOVE = 1.05  # hysteresis: "below real time" is said again only after recovering past this


class RunningRate:
    """Audio seconds per busy second over the last WINDOW_SECONDS of audio."""

    def __init__(self, window_seconds: float = WINDOW_SECONDS):
        self.window_seconds = window_seconds
        self._turns: deque[tuple[float, float]] = deque()  # (audio seconds, busy seconds)
        self._audio = self._busy = 0.0

    def add(self, audio_seconds: float, busy_seconds: float) -> None:
        self._turns.append((audio_seconds, busy_seconds))
        self._audio += audio_seconds
        self._busy += busy_seconds
        while len(self._turns) > 1 and self._audio - self._turns[0][0] >= self.window_seconds:
            audio, busy = self._turns.popleft()
            self._audio -= audio
            self._busy -= busy

    @property
    def audio_seconds(self) -> float:
        """Audio in the window (less than window_seconds until it has filled)."""
        return self._audio

    @property
    def realtime_factor(self) -> float | None:
        """None until a turn has been measured."""
        if not self._turns:
            return None
        return self._audio / max(self._busy, 1e-9)


class EngineHeadroom:
    """The engine's running real-time factor, and a log line when it falls below real time (once, until it
    has recovered) rather than one per step."""

    def __init__(self, frame_seconds: float):
        self.frame_seconds = frame_seconds
        self.rate = RunningRate()
        self.below = False

    def add_turn(self, busy_seconds: float, sessions: int) -> None:
        self.rate.add(self.frame_seconds, busy_seconds)
        factor = self.rate.realtime_factor
        if self.rate.audio_seconds < self.rate.window_seconds:  # not a full window yet: a cold start is not a verdict
            return
        if not self.below and factor < 1.0:
            self.below = True
            log.warning("event=below_realtime realtime_factor=%.2f sessions=%d window_s=%g: the engine cannot "
                        "keep every session live", factor, sessions, self.rate.window_seconds)
        elif self.below and factor > RECOVERED_ABOVE:
            self.below = False
            log.info("event=realtime_recovered realtime_factor=%.2f sessions=%d", factor, sessions)

    @property
    def realtime_factor(self) -> float | None:
        return self.rate.realtime_factor
