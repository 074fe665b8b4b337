"""Playback through a real PortAudio device on a machine without a sound card.

The device is ALSA's `file` PCM writing into a FIFO that the test reads at a real-time rate (a clocked sound card
made of a pipe, see tests/audio_devices.py). The player runs in a fresh process whose HOME holds the test-only
`.asoundrc`, so PortAudio initialises with it.
"""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from audio_devices import ClockedAlsaDevice
from client.wavfile import to_int16
from musicgen_core import MusicGen
from server.engine import EngineConfig
from server_harness import ServerThread

ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"greedy": True, "guidance_scale": 3.0}

pytestmark = pytest.mark.skipif(ctypes.util.find_library("portaudio") is None,
                                reason="PortAudio is not installed (apt-get install libportaudio2)")


@pytest.fixture(scope="module")
def server(mono_checkpoint):
    with ServerThread(MusicGen.from_pretrained(mono_checkpoint), EngineConfig(max_sessions=4)) as running:
        yield running


def play_through_device(server, tmp_path: Path, session: dict, player: dict | None = None, delay: float = 0.0,
                        rate: int = 32000, channels: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
    """Play a session with a Player in a fresh process through the clocked ALSA device.
    -> (the process's report, what the device received (frames, channels), the stream (samples, channels))."""
    device = ClockedAlsaDevice(tmp_path / "home", rate, channels)
    spec = {"address": server.address, "session": session, "player": player or {}, "delay": delay,
            "stream_out": str(tmp_path / "stream.npy")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    try:
        result = subprocess.run([sys.executable, str(ROOT / "tests" / "audio_devices.py"), str(tmp_path / "spec.json")],
                                capture_output=True, text=True, timeout=60, cwd=ROOT,
                                env={**device.env(), "PYTHONPATH": str(ROOT)})
    finally:
        received = device.stop()
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), received, np.load(tmp_path / "stream.npy")


def split_gaps(received: np.ndarray, stream: np.ndarray) -> tuple[int, list[int]]:
    """Walk the device's samples against the stream: every sample is either the next stream sample or an
    inserted 0. -> (stream samples matched in order, lengths of the zero runs between the first and the last
    stream sample). Fails on anything else (reordering, repetition, corruption)."""
    matched, gaps, run = 0, [], 0
    for index, value in enumerate(received):
        if matched < len(stream) and value == stream[matched]:
            if run and matched:
                gaps.append(run)
            matched, run = matched + 1, 0
        else:
            assert value == 0, f"device sample {index} is {value}: neither silence nor stream sample {matched}"
            run += 1
    return matched, gaps


def test_device_gets_exactly_the_stream_when_the_network_keeps_up(server, tmp_path):
    report, received, stream = play_through_device(
        server, tmp_path, {"prompt": "warm lofi beat", "seconds": 1.0, "sampling": GREEDY})
    stats = report["stats"]
    assert report["finished"] == "completed" and stream.shape == (32000, 1)
    assert stats["underruns"] == 0 and stats["underrun_frames"] == 0
    assert stats["samples_played"] == stats["samples_received"] == 32000  # what was acked = the whole stream
    first = int(np.flatnonzero(received[:, 0])[0])
    assert not received[:first].any()  # leading silence: start-up fill and device priming
    assert np.array_equal(received[first:first + 32000], stream)  # bit-exact float32, in order, no gap
    assert not received[first + 32000:].any()
    latency = report["latency"]  # measured while playing: jitter buffer + device
    assert 0 < latency["seconds"] < 2.5 and latency["samples"] == round(latency["seconds"] * 32000)


def test_slow_network_gives_counted_underruns_filled_with_silence(server, tmp_path):
    """Each 100 ms chunk arrives 150 ms late: the buffer runs dry; the gaps are silence, counted, and the stream
    still reaches the device whole and in order."""
    report, received, stream = play_through_device(
        server, tmp_path, {"prompt": "warm lofi beat", "seconds": 1.0, "chunk_frames": 5}, delay=0.15,
        player={"start_fill_seconds": 0.1})
    stats = report["stats"]
    assert report["finished"] == "completed"
    matched, gaps = split_gaps(received[:, 0], stream[:, 0])
    assert matched == len(stream) == 32000
    assert stats["underruns"] >= 1 and len(gaps) == stats["underruns"]
    assert sum(gaps) == stats["underrun_frames"]  # every inserted silent frame was counted
    assert stats["samples_played"] == 32000


def test_acks_pace_the_server_by_the_device_with_resampling_and_stereo(server, tmp_path):
    """A device run at 48 kHz stereo plays a 32 kHz mono stream (the ALSA null device would take 32 kHz mono, so the
    device format is forced): the player resamples and duplicates the channel,
    acks in stream samples what the device consumed, and the server never runs more than its lead plus one
    chunk ahead of those acks, so the session takes real time."""
    lead, seconds = 0.5, 3.0
    start = time.monotonic()
    report, received, stream = play_through_device(
        server, tmp_path, {"prompt": "ambient pad", "seconds": seconds, "max_lead_seconds": lead,
                           "chunk_frames": 5}, player={"device_rate": 48000, "device_channels": 2},
        rate=48000, channels=2)
    wall = time.monotonic() - start
    stats, arrivals = report["stats"], report["arrivals"]
    assert (report["device_rate"], report["device_channels"]) == (48000, 2)
    assert stats["underruns"] == 0 and stats["samples_played"] == 96000 and stats["frames_played"] == 144000
    bound = lead * 32000 + report["chunk_samples"]
    # the session's end sends its tail (the codec's held-back frames and the last chunk) at once
    tail_start = seconds * 32000 - report["chunk_samples"] - 4 * 640
    ahead = [a["end_sample"] - a["acked"] for a in arrivals if a["end_sample"] <= tail_start]
    assert max(ahead) <= bound, f"server ran {max(ahead)} samples ahead of the acks (bound {bound})"
    late = [a for a in arrivals if a["end_sample"] > 2 * bound]  # past the initial fill
    assert late and min(a["end_sample"] - a["played"] for a in late) > 0.5 * lead * 32000  # and kept its lead
    assert wall > seconds - lead  # paced: generation followed playback, it did not run ahead
    import soxr
    expected = soxr.resample(stream, 32000, 48000, quality="HQ")[:, 0]
    first = int(np.flatnonzero(received[:, 0])[0])
    assert np.array_equal(received[:, 0], received[:, 1])
    assert np.abs(received[first:first + len(expected), 0] - expected).max() < 1e-5


def test_cli_play_through_the_device_records_what_it_plays(server, tmp_path):
    device = ClockedAlsaDevice(tmp_path / "home", 32000, 1)
    out = tmp_path / "take.wav"
    try:
        result = subprocess.run([sys.executable, "-m", "client.cli", "--server", server.address, "play",
                                 "warm lofi beat", "--seconds", "1", "--out", str(out), "--greedy"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT,
                                env={**device.env(), "PYTHONPATH": str(ROOT)})
    finally:
        received = device.stop()
    assert result.returncode == 0, result.stderr
    assert "played" in result.stderr and "underruns 0" in result.stderr
    with wave.open(str(out), "rb") as handle:
        recorded = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    first = int(np.flatnonzero(received[:, 0])[0])
    assert recorded.shape == (32000,)
    assert np.array_equal(to_int16(received[first:first + 32000, 0]), recorded)
