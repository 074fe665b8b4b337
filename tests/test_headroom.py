"""The server watches its own headroom: a running real-time factor for the engine and for each session, in the
chunks, ModelInfo and the log (once when it falls below real time, not per step)."""

from __future__ import annotations

import logging

import pytest

from musicgen_core import MusicGen
from server.engine import Engine
from server.events import AudioChunk, SessionSpec
from server.headroom import EngineHeadroom, RunningRate


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint)


def test_the_running_rate_is_audio_per_busy_second_over_its_window():
    rate = RunningRate(window_seconds=1.0)
    assert rate.realtime_factor is None
    for _ in range(50):
        rate.add(0.02, 0.01)  # 2x real time
    for _ in range(50):
        rate.add(0.02, 0.04)  # then 0.5x: the window (1 s of audio) holds only these
    assert rate.realtime_factor == pytest.approx(0.5)


def test_falling_below_real_time_is_logged_once_until_it_recovers(caplog):
    headroom = EngineHeadroom(frame_seconds=0.02)
    with caplog.at_level(logging.INFO, logger="musicgen.engine"):
        for _ in range(1000):
            headroom.add_turn(0.04, 1)  # 0.5x for 20 s
        for _ in range(1000):
            headroom.add_turn(0.01, 1)  # then 2x
        for _ in range(1000):
            headroom.add_turn(0.04, 1)
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events == ["event=below_realtime", "event=realtime_recovered", "event=below_realtime"]
    assert "realtime_factor=0.50" in caplog.records[0].getMessage()


def test_a_cold_start_is_not_reported_as_below_real_time(caplog):
    headroom = EngineHeadroom(frame_seconds=0.02)
    with caplog.at_level(logging.INFO, logger="musicgen.engine"):
        for _ in range(10):  # the first, slow steps of a session: 0.2 s of audio, not a full window
            headroom.add_turn(0.5, 1)
    assert caplog.records == [] and headroom.realtime_factor == pytest.approx(0.04)


def test_each_chunk_carries_its_sessions_running_factor_and_the_engine_has_one(model):
    engine, events = Engine(model), []
    assert engine.headroom.realtime_factor is None
    engine.open_session(SessionSpec(text="warm lofi beat", params=model.default_sampling(greedy=True),
                                    max_lead_seconds=None, chunk_frames=2), events.append)
    for _ in range(12):
        engine.turn()
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert chunks and all(c.realtime_factor is not None and c.realtime_factor > 0 for c in chunks)
    (session,) = engine.sessions
    assert session.rate.realtime_factor == pytest.approx(engine.headroom.realtime_factor)  # it was in every turn
    assert engine.headroom.realtime_factor > 0
