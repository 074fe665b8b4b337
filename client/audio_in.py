"""Audio continuation in: feed a WAV file, or live input from a capture device, to a session as append-audio."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .devices import AudioUnavailable, find_device, sounddevice
from .ring import RingBuffer
from .wavfile import read_wav


def feed_wav(session, path: str | Path, replace_context: bool = False, max_seconds: float | None = None,
             at=None) -> int:
    """Append a WAV file's audio to the session (split into parts under the message limit); the session
    continues from it. max_seconds keeps only the file's last seconds (the server takes at most
    ModelInfo.max_audio_prompt_seconds). at: when (a requests.At; None = the next step). Returns the number of
    samples sent."""
    audio, rate = read_wav(path)
    if audio.shape[1] > 2:
        audio = audio.mean(axis=1, keepdims=True)
    if max_seconds is not None:
        audio = audio[-int(max_seconds * rate):]
    session.append_audio(audio, rate, replace_context=replace_context, at=at)
    return audio.shape[0]


# (sample_rate, channels, blocksize, callback) -> an input stream, not yet started
InputFactory = Callable[[int, int, int, Callable], object]


class LiveInput:
    """Captures an input device and sends what it heard to the session every `every_seconds` as one append
    (the session continues from the latest block of live input).

    The capture callback only copies into a preallocated ring; a sender thread takes a full block from it and
    calls `session.append_audio`. device: index, name substring or None; sample_rate: None = the device's
    default (the server resamples); channels: 1 or 2. input: an InputFactory replacing sounddevice (tests).
    """

    def __init__(self, session, *, device: int | str | None = None, every_seconds: float = 2.0,
                 sample_rate: int | None = None, channels: int = 1, replace_context: bool = False,
                 blocksize: int = 0, input: InputFactory | None = None):
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        self.session = session
        self.every_seconds = every_seconds
        self.channels = channels
        self.replace_context = replace_context
        self._blocksize = blocksize
        self._input = input
        self._device = None
        if input is None:
            self._device = find_device(device, kind="input")
            sample_rate = sample_rate or int(self._device.default_sample_rate)
        self.sample_rate = int(sample_rate or 48000)
        self.block_frames = max(1, round(every_seconds * self.sample_rate))
        self.ring = RingBuffer(4 * self.block_frames, channels)
        self.blocks_sent = 0
        self.overflows = 0  # frames dropped because the sender fell behind
        self.error: BaseException | None = None
        self._stream = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _callback(self, indata: np.ndarray, frames: int, time_info, status) -> None:
        written = self.ring.write(indata)
        self.overflows += frames - written

    def start(self) -> "LiveInput":
        if self._input is not None:
            self._stream = self._input(self.sample_rate, self.channels, self._blocksize, self._callback)
        else:
            sd = sounddevice()
            try:
                self._stream = sd.InputStream(samplerate=self.sample_rate, channels=self.channels, dtype="float32",
                                              device=self._device.index, blocksize=self._blocksize,
                                              callback=self._callback)
            except sd.PortAudioError as error:
                raise AudioUnavailable(f"cannot open input device {self._device.name!r}: {error}") from None
        self._thread = threading.Thread(target=self._send_blocks, name="live-input", daemon=True)
        self._thread.start()
        self._stream.start()
        return self

    def _send_blocks(self) -> None:
        block = np.zeros((self.block_frames, self.channels), np.float32)
        while not self._stop.wait(0.01):
            if self.ring.available < self.block_frames:
                continue
            self.ring.read_into(block, self.block_frames)
            try:
                self.session.append_audio(block.copy(), self.sample_rate, replace_context=self.replace_context)
            except BaseException as error:
                self.error = error
                return
            self.blocks_sent += 1

    def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "LiveInput":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
