"""Real-time playback of a live session through sounddevice, paced by what the sound card consumed.

    network thread  ->  [channel map, resample]  ->  RingBuffer (jitter buffer)  ->  PortAudio callback
    ack thread: every ack_interval, session.ack(stream samples the callback has consumed)

The callback takes no lock, never waits and allocates no audio memory: it copies from the preallocated ring into
PortAudio's buffer (numpy slices) and fills any shortfall with silence. Playback starts once the ring holds the
start-up fill; when the ring runs dry mid-stream (the network or the server fell behind) the gap is silence,
counted as an underrun, and playback waits for the fill again (so one late chunk causes one gap, not a
stutter). A callback that always fills its buffer never raises PortAudio's own underflow flag, so the counting
happens here.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .devices import AudioUnavailable, Device, find_device, sounddevice, supports
from .events import AudioChunk, Event, Notice, NoticeKind, Retracted, Started
from .ring import RingBuffer
from .wavfile import WavWriter


CLOCK_WINDOW_SECONDS = 1.0  # heard_at: the callbacks the device clock is estimated from
CLOCK_PERCENTILE = 0.9  # ... and which of their bounds (see heard_at)


@dataclass(frozen=True)
class PlayerStats:
    """A snapshot of the player. Frames are device frames (at device_rate); samples are stream samples."""

    samples_received: int  # stream samples the network thread has taken from the session
    samples_played: int  # stream samples the callback consumed (what is acknowledged)
    frames_played: int  # device frames of stream audio the callback consumed
    buffered_frames: int  # device frames waiting in the jitter buffer
    buffered_seconds: float
    underruns: int  # times the buffer ran dry while the stream was still coming
    underrun_frames: int  # silent device frames inserted mid-stream by those underruns (gap and refill)
    startup_frames: int  # silent device frames before the start-up fill was reached
    device_underflows: int  # PortAudio's own output-underflow flags (rare: see the module docstring)
    device_rate: int
    stream_rate: int


@dataclass(frozen=True)
class OutputLatency:
    """How long a sample handed to the player takes to be heard: jitter buffer plus the device's latency."""

    seconds: float
    samples: int  # in stream samples


class OutputStreamLike:
    """What the Player needs from an output stream (sounddevice.OutputStream has it). A test can supply its
    own, e.g. a thread calling the callback at a real-time rate."""

    latency: float

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


# (device_rate, channels, blocksize, callback) -> a stream, not yet started
OutputFactory = Callable[[int, int, int, Callable], OutputStreamLike]


