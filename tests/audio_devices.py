"""A real PortAudio output device on a machine without a sound card, for the client's playback tests.

ALSA's `file` PCM (slave `null`) is made the default device by a test-only `.asoundrc` in a temporary HOME, so a
process started with `env()` plays through PortAudio -> ALSA -> the file plugin. The file is a FIFO that this
process reads: at a real-time byte rate (the FIFO is kept small, so the device blocks exactly like a sound card
with a clock), recording every byte that reached the device. PortAudio reads the ALSA configuration when it
initialises, so the player must run in a fresh process: `python tests/audio_devices.py SPEC.json` does that
(see `play_main`), printing its results as JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), absent from older Pythons' fcntl module


class ClockedAlsaDevice:
    """The default ALSA device of processes run with `env()`: float32 samples, read at `rate` frames/s."""

    def __init__(self, directory: Path, rate: int, channels: int, pipe_bytes: int = 4096):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fifo = self.directory / "device.fifo"
        self.frame_bytes = 4 * channels
        self.channels = channels
        self.rate = rate
        self.pipe_bytes = pipe_bytes
        self.data = bytearray()
        self.opens = 0
        self._stop = threading.Event()
        os.mkfifo(self.fifo)
        (self.directory / ".asoundrc").write_text(
            "pcm.!default {\n  type file\n  slave.pcm \"null\"\n"
            f"  file \"{self.fifo}\"\n  format \"raw\"\n}}\n")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def env(self) -> dict:
        return {**os.environ, "HOME": str(self.directory), "XDG_CONFIG_HOME": str(self.directory)}

    def _read(self) -> None:
        """Read the FIFO at the device's rate; reopen after each writer closes (PortAudio may open the PCM more
        than once), until stop()."""
        step = max(self.frame_bytes, (self.rate // 200) * self.frame_bytes)  # 5 ms of audio per read
        while not self._stop.is_set():
            fd = os.open(self.fifo, os.O_RDONLY)  # blocks until a writer opens
            if self._stop.is_set():
                os.close(fd)
                return
            self.opens += 1
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, self.pipe_bytes)
            except OSError:
                pass
            start, got = time.monotonic(), 0
            while True:
                due = start + got / (self.rate * self.frame_bytes)
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                chunk = os.read(fd, step)
                if not chunk:
                    break
                self.data.extend(chunk)
                got += len(chunk)
            os.close(fd)

    def stop(self) -> np.ndarray:
        """Stop reading; returns everything the device received as (frames, channels) float32."""
        self._stop.set()
        try:  # release a reader blocked in open()
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
        self._thread.join(5)
        usable = len(self.data) - len(self.data) % self.frame_bytes
        return np.frombuffer(bytes(self.data[:usable]), dtype="<f4").reshape(-1, self.channels)


class SlowSession:
    """Wraps a LiveSession so its audio chunks arrive late: each chunk waits `delay` seconds first (a network
    slower than real time when delay > chunk duration)."""

    def __init__(self, session, delay: float):
        self._session = session
        self._delay = delay

    def __iter__(self):
        from client import AudioChunk
        for event in self._session:
            if isinstance(event, AudioChunk):
                time.sleep(self._delay)
            yield event

    def __getattr__(self, name):
        return getattr(self._session, name)


def play_main(spec_path: str) -> None:
    """Run in a process started with a ClockedAlsaDevice's env(): open a session, play it with a Player
    through the default device, and print JSON (player stats, each chunk's arrival) for the test."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from client import AudioChunk, MusicGenClient, Player

    spec = json.loads(Path(spec_path).read_text())
    client = MusicGenClient(spec["address"])
    session = client.open_session(**spec["session"])
    source = SlowSession(session, spec["delay"]) if spec.get("delay") else session
    arrivals = []
    stream = []
    player = None

    def on_event(event) -> None:
        if isinstance(event, AudioChunk):
            stream.append(event.audio)
            arrivals.append({"end_sample": event.end_sample, "acked": session.samples_acked,
                             "played": player.samples_played, "buffered": player.ring.available,
                             "time": time.monotonic()})

    player = Player(source, on_event=on_event, **spec.get("player", {}))
    started = time.monotonic()
    latency_during = None
    player.start()
    while not player.wait(timeout=0.05):
        if latency_during is None and player.frames_played > 0:
            latency_during = player.output_latency.__dict__
    stats = player.stats
    player.close()
    np.save(spec["stream_out"], np.concatenate(stream) if stream else np.zeros((0, 1), np.float32))
    print(json.dumps({"stats": stats.__dict__, "arrivals": arrivals, "started": started,
                      "finished": session.finished.reason.value, "latency": latency_during,
                      "device_rate": player.device_rate, "device_channels": player.device_channels,
                      "lead": session.started.max_lead_seconds, "chunk_samples": session.started.chunk_samples}))


if __name__ == "__main__":
    play_main(sys.argv[1])
