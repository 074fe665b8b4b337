"""Nothing stops the music: three musicgen-server processes on loopback behind one round-robin, health-checked
channel; the serving one is killed with SIGKILL mid-session and the client's session resumes on another from
its codes, the Player playing through the switch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client import AudioChunk, MusicGenClient, MusicGenError, Player
from client.failover import Switched
from test_rollback import ClockedOutput

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def replicas(mono_checkpoint):
    """Three server processes: {address: process}."""
    servers = {}
    for _ in range(3):
        port = free_port()
        servers[f"127.0.0.1:{port}"] = subprocess.Popen(
            [sys.executable, "-m", "server.main", "--model", str(mono_checkpoint), "--port", str(port),
             "--max-sessions", "4", "--log-level", "WARNING"], cwd=ROOT, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    for address in servers:
        while True:
            try:
                MusicGenClient(address, timeout=1).model_info()
                break
            except Exception:
                assert time.monotonic() < deadline, f"{address} did not start"
                time.sleep(0.2)
    yield servers
    for process in servers.values():
        process.kill()
        process.wait(10)


def serving(addresses) -> str:
    """The replica with the session (by its ModelInfo.active_sessions)."""
    for address in addresses:
        try:
            if MusicGenClient(address, timeout=2).model_info().active_sessions:
                return address
        except Exception:
            continue
    raise AssertionError("no replica holds the session")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "drained"])
def test_losing_the_serving_replica_moves_the_session_without_a_gap(replicas, how):
    """SIGKILL: the stream breaks (UNAVAILABLE); SIGTERM: the server drains and sends SERVER_DRAINING first.
    Either way the session resumes on another replica and the player plays through."""
    outputs = []

    def output(rate, channels, blocksize, callback):
        outputs.append(ClockedOutput(rate, channels, blocksize, callback))
        return outputs[-1]

    client = MusicGenClient.replicas(list(replicas))
    session = client.open_session("warm lofi beat", sampling={"greedy": True, "guidance_scale": 3.0},
                                  chunk_frames=5, max_lead_seconds=2.0, failover=True)
    events: list = []
    player = Player(session, output=output, start_fill_seconds=0.2, on_event=events.append).start()
    deadline = time.monotonic() + 30
    while player.samples_played < 1.0 * 32000 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = serving(replicas)
    os.kill(replicas[victim].pid, how)
    deadline = time.monotonic() + 30
    while player.samples_played < 3.5 * 32000 and player.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert player.error is None, repr(player.error)
    session.stop()
    player.wait(15)
    player.close()
    client.close()

    switches = [e for e in events if isinstance(e, Switched)]
    assert len(switches) == 1 and switches[0].seconds < 5
    assert switches[0].reason == ("UNAVAILABLE" if how == signal.SIGKILL else "server_draining")
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert all(a.end_sample == b.start_sample for a, b in zip(chunks, chunks[1:]))  # contiguous, nothing twice
    assert chunks[0].start_sample == 0
    assert player.stats.underruns == 0  # the 2 s lead covered the switch
    # the frames after the switch are what a session resumed from the codes held at the switch gives
    at = switches[0].sample // 640
    held = np.concatenate([c.codes for c in chunks if c.end_sample <= switches[0].sample])
    survivor = MusicGenClient([a for a in replicas if a != victim][0])
    reference = survivor.generate("warm lofi beat", frames=20, sampling={"greedy": True, "guidance_scale": 3.0},
                                  chunk_frames=5, return_codes=True, resume_codes=held[-1500:],
                                  resume_at_sample=at * 640)
    expected = np.concatenate([c.codes for c in reference])
    resumed = np.concatenate([c.codes for c in chunks if c.start_sample >= switches[0].sample])[:20]
    assert np.array_equal(resumed[:16], expected[:16])  # the reference is bounded: its last frames end it
    survivor.close()


def test_with_every_replica_down_the_session_fails_clearly_after_the_bound(replicas):
    client = MusicGenClient.replicas(list(replicas))
    session = client.open_session("warm lofi beat", sampling={"greedy": True}, chunk_frames=5, max_lead_seconds=0.5,
                                  failover=True, failover_seconds=2.0)
    for process in replicas.values():
        process.kill()
    broke = time.monotonic()
    with pytest.raises(MusicGenError, match="no replica took the session within 2 s"):
        for event in session:
            if isinstance(event, AudioChunk):
                session.ack(event.end_sample)
    assert time.monotonic() - broke < 2.0 + 3.0  # the bound, plus backoff granularity and connection timeouts
    client.close()
