"""The engine's scheduling rules, driven turn by turn without a transport."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from musicgen_core import MusicGen
from server.engine import Engine, EngineConfig, call_in_fresh_thread
from server.events import (AudioChunk, Finished, FinishReason, Notice, NoticeKind, ServerClosingError, SessionSpec,
                           Started)


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint)


def spec(model, **fields):
    return SessionSpec(text="warm lofi beat", params=model.default_sampling(greedy=True), **fields)


def test_commands_sent_before_a_session_begins_wait_for_it(model):
    engine, events = Engine(model), []
    handle = engine.open_session(spec(model), events.append)
    handle.pause()  # queued behind the session's Open, so it applies after the session began
    assert events == []
    engine.turn()
    assert isinstance(events[0], Started)
    assert isinstance(events[1], Notice) and events[1].kind is NoticeKind.PAUSED


def test_a_session_closed_before_it_begins_never_starts(model):
    engine, events = Engine(model), []
    handle = engine.open_session(spec(model), events.append)
    handle.close()
    engine.turn()
    assert events == [] and engine.active_sessions == 0


def test_no_new_sessions_once_shutdown_began(model):
    engine = Engine(model)
    engine.start()
    engine.shutdown(1)
    with pytest.raises(ServerClosingError):
        engine.open_session(spec(model), lambda event: None)


def test_shutdown_finishes_running_sessions(model):
    engine, events = Engine(model), []
    engine.start()
    engine.open_session(spec(model, max_lead_seconds=None), events.append)
    while not any(isinstance(e, Started) for e in events):
        pass
    engine.shutdown(5)
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 1 and finished[0].reason is FinishReason.SERVER_SHUTDOWN


def test_sessions_beyond_max_batch_take_turns(model):
    engine, events = Engine(model, EngineConfig(max_sessions=4, max_batch=2)), []
    for _ in range(3):
        engine.open_session(spec(model, max_lead_seconds=None), events.append)
    for _ in range(6):
        engine.turn()
    steps = sorted(s.stats.steps for s in engine.sessions)
    assert steps == [4, 4, 4]


def test_call_in_fresh_thread_returns_from_a_thread_that_has_ended():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert call_in_fresh_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_call_in_fresh_thread_raises_the_callers_error():
    def fail():
        raise FileNotFoundError("no checkpoint")

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        call_in_fresh_thread(fail)


def test_text_encodings_are_reused_exactly_and_bounded(model, monkeypatch):
    from server.session import TextEncodings

    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts: calls.append(texts) or original(texts))
    encodings = TextEncodings(model, capacity=2)
    first = encodings("warm lofi beat")
    assert encodings("warm lofi beat") is first and len(calls) == 1
    assert torch.equal(first.hidden, original(["warm lofi beat"])[0].hidden)
    encodings("dark techno")
    encodings("ambient pad")  # evicts the least recently used: "warm lofi beat"
    encodings("warm lofi beat")
    assert len(calls) == 4


def test_sessions_with_the_same_prompt_share_one_text_encoding(model, monkeypatch):
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts: calls.append(texts) or original(texts))
    engine = Engine(model)
    for _ in range(3):
        engine.open_session(spec(model), lambda event: None)
    engine.turn()
    assert calls == [["warm lofi beat"]]


def test_warm_up_runs_a_session_to_its_end_and_changes_nothing_after(model):
    """A warmed engine then gives a session the same codes and audio as a cold one."""
    warmed, cold = Engine(model), Engine(model)
    warmed.start()
    cold.start()
    try:
        assert warmed.warm_up() > 0 and warmed.active_sessions == 0
        results = []
        for engine in (warmed, cold):
            done, chunks = threading.Event(), []

            def sink(event, done=done, chunks=chunks):
                if isinstance(event, AudioChunk):
                    chunks.append(event)
                elif isinstance(event, Finished):
                    done.set()

            engine.open_session(spec(model, total_frames=12, chunk_frames=4, max_lead_seconds=None), sink)
            assert done.wait(60)
            results.append((np.concatenate([c.codes for c in chunks], axis=1),
                            np.concatenate([c.pcm for c in chunks], axis=1)))
        assert results[0][0].shape == (model.config.decoder.num_codebooks, 12)
        assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    finally:
        warmed.shutdown(5)
        cold.shutdown(5)


def run_until_finished(engine: Engine, events: list, seconds: float = 30.0) -> Finished:
    engine.start()
    try:
        deadline = __import__("time").monotonic() + seconds
        while not any(isinstance(e, Finished) for e in events):
            assert __import__("time").monotonic() < deadline, "the session never finished"
            __import__("time").sleep(0.01)
    finally:
        engine.shutdown(1)
    return next(e for e in events if isinstance(e, Finished))


def test_an_unpaced_session_whose_audio_is_not_delivered_is_held_then_ended(model):
    """The transport acks unpaced sessions on delivery: one whose client reads nothing stops at its delivery
    lead instead of buffering without bound, and ends with STALLED after the stall timeout."""
    from server.events import Failure
    engine, events = Engine(model, EngineConfig(stall_timeout_seconds=0.3)), []
    engine.open_session(spec(model, max_lead_seconds=None, delivery_lead_seconds=0.5, chunk_frames=5), events.append)
    finished = run_until_finished(engine, events)
    assert finished.reason is FinishReason.ERROR and finished.failure is Failure.STALLED
    sent = sum(e.pcm.shape[1] for e in events if isinstance(e, AudioChunk))
    rate = model.config.sampling_rate
    assert 0.5 * rate <= sent < 0.5 * rate + 5 * model.config.audio_encoder.hop_length  # the lead plus one chunk
    assert engine.active_sessions == 0


def test_an_unpaced_session_without_a_delivery_lead_never_stalls(model):
    engine, events = Engine(model, EngineConfig(stall_timeout_seconds=0.05)), []
    engine.open_session(spec(model, max_lead_seconds=None, total_frames=120), events.append)
    assert run_until_finished(engine, events).reason is FinishReason.COMPLETED
