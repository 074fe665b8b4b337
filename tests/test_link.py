"""Ableton Link through musicgen-osc: two Link peers on this machine, the bridge and this test, which sets the
tempo and checks, with its own view of the Link timeline, where the bridge's changes were heard."""

from __future__ import annotations

import ctypes.util
import time
from types import SimpleNamespace

import numpy as np
import pytest

link = pytest.importorskip("link")  # LinkPython-extern
pytest.importorskip("pythonosc")

from audio_devices import ClockedAlsaDevice  # noqa: E402
from test_osc_bridge import Bridge  # noqa: E402

RATE = 32000
FRAME = 640  # samples per frame of the demo model at 32 kHz: a change lands between frames


class Peer:
    """Another Link peer (a DAW, a live coder's clock): proposes tempos and reads the shared timeline."""

    def __init__(self, bpm: float):
        self.link = link.Link(bpm)
        self.link.enabled = True

    def wait_for_peers(self, count: int = 1, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.link.numPeers() < count:
            assert time.monotonic() < deadline, "the Link peers did not find each other"
            time.sleep(0.05)

    def set_tempo(self, bpm: float) -> None:
        state = self.link.captureSessionState()
        state.setTempo(bpm, self.link.clock().micros())
        self.link.commitSessionState(state)

    @property
    def tempo(self) -> float:
        return self.link.captureSessionState().tempo()

    def bar_error_samples(self, micros: int, quantum: int = 4) -> float:
        """How far from this peer's nearest bar line a moment of Link time is, in output samples."""
        state = self.link.captureSessionState()
        beat = state.beatAtTime(micros, quantum)
        return (beat - round(beat / quantum) * quantum) * 60.0 * RATE / state.tempo()

    def close(self) -> None:
        self.link.enabled = False


@pytest.fixture
def peer():
    """This test's Link peer; skips where the network already has a Link session (a musician's DAW on the
    LAN): these tests set tempos, which every peer of that session would follow."""
    peer = Peer(137.0)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if peer.link.numPeers():
            peer.close()
            pytest.skip("another Ableton Link session is on this network; its tempo must not be changed")
        time.sleep(0.05)
    yield peer
    peer.close()


def wait_for_tempo(bridge: Bridge, bpm: float, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        reply = bridge.wait_for("/musicgen/0/tempo", timeout=max(0.1, deadline - time.monotonic()))
        if abs(reply[0] - bpm) < 1e-3:
            return reply


def start_at_tempo(bridge: Bridge, bpm: float) -> None:
    """Channel 0 playing with a tempo sent over OSC (bar 0 at its first sample)."""
    bridge.send("/musicgen/0/start", "warm lofi beat")
    bridge.wait_for("/musicgen/0/started")
    bridge.send("/musicgen/0/tempo", bpm)
    bridge.wait_for("/musicgen/0/tempo")


def test_a_session_takes_the_tempo_a_link_peer_sets(mono_server, peer):
    bridge = Bridge(mono_server, "--no-playback", "--link", "--link-bpm", "100")
    try:
        peer.wait_for_peers()
        bridge.send("/musicgen/0/start", "warm lofi beat")
        bridge.wait_for("/musicgen/0/started")
        bpm, beats_per_bar, _ = wait_for_tempo(bridge, peer.tempo)
        assert beats_per_bar == 4
        peer.set_tempo(90.0)  # the peer changes tempo mid-session: the session follows
        assert wait_for_tempo(bridge, peer.tempo)[0] == pytest.approx(90.0, abs=1e-3)
        bridge.send("/musicgen/0/tempo", 128.0)  # and a tempo sent over OSC goes to every Link peer
        wait_for_tempo(bridge, 128.0)
        deadline = time.monotonic() + 5
        while abs(peer.tempo - 128.0) > 1e-3:
            assert time.monotonic() < deadline, f"the peer kept {peer.tempo}"
            time.sleep(0.05)
    finally:
        stderr = bridge.close()
    assert not [a for a, _ in bridge.seen if a == "/musicgen/error"], stderr


def test_next_bar_lands_on_the_frame_nearest_links_bar_line(mono_server, peer):
    bridge = Bridge(mono_server, "--no-playback", "--link")
    try:
        peer.wait_for_peers()
        bridge.send("/musicgen/0/start", "warm lofi beat")
        bridge.wait_for("/musicgen/0/started")
        for text, bpm in [("dark techno", 137.0), ("ambient pad", 93.0)]:
            if peer.tempo != pytest.approx(bpm, abs=1e-3):
                peer.set_tempo(bpm)
                wait_for_tempo(bridge, bpm)
            bridge.send("/musicgen/0/at", "next_bar", "prompt", text)
            _, frame, sample = bridge.wait_for("/musicgen/0/applied")
            what, landed_sample, micros, _, bar_error, _ = bridge.wait_for("/musicgen/0/landed", timeout=30)
            assert (what, landed_sample) == ("prompt_applied", sample) and sample == frame * FRAME
            # the frame nearest the bar: half a frame either way, with room for the two clocks' slew (~2 ms)
            assert abs(bar_error) <= FRAME / 2 + 64, bar_error  # the bridge's own measure
            assert abs(peer.bar_error_samples(micros)) <= FRAME / 2 + 64  # as the other peer sees the timeline
    finally:
        stderr = bridge.close()
    assert not [a for a, _ in bridge.seen if a == "/musicgen/error"], stderr


@pytest.mark.skipif(ctypes.util.find_library("portaudio") is None, reason="PortAudio is not installed")
def test_next_bar_lands_on_the_bar_through_a_real_output_device(mono_server, peer, tmp_path):
    """Played through PortAudio into the clocked ALSA device: the bridge places bars by the player's DAC times."""
    device = ClockedAlsaDevice(tmp_path / "home", RATE, 1)
    bridge = Bridge(mono_server, "--link", env=device.env())
    try:
        peer.wait_for_peers()
        bridge.send("/musicgen/0/start", "warm lofi beat")
        bridge.wait_for("/musicgen/0/started")
        wait_for_tempo(bridge, peer.tempo)
        bridge.send("/musicgen/0/at", "next_bar", "weights", "ambient pad", 0.6, "dark techno", 0.4)
        bridge.wait_for("/musicgen/0/applied")
        _, _, micros, _, bar_error, _ = bridge.wait_for("/musicgen/0/landed", timeout=30)
        assert abs(bar_error) <= FRAME and abs(peer.bar_error_samples(micros)) <= FRAME
    finally:
        stderr = bridge.close()
        device.stop()
    assert not [a for a, _ in bridge.seen if a == "/musicgen/error"], stderr


def test_without_link_bars_follow_the_tempo_sent_over_osc(mono_server):
    bridge = Bridge(mono_server, "--no-playback")
    try:
        bridge.send("/musicgen/0/start", "warm lofi beat")
        bridge.wait_for("/musicgen/0/started")
        bridge.send("/musicgen/0/at", "next_bar", "prompt", "dark techno")
        assert bridge.wait_for("/musicgen/error")[1:] == ["1", "bars and beats need a tempo: send "
                                                                "/musicgen/0/tempo first (or run the bridge "
                                                                "with --link)"]
        bridge.send("/musicgen/0/tempo", 150.0, 4)  # a bar is 4 x 0.4 s = 64000 samples, bar 0 at sample 0
        assert bridge.wait_for("/musicgen/0/tempo") == [150.0, 4, 0]
        bridge.send("/musicgen/0/at", "bar", 3, "prompt", "dark techno")
        assert bridge.wait_for("/musicgen/0/applied")[1:] == [240, 153600]  # bar 3 = 4.8 s = frame 240
        bridge.send("/musicgen/0/at", "next_beat", "pause")
        frame, sample = bridge.wait_for("/musicgen/0/paused")
        assert sample == frame * FRAME and sample % 12800 == 0  # a beat is 0.4 s = 12800 samples
    finally:
        stderr = bridge.close()
    assert not [a for a, _ in bridge.seen if a == "/musicgen/error"][1:], stderr


def test_bad_scheduling_messages_get_an_error_and_the_session_plays_on(mono_server):
    bridge = Bridge(mono_server, "--no-playback")
    try:
        start_at_tempo(bridge, 120.0)
        cases = [(("soon", "prompt", "x"), "1"),  # not a time
                 (("bar", -1.0, "prompt", "x"), "2"),
                 (("bar", 1.5, "prompt", "x"), "2"),
                 (("bar", 4, "dance"), "3"),  # not a schedulable command
                 (("bar", 4, "resume"), "3"),
                 (("bar", 4, "prompt", 7), "4"),  # the command's own argument, numbered in this message
                 (("sample", 0, "prompt", "x"), "2"),  # already generated: refused here, not by the server
                 (("next_bar", "weights", "a", 1.0, "b"), "6")]
        for args, argument in cases:
            bridge.send("/musicgen/0/at", *args)
            error = bridge.wait_for("/musicgen/error")
            assert error[:2] == ["/musicgen/0/at", argument], (args, error)
        for args, argument in [((10.0,), "1"), ((120.0, 0), "2"), (("fast",), "1")]:
            bridge.send("/musicgen/0/tempo", *args)
            assert bridge.wait_for("/musicgen/error")[:2] == ["/musicgen/0/tempo", argument]
        bridge.send("/musicgen/0/at", "next_bar", "prompt", "dark techno")  # the session still steers
        assert bridge.wait_for("/musicgen/0/applied")[0] == 1
    finally:
        stderr = bridge.close()
    assert "Traceback" not in stderr, stderr


def test_the_player_reports_when_each_sample_is_heard_from_its_callbacks():
    """Player.heard_at / sample_heard_at: each callback's DAC time (PortAudio's outputBufferDacTime -
    currentTime after the call, or the stream's output latency where the host gives none) bounds the clock from
    below; a burst of early callbacks (a host filling its buffer) does not pull it early."""
    from client.player import Player

    session = SimpleNamespace(started=SimpleNamespace(sample_rate=RATE, first_sample=0, channels=1, unpaced=True,
                                                      max_lead_seconds=0.0, chunk_samples=FRAME * 5, paused=False))
    player = Player(session, output=lambda *args: None, device_rate=48000, device_channels=1,
                    start_fill_seconds=0.01)
    player._stream = SimpleNamespace(latency=0.05)
    assert player.heard_at(0) is None and player.sample_heard_at(time.monotonic()) is None
    player.ring.write(np.zeros((48000, 1), np.float32))
    out = np.zeros((480, 1), np.float32)
    before = time.monotonic()
    player._callback(out, 480, SimpleNamespace(outputBufferDacTime=10.030, currentTime=10.0), None)
    heard_first = player.heard_at(0)
    assert before + 0.030 <= heard_first <= time.monotonic() + 0.030
    assert player.heard_at(320) == pytest.approx(heard_first + 0.010)  # 320 stream samples = 480 device frames
    for _ in range(3):  # a burst: three more blocks at once, each earlier than its frames are due
        player._callback(out, 480, SimpleNamespace(outputBufferDacTime=10.030, currentTime=10.0), None)
    assert player.heard_at(4 * 320) == pytest.approx(heard_first + 0.040, abs=0.002)
    time.sleep(0.2)  # then a block well after its predecessors: the device ran dry (an underrun's gap)
    before = time.monotonic()
    player._callback(out, 480, None, None)  # no DAC time from the host: the stream's 50 ms output latency
    after = time.monotonic()
    assert before + 0.050 <= player.heard_at(4 * 320) <= after + 0.050  # frame 1920 opened this block
    assert player.heard_at(320) == pytest.approx(heard_first + 0.010)  # what was heard before keeps its time
    assert player.sample_heard_at(player.heard_at(1280) + 0.5) == pytest.approx(1280 + 0.5 * RATE)


def test_one_callback_the_scheduler_ran_late_does_not_move_the_players_clock(monkeypatch):
    import client.player
    from client.player import Player

    clock = SimpleNamespace(now=time.monotonic())  # the callbacks' times, exact (a loaded host oversleeps)
    monkeypatch.setattr(client.player, "time", SimpleNamespace(monotonic=lambda: clock.now))
    session = SimpleNamespace(started=SimpleNamespace(sample_rate=RATE, first_sample=0, channels=1, unpaced=True,
                                                      max_lead_seconds=0.0, chunk_samples=FRAME * 5, paused=False))
    player = Player(session, output=lambda *args: None, device_rate=RATE, device_channels=1,
                    start_fill_seconds=0.01)
    player._stream = SimpleNamespace(latency=0.0)
    player.ring.write(np.zeros((RATE, 1), np.float32))
    out = np.zeros((320, 1), np.float32)  # 10 ms blocks, called on a 10 ms schedule
    start = clock.now
    for block in range(40):
        clock.now = start + block * 0.010 + (0.030 if block == 30 else 0.0)  # block 30 runs 30 ms late
        player._callback(out, 320, None, None)
    assert player.heard_at(39 * 320) == pytest.approx(start + 0.390, abs=0.008)


class HeardClockAt:
    """A player whose sample n reaches the listener at `start + delay + n / rate` (delay: its output latency)."""

    def __init__(self, start: float, delay: float):
        self.start, self.delay = start, delay

    def sample_heard_at(self, when: float) -> float:
        return (when - self.start - self.delay) * RATE


class LinkBarsAt:
    """Link's bar lines every `bar` seconds from `first` (time.monotonic()), at `bpm`, a quantum of 4."""

    quantum = 4

    def __init__(self, first: float, bpm: float):
        self.first, self.bpm = first, bpm

    def next_bar_at(self, when: float) -> tuple[float, float]:
        bar = 4 * 60.0 / self.bpm
        return self.first + -(-(when - self.first) // bar) * bar, self.bpm


@pytest.mark.parametrize("delay", [0.0, 0.25])
def test_anchor_puts_the_sessions_bars_where_the_player_says_links_bars_are_heard(delay):
    from client.link_tempo import anchor

    start = time.monotonic() - 3.0
    link = LinkBarsAt(first=start + 0.7, bpm=120.0)  # a bar is 2 s = 64000 samples
    result = anchor(link, HeardClockAt(start, delay), RATE, FRAME)
    # Link's bar at start + 0.7 + 2k s is heard as sample (0.7 + 2k - delay) * RATE; half a frame early
    expected = ((0.7 - delay) * RATE - FRAME / 2) % 64000
    expected += 64000 if expected < 32000 else 0  # bar 0 at least half a bar into the output
    assert (result.bpm, result.beats_per_bar) == (120.0, 4)
    assert result.beat_one_sample == pytest.approx(expected, abs=1)


def test_re_anchoring_keeps_bar_numbers_through_drift_and_a_tempo_change():
    from client.link_tempo import anchor

    start = time.monotonic() - 30.0
    link = LinkBarsAt(first=start + 0.7, bpm=120.0)
    first = anchor(link, HeardClockAt(start, 0.0), RATE, FRAME)
    drifted = anchor(link, HeardClockAt(start, 0.002), RATE, FRAME, previous=first)  # heard 2 ms later
    assert drifted.beat_one_sample == first.beat_one_sample - 64  # bar N moves by 64 samples, not by a bar
    faster = LinkBarsAt(first=start + 0.7, bpm=150.0)
    retimed = anchor(faster, HeardClockAt(start, 0.0), RATE, FRAME, previous=first)
    now_bar = faster.next_bar_at(time.monotonic())[0]
    sample = (now_bar - start) * RATE - FRAME / 2  # the next bar line keeps the number it had before
    old_number = round((sample - first.beat_one_sample) / 64000)
    assert round((sample - retimed.beat_one_sample) / 51200) == old_number and retimed.beat_one_sample >= 0


def test_the_bridge_refuses_a_65th_waiting_command_instead_of_letting_the_server_end_the_session(mono_server):
    bridge = Bridge(mono_server, "--no-playback")
    try:
        start_at_tempo(bridge, 120.0)
        for index in range(70):  # bars 50-119: minutes away, all waiting on the server
            bridge.send("/musicgen/0/at", "bar", 50 + index, "prompt", f"part {index}")
        bridge.send("/musicgen/0/prompt", "dark techno")  # the session still steers
        bridge.wait_for("/musicgen/0/applied")
        bridge.wait_for("/musicgen/0/position")  # (UDP messages are handled on threads: any order)
        errors = [args for address, args in bridge.seen if address == "/musicgen/error"]
        assert len(errors) == 6 and all("64 scheduled commands are still waiting" in e[2] for e in errors)
    finally:
        stderr = bridge.close()
    assert not [args for address, args in bridge.seen if address == "/musicgen/0/finished"], stderr