class Player:
    """Plays a `LiveSession` in real time and acknowledges what the device consumed.

    device: index, name substring or None (default). start_fill_seconds: audio buffered before playback
    starts (and after an underrun); capped at half the session's pacing lead so a paced session can fill it.
    buffer_seconds: jitter buffer size beyond the lead (unpaced sessions block the network thread when full).
    device_rate / device_channels: None = the stream's when the device supports them, else the device's
    default rate (resampled with soxr) and its channel count (mono is copied to every channel, stereo mixed
    down for a mono device). blocksize: 0 lets the host choose; any size works. latency: PortAudio's
    suggested latency ("low", "high" or seconds). record_to: a WAV path the stream is written to (16-bit, at
    the stream's rate and channels) by the network thread. on_event: called on the network thread for every
    session event (notices, chunks, finished). output: an OutputFactory replacing sounddevice.
    """

    def __init__(self, session, *, device: int | str | None = None, start_fill_seconds: float = 0.2,
                 buffer_seconds: float = 2.0, device_rate: int | None = None, device_channels: int | None = None,
                 blocksize: int = 0, latency: str | float = "high", record_to: str | Path | None = None,
                 ack_interval: float = 0.02, on_event: Callable[[Event], None] | None = None,
                 output: OutputFactory | None = None):
        started: Started = session.started
        self.session = session
        self.stream_rate = started.sample_rate
        self.first_sample = started.first_sample  # a resumed session's numbering starts there (acks too)
        self.stream_channels = started.channels
        self.ack_interval = ack_interval
        self.on_event = on_event
        self._output = output
        self._latency_hint = latency
        self._blocksize = blocksize
        self._device: Device | None = None
        if output is None:
            self._device = find_device(device)
            device_channels = device_channels or self._pick_channels(self._device)
            device_rate = device_rate or self._pick_rate(self._device, device_channels)
        self.device_rate = int(device_rate or self.stream_rate)
        self.device_channels = int(device_channels or self.stream_channels)
        lead = 0.0 if started.unpaced else started.max_lead_seconds
        chunk_seconds = started.chunk_samples / self.stream_rate
        fill = start_fill_seconds if not lead else min(start_fill_seconds, lead / 2)
        self.fill_frames = max(1, round(fill * self.device_rate))
        capacity = (lead + 2 * chunk_seconds + buffer_seconds) * self.device_rate
        self.ring = RingBuffer(int(capacity) + self.fill_frames, self.device_channels)
        self._resampler = None
        if self.device_rate != self.stream_rate:
            import soxr
            self._resampler = soxr.ResampleStream(self.stream_rate, self.device_rate, self.device_channels,
                                                  dtype="float32", quality="HQ")
        self._recorder = WavWriter(record_to, self.stream_rate, self.stream_channels) if record_to else None
        # callback-owned counters (only the callback writes them)
        self.frames_played = 0
        self.underruns = 0
        self.underrun_frames = 0
        self.retracted_late_frames = 0  # retracted audio the device had already taken (margin too small)
        self.startup_frames = 0
        self.device_underflows = 0
        self._playing = False  # False: waiting for the fill (at the start and after an underrun)
        # (first device frame, frames, time.monotonic() it reaches the listener) of recent callbacks' audio:
        # where output samples fall in time, for landing changes on a clock outside (Ableton Link)
        self._heard: deque[tuple[int, int, float]] = deque(maxlen=512)
        self._fallback_delay: float | None = None  # the stream's output latency, for hosts without DAC times
        self._drained = False
        # network-thread-owned flags
        self._eof = False
        self._idle = bool(started.paused)  # paused by request: running dry is not an underrun
        self.samples_received = 0
        self.error: BaseException | None = None
        self._stream: OutputStreamLike | None = None
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- device choice ------------------------------------------------------------------------------------

    def _pick_channels(self, device: Device) -> int:
        if device.channels >= self.stream_channels and supports(device, self.stream_rate, self.stream_channels):
            return self.stream_channels
        for channels in (2, 1, device.channels):
            if channels <= device.channels and supports(device, int(device.default_sample_rate), channels):
                return channels
        return max(1, min(device.channels, 2))

    def _pick_rate(self, device: Device, channels: int) -> int:
        if supports(device, self.stream_rate, channels):
            return self.stream_rate
        return int(device.default_sample_rate)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> "Player":
        """Open the output stream and start the network and ack threads; returns at once."""
        self._stream = self._open_stream()
        self._threads = [threading.Thread(target=self._network, name="player-network", daemon=True),
                         threading.Thread(target=self._acks, name="player-acks", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._stream.start()
        return self

    def _open_stream(self) -> OutputStreamLike:
        if self._output is not None:
            return self._output(self.device_rate, self.device_channels, self._blocksize, self._callback)
        sd = sounddevice()
        try:
            return sd.OutputStream(samplerate=self.device_rate, channels=self.device_channels, dtype="float32",
                                   device=self._device.index if self._device else None, blocksize=self._blocksize,
                                   latency=self._latency_hint, callback=self._callback)
        except sd.PortAudioError as error:
            raise AudioUnavailable(f"cannot open output device {self._device.name if self._device else ''!r} at "
                                   f"{self.device_rate} Hz, {self.device_channels} channel(s): {error}") from None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the session finished and everything buffered was handed to the device (then wait the
        device latency so it is heard). True when done; re-raises an error of the network thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self._drained or (self.error is not None) or self._closing.is_set()):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        if self.error is not None:
            raise self.error
        if self._drained and self._stream is not None:
            time.sleep(min(self.device_latency, 1.0))
        return True

    def play(self) -> PlayerStats:
        """start(), wait() until the end, close(); returns the final stats."""
        self.start()
        try:
            self.wait()
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        """Stop the device, cancel the session if it still runs, finish the recording. Idempotent."""
        self._closing.set()
        if self._stream is not None:
            try:
                self._stream.stop()
            finally:
                self._stream.close()
        if self.session.finished is None:
            self.session.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5)
        if self._recorder is not None:
            self._recorder.close()

    def __enter__(self) -> "Player":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reporting ----------------------------------------------------------------------------------------

    @property
    def samples_played(self) -> int:
        """Stream samples the device has consumed (converted back from device frames when resampling)."""
        if self.device_rate == self.stream_rate:
            return self.frames_played
        return self.frames_played * self.stream_rate // self.device_rate

    @property
    def stats(self) -> PlayerStats:
        buffered = self.ring.available
        return PlayerStats(samples_received=self.samples_received, samples_played=self.samples_played,
                           frames_played=self.frames_played, buffered_frames=buffered,
                           buffered_seconds=buffered / self.device_rate, underruns=self.underruns,
                           underrun_frames=self.underrun_frames, startup_frames=self.startup_frames,
                           device_underflows=self.device_underflows, device_rate=self.device_rate,
                           stream_rate=self.stream_rate)

    @property
    def device_latency(self) -> float:
        """The device's own output latency in seconds (PortAudio's figure): from the callback taking a sample
        to it being heard."""
        latency = getattr(self._stream, "latency", 0.0) if self._stream is not None else 0.0
        return float(latency[1] if isinstance(latency, tuple) else latency or 0.0)

    @property
    def output_latency(self) -> OutputLatency:
        """Jitter buffer depth plus the device's output latency: the delay from a sample entering the player
        to it being heard, for a host's latency compensation."""
        seconds = self.ring.available / self.device_rate + self.device_latency
        return OutputLatency(seconds, round(seconds * self.stream_rate))

    def heard_at(self, sample: int) -> float | None:
        """The time.monotonic() at which stream sample `sample` reaches the listener (None before playback).

        A callback runs at the latest when its block is due minus the output latency, earlier when the host
        fills its buffer in a burst (at start, after an underrun); so each block's DAC time minus its frames
        bounds the device clock from below. The clock is taken as a high percentile of those bounds over the
        second of blocks up to the sample's (not the maximum: one callback the scheduler ran late must not move
        it): time = offset + frame / device rate. A sample not yet played is extrapolated from the newest."""
        frame = (sample - self.first_sample) * self.device_rate / self.stream_rate
        offset = self._clock_offset(frame)
        return None if offset is None else offset + frame / self.device_rate

    def sample_heard_at(self, when: float) -> float | None:
        """The stream sample (fractional) the listener hears at time.monotonic() `when`, from the newest blocks
        (as if no underrun comes between). None before playback starts."""
        offset = self._clock_offset(float("inf"))
        if offset is None:
            return None
        return self.first_sample + (when - offset) * self.stream_rate

    def _clock_offset(self, up_to_frame: float) -> float | None:
        """The CLOCK_PERCENTILE of (DAC time - first frame / rate) over the CLOCK_WINDOW_SECONDS of blocks
        ending with the last one starting at or before `up_to_frame`."""
        blocks = [block for block in list(self._heard) if block[0] <= up_to_frame]
        if not blocks:
            return None
        newest = blocks[-1][2]
        bounds = sorted(at - first / self.device_rate for first, _, at in blocks
                        if at >= newest - CLOCK_WINDOW_SECONDS)
        return bounds[min(len(bounds) - 1, int(CLOCK_PERCENTILE * len(bounds)))]

    # -- the audio callback (PortAudio's thread) -----------------------------------------------------------

    def _dac_delay(self, time_info) -> float:
        """Seconds from this callback to its first frame being heard: PortAudio's outputBufferDacTime -
        currentTime where the host gives it, else the stream's reported output latency."""
        try:
            delay = time_info.outputBufferDacTime - time_info.currentTime
        except AttributeError:
            delay = 0.0
        if not 0.0 < delay < 2.0:  # 0 or nonsense: hosts that do not fill it in
            if self._fallback_delay is None:  # asked of PortAudio once, not in every callback
                self._fallback_delay = self.device_latency
            delay = self._fallback_delay
        return delay


    def _callback(self, outdata: np.ndarray, frames: int, time_info, status) -> None:
        if status and getattr(status, "output_underflow", False):
            self.device_underflows += 1
        ring = self.ring
        if not self._playing:
            if ring.available >= self.fill_frames or self._eof or (self._idle and ring.available):
                self._playing = True
            else:  # (re)filling: silence, counted as start-up or as part of the underrun's gap
                outdata.fill(0)
                if self._idle:
                    pass
                elif self.frames_played == 0:
                    self.startup_frames += frames
                else:
                    self.underrun_frames += frames
                return
        copied = ring.read_into(outdata, frames)
        if copied:
            self._heard.append((self.frames_played, copied, time.monotonic() + self._dac_delay(time_info)))
        self.frames_played += copied
        if copied < frames:
            outdata[copied:].fill(0)
            if self._eof and ring.available == 0:
                self._drained = True
            elif not self._idle:
                self.underruns += 1
                self.underrun_frames += frames - copied
                self._playing = False
            else:
                self._playing = False

    # -- network and ack threads ---------------------------------------------------------------------------

    def _network(self) -> None:
        try:
            for event in self.session:
                if self._closing.is_set():
                    break
                if isinstance(event, AudioChunk):
                    if self._recorder is not None:
                        self._recorder.write(event.audio)
                    self._push(self._for_device(event.audio))
                    self.samples_received = event.end_sample
                elif isinstance(event, Retracted):
                    self._retract(event.sample)
                elif isinstance(event, Notice):
                    if event.kind is NoticeKind.PAUSED:
                        self._idle = True
                    elif event.kind is NoticeKind.RESUMED:
                        self._idle = False
                if self.on_event is not None:
                    self.on_event(event)
            if self._resampler is not None:
                tail = self._resampler.resample_chunk(np.zeros((0, self.device_channels), np.float32), last=True)
                self._push(tail)
        except BaseException as error:  # re-raised by wait()
            if not self._closing.is_set():
                self.error = error
        finally:
            self._eof = True

    def _retract(self, sample: int) -> None:
        """The server withdrew its audio from stream sample `sample` on: take those frames back out of the ring
        (never the block the callback may be copying) and out of the recording; what follows is spliced in
        there. At a device rate other than the stream's the resampler restarts at the splice (a short
        discontinuity); frames the device had already taken are counted in retracted_late_frames."""
        relative = max(0, sample - self.first_sample)
        ratio = self.device_rate / self.stream_rate
        keep_from = round(relative * ratio)  # device frame index of the splice
        wanted = max(0, self.ring.written - keep_from)
        done = self.ring.retract(wanted, keep=max(self._blocksize, 1024))
        self.retracted_late_frames += wanted - done
        if self._resampler is not None:
            import soxr
            self._resampler = soxr.ResampleStream(self.stream_rate, self.device_rate, self.device_channels,
                                                  dtype="float32", quality="HQ")
        if self._recorder is not None:
            self._recorder.retract(relative)
        self.samples_received = sample

    def _for_device(self, audio: np.ndarray) -> np.ndarray:
        """(samples, stream channels) -> (frames, device channels) at the device rate."""
        source, target = audio.shape[1], self.device_channels
        if source != target:
            if source == 1:
                audio = np.repeat(audio, target, axis=1)
            elif target == 1:
                audio = audio.mean(axis=1, keepdims=True)
            else:
                mapped = np.zeros((audio.shape[0], target), np.float32)
                mapped[:, :min(source, target)] = audio[:, :target]
                audio = mapped
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(np.ascontiguousarray(audio, dtype=np.float32))
        return audio

    def _push(self, frames: np.ndarray) -> None:
        """Write all of `frames` into the ring, waiting for room (the network thread may wait; the callback
        never does)."""
        done = 0
        while done < frames.shape[0]:
            done += self.ring.write(frames[done:])
            if done < frames.shape[0]:
                if self._closing.wait(0.005):
                    return

    def _acks(self) -> None:
        while not self._closing.wait(self.ack_interval):
            if self.session.finished is not None or self._drained:
                return
            self.session.ack(self.first_sample + self.samples_played)
