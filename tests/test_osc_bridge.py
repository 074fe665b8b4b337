"""musicgen-osc over loopback UDP: a bridge process steered by this process as its OSC client, replies read
from a UDP socket here, audio into the clocked ALSA device of tests/audio_devices.py."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pythonosc = pytest.importorskip("pythonosc")
from pythonosc.osc_message import OscMessage  # noqa: E402
from pythonosc.osc_message_builder import OscMessageBuilder  # noqa: E402

from audio_devices import ClockedAlsaDevice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Bridge:
    """A musicgen-osc process and this process's OSC endpoint: send() to it, replies() from it."""

    def __init__(self, server, *options: str, env: dict | None = None):
        self.inbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inbox.bind(("127.0.0.1", 0))
        self.inbox.settimeout(0.1)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.osc_bridge", "--server", server.address, "--osc-port", "0",
             "--reply-port", str(self.inbox.getsockname()[1]), "--position-interval", "0.2", "--lead", "0.5",
             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**(env or os.environ), "PYTHONPATH": str(ROOT)})
        line = self.process.stdout.readline()
        assert "listening on" in line, self.process.stderr.read()
        self.port = int(line.rsplit(":", 1)[1])
        self.outbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.seen: list[tuple[str, list]] = []

    def send(self, address: str, *args) -> None:
        builder = OscMessageBuilder(address=address)
        for arg in args:
            builder.add_arg(arg)
        self.outbox.sendto(builder.build().dgram, ("127.0.0.1", self.port))

    def send_raw(self, data: bytes) -> None:
        self.outbox.sendto(data, ("127.0.0.1", self.port))

    def wait_for(self, address: str, timeout: float = 20.0) -> list:
        """The arguments of the next reply to `address` (replies on the way are kept in `seen`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.inbox.recv(65536)
            except socket.timeout:
                continue
            message = OscMessage(data)
            self.seen.append((message.address, list(message.params)))
            if message.address == address:
                return list(message.params)
        raise AssertionError(f"no {address} reply; seen {self.seen[-6:]}")

    def close(self) -> str:
        self.process.terminate()
        try:
            _, stderr = self.process.communicate(timeout=10)
        finally:
            self.process.kill()
        return stderr


@pytest.mark.skipif(ctypes.util.find_library("portaudio") is None, reason="PortAudio is not installed")
def test_osc_starts_steers_and_stops_a_session_played_into_the_device(mono_server, tmp_path):
    device = ClockedAlsaDevice(tmp_path / "home", 32000, 1)
    loop = tmp_path / "loop.wav"
    with wave.open(str(loop), "wb") as handle:
        handle.setnchannels(1), handle.setsampwidth(2), handle.setframerate(32000)
        handle.writeframes((3000 * np.sin(np.arange(32000) * 0.05)).astype("<i2").tobytes())
    bridge = Bridge(mono_server, env=device.env())
    try:
        bridge.send("/musicgen/0/start", "warm lofi beat")
        session_id, rate = bridge.wait_for("/musicgen/0/started")
        assert rate == 32000 and session_id
        bridge.send("/musicgen/0/prompt", "dark techno")
        assert bridge.wait_for("/musicgen/0/applied")[0] == 1  # prompt revision 1
        bridge.send("/musicgen/0/weights", "ambient pad", 0.7, "dark techno", 0.3)
        assert bridge.wait_for("/musicgen/0/applied")[0] == 2
        bridge.send("/musicgen/0/morph", 0.2, "funky bass", 1.0, "ambient pad", 1.0)
        revision, frame, sample = bridge.wait_for("/musicgen/0/applied")
        ended, _ = bridge.wait_for("/musicgen/0/transition_ended")
        assert revision == 3 and ended == frame + 10 - 1 and sample == frame * 640  # 0.2 s = 10 frames
        bridge.send("/musicgen/0/append", str(loop))
        bridge.wait_for("/musicgen/0/audio_appended")
        bridge.send("/musicgen/0/pause")
        bridge.wait_for("/musicgen/0/paused")
        bridge.send("/musicgen/0/resume")
        bridge.wait_for("/musicgen/0/resumed")
        played, buffered, underruns = bridge.wait_for("/musicgen/0/position")
        assert played > 0 and buffered >= 0 and underruns >= 0
        bridge.send("/musicgen/0/stop")
        reason, total, _ = bridge.wait_for("/musicgen/0/finished")
        assert reason == "stopped" and total > 0
        time.sleep(1.0)  # the player drains into the device
    finally:
        stderr = bridge.close()
        received = device.stop()
    assert not [a for a, _ in bridge.seen if a == "/musicgen/error"], stderr
    assert received.shape[0] > 0 and np.abs(received).max() > 0  # the device played the session's audio


def test_bad_messages_get_an_error_reply_and_the_bridge_keeps_running(mono_server):
    bridge = Bridge(mono_server, "--no-playback")
    try:
        cases = [(("/musicgen/0/prompt", "x"), "/musicgen/0/prompt", ""),  # no session yet
                 (("/synth/1/freq", 440.0), "/synth/1/freq", ""),
                 (("/musicgen/99/start", "x"), "/musicgen/99/start", ""),
                 (("/musicgen/0/dance",), "/musicgen/0/dance", ""),
                 (("/musicgen/0/start", 42), "/musicgen/0/start", "1")]
        for message, address, argument in cases:
            bridge.send(*message)
            error = bridge.wait_for("/musicgen/error")
            assert error[:2] == [address, argument], error
        bridge.send_raw(b"not an OSC packet")
        assert "malformed OSC packet" in bridge.wait_for("/musicgen/error")[2]
        bridge.send("/musicgen/0/start", "warm lofi beat")
        bridge.send("/musicgen/1/start", "dark techno")  # a second channel, its own session
        first, second = bridge.wait_for("/musicgen/0/started"), bridge.wait_for("/musicgen/1/started")
        assert first[0] != second[0]
        for message, argument in [(("/musicgen/0/weights", "a", 1.0, "b"), "4"),
                                  (("/musicgen/0/weights", "a", float("nan")), "2"),
                                  (("/musicgen/0/weights", "a", 0.0), "2"),
                                  (("/musicgen/0/morph", "soon", "a"), "1"),
                                  (("/musicgen/0/prompt", 1.5), "1"),
                                  (("/musicgen/0/append", "/no/such.wav"), "1"),
                                  (("/musicgen/0/start", "again"), "")]:
            bridge.send(*message)
            error = bridge.wait_for("/musicgen/error")
            assert error[:2] == [message[0], argument], error
        bridge.send("/musicgen/1/prompt", "ambient pad")  # the sessions play on through all of that
        assert bridge.wait_for("/musicgen/1/applied")[0] == 1
        for channel in (0, 1):
            bridge.send(f"/musicgen/{channel}/stop")
            assert bridge.wait_for(f"/musicgen/{channel}/finished")[0] == "stopped"
    finally:
        bridge.close()


@pytest.mark.skipif(shutil.which("oscsend") is None, reason="liblo-tools (oscsend) is not installed")
def test_liblo_oscsend_drives_the_bridge(mono_server):
    bridge = Bridge(mono_server, "--no-playback")

    def oscsend(address: str, types: str = "", *args: str) -> None:
        subprocess.run(["oscsend", "127.0.0.1", str(bridge.port), address, types, *args], check=True, timeout=10)

    try:
        oscsend("/musicgen/2/start", "s", "warm lofi beat")
        assert bridge.wait_for("/musicgen/2/started")[1] == 32000
        oscsend("/musicgen/2/weights", "sfsf", "ambient pad", "0.25", "dark techno", "0.75")
        assert bridge.wait_for("/musicgen/2/applied")[0] == 1
        oscsend("/musicgen/2/prompt", "i", "7")
        assert bridge.wait_for("/musicgen/error")[:2] == ["/musicgen/2/prompt", "1"]
        oscsend("/musicgen/2/stop")
        assert bridge.wait_for("/musicgen/2/finished")[0] == "stopped"
    finally:
        bridge.close()


def test_no_playback_consumes_like_a_device_that_stops_when_it_runs_dry():
    """--no-playback's clock plays what has arrived and waits at its end (an underrun), then goes on from there:
    after a stall it never acks audio faster than real time."""
    import queue
    from types import SimpleNamespace

    from client.events import AudioChunk
    from client.osc_bridge import ClockPlayer

    class FakeSession:
        started = SimpleNamespace(sample_rate=32000, paused=False)
        finished = None

        def __init__(self):
            self.events: queue.Queue = queue.Queue()
            self.acks: list[int] = []

        def __iter__(self):
            return iter(self.events.get, None)

        def ack(self, samples: int) -> None:
            self.acks.append(samples)

        def close(self) -> None:
            self.events.put(None)

    def chunk(start: int) -> AudioChunk:  # 0.1 s
        return AudioChunk(0, start, start // 640, 5, np.zeros((3200, 1), np.float32), "", 0, None)

    session = FakeSession()
    player = ClockPlayer(session, on_event=lambda event: None).start()
    assert player.sample_heard_at(time.monotonic()) is None  # nothing arrived: not playing yet
    session.events.put(chunk(0))
    time.sleep(0.3)  # 0.1 s of audio, then nothing for 0.2 s
    assert player.samples_played == 3200 and player.underruns == 1
    session.events.put(chunk(3200))
    time.sleep(0.05)
    assert 3200 < player.samples_played <= 3200 + 0.06 * 32000  # on from where it stopped, at the clock's rate
    player.close()
    assert max(session.acks) <= 6400
