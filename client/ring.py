"""A preallocated single-producer / single-consumer ring of audio frames: the jitter buffer between the network
thread (producer) and the audio callback (consumer).

No lock: the producer only ever advances `written`, the consumer only `read`, each after its copy is done, so
neither can see a half-written region. (Both are Python ints; a store to an attribute is atomic under the
GIL.) Reads and writes are numpy slice copies into preallocated memory: no audio-sized allocation.
"""

from __future__ import annotations

import numpy as np


class RingBuffer:
    def __init__(self, capacity_frames: int, channels: int):
        if capacity_frames <= 0 or channels <= 0:
            raise ValueError("capacity_frames and channels must be positive")
        self.capacity = capacity_frames
        self.channels = channels
        self.buffer = np.zeros((capacity_frames, channels), dtype=np.float32)
        self.written = 0  # frames ever written (producer-owned)
        self.read = 0  # frames ever read (consumer-owned)

    @property
    def available(self) -> int:
        """Frames buffered, ready for the consumer."""
        return self.written - self.read

    @property
    def free(self) -> int:
        return self.capacity - (self.written - self.read)

    def write(self, frames: np.ndarray) -> int:
        """Producer: copy as many of `frames` (n, channels) as fit; returns how many were written."""
        count = min(frames.shape[0], self.capacity - (self.written - self.read))
        if count <= 0:
            return 0
        start = self.written % self.capacity
        first = min(count, self.capacity - start)
        self.buffer[start:start + first] = frames[:first]
        if count > first:
            self.buffer[:count - first] = frames[first:count]
        self.written += count  # publish only after the copy
        return count

    def retract(self, count: int, keep: int = 0) -> int:
        """Producer: withdraw up to `count` of the newest frames, never the oldest `keep` still unread (the
        consumer may be copying those right now); returns how many were withdrawn."""
        count = max(0, min(count, self.written - self.read - keep))
        self.written -= count
        return count

    def read_into(self, out: np.ndarray, count: int) -> int:
        """Consumer: copy up to `count` buffered frames into out[:count]; returns how many were copied (the
        caller fills the rest)."""
        count = min(count, self.written - self.read)
        if count <= 0:
            return 0
        start = self.read % self.capacity
        first = min(count, self.capacity - start)
        out[:first] = self.buffer[start:start + first]
        if count > first:
            out[first:count] = self.buffer[:count - first]
        self.read += count  # release only after the copy
        return count
