"""Steering scheduled at an output sample, a frame, or a bar or beat of the session tempo, over a real server on
loopback. Sessions start paused and are scheduled before they resume, so where each command lands does not
depend on timing."""

from __future__ import annotations

import numpy as np
import pytest

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import WeightedPrompts
from server_harness import RequestQueue, collect
from test_weighted_prompts import LOFI, TECHNO, reference

GREEDY = pb.Sampling(greedy=True, guidance_scale=3.0)
# 600 bpm at 32 kHz: a beat is 3200 samples (5 frames), a bar of 4 beats 20 frames; bar 0 starts at frame 5
TEMPO = pb.Tempo(bpm=600, beats_per_bar=4, beat_one_sample=3200)


def scheduled(mono_server, *steering: pb.SessionRequest, frames: int = 60, **start_fields):
    """A paused, unpaced session: the steering requests, then Resume, then a stop at `frames`."""
    start = pb.StartSession(prompt=LOFI, sampling=GREEDY, return_codes=True, chunk_frames=5, unpaced=True,
                            start_paused=True, **start_fields)
    requests = RequestQueue(pb.SessionRequest(start=start))
    for request in steering:
        requests.send(request)
    requests.send(pb.SessionRequest(stop=pb.Stop(at=pb.At(frame=frames))))
    requests.send(pb.SessionRequest(resume=pb.Resume()))
    return collect(mono_server.stub().Session(iter(requests)))


def notices(result, kind) -> list[int]:
    return [n.frame for n in result.of("notice") if n.kind == kind]


@pytest.mark.parametrize("at", [pb.At(frame=30), pb.At(sample=30 * 640 - 639), pb.At(sample=30 * 640)],
                         ids=["frame", "sample_inside_the_frame_before", "sample_on_the_frame"])
def test_a_prompt_change_scheduled_at_a_time_lands_on_its_frame(mono_server, mono_model, at):
    result = scheduled(mono_server, pb.SessionRequest(set_prompt=pb.SetPrompt(text=TECHNO, at=at)))
    assert notices(result, pb.NOTICE_KIND_PROMPT_APPLIED) == [30]
    switched = reference(mono_model, WeightedPrompts.single(LOFI), 60, switch=(33, WeightedPrompts.single(TECHNO)))
    assert np.array_equal(result.codes, switched)
    first_new = next(c for c in result.of("audio") if c.prompt_revision == 1)
    assert first_new.first_frame == 30 and first_new.start_sample == 30 * 640


def test_bars_and_beats_of_the_session_tempo(mono_server):
    result = scheduled(mono_server,
                       pb.SessionRequest(set_prompt=pb.SetPrompt(text=TECHNO, at=pb.At(next_bar=True))),
                       pb.SessionRequest(set_prompt=pb.SetPrompt(text=LOFI, at=pb.At(bar=2))),
                       pb.SessionRequest(set_prompt=pb.SetPrompt(text=TECHNO, at=pb.At(beat=10))),
                       tempo=TEMPO, frames=80)
    # next bar from frame 0: bar 0 at frame 5; bar 2 at 5 + 2 x 20; beat 10 at 5 + 10 x 5
    assert notices(result, pb.NOTICE_KIND_PROMPT_APPLIED) == [5, 45, 55]


def test_a_new_tempo_applies_to_the_commands_after_it(mono_server):
    faster = pb.Tempo(bpm=600, beats_per_bar=2, beat_one_sample=0)  # a bar is 10 frames
    result = scheduled(mono_server, pb.SessionRequest(set_tempo=faster),
                       pb.SessionRequest(set_prompt=pb.SetPrompt(text=TECHNO, at=pb.At(bar=3))), tempo=TEMPO)
    assert notices(result, pb.NOTICE_KIND_PROMPT_APPLIED) == [30]


def test_pause_stop_and_append_land_on_their_frames(mono_server):
    audio = pb.AudioData(pcm=(0.2 * np.sin(np.arange(640 * 6) * 0.05)).astype("<f4").tobytes(), sample_rate=32000,
                         channels=1, encoding=pb.AUDIO_ENCODING_FLOAT32_LE)
    requests = [pb.SessionRequest(append_audio=pb.AppendAudio(audio=audio, at=pb.At(frame=20))),
                pb.SessionRequest(pause=pb.Pause(at=pb.At(sample=35 * 640)))]
    start = pb.StartSession(prompt=LOFI, sampling=GREEDY, return_codes=True, chunk_frames=5, unpaced=True,
                            start_paused=True)
    queue = RequestQueue(pb.SessionRequest(start=start))
    for request in requests:
        queue.send(request)
    queue.send(pb.SessionRequest(resume=pb.Resume()))
    call = mono_server.stub().Session(iter(queue))
    chunks, seen = [], []
    for event in call:
        seen.append(event)
        if event.WhichOneof("event") == "audio":
            chunks.append(event.audio)
        if event.WhichOneof("event") == "notice" and event.notice.kind == pb.NOTICE_KIND_PAUSED:
            assert event.notice.frame == 35
            assert sum(c.frame_count for c in chunks) <= 35  # nothing past it (the codec holds its lookahead)
            queue.send(pb.SessionRequest(stop=pb.Stop(at=pb.At(frame=50))))
            queue.send(pb.SessionRequest(resume=pb.Resume()))
    kinds = {n.kind: n.frame for n in (e.notice for e in seen if e.WhichOneof("event") == "notice")}
    assert kinds[pb.NOTICE_KIND_AUDIO_APPENDED] == 20
    finished = seen[-1].finished
    assert finished.reason == pb.FINISH_REASON_STOPPED
    assert finished.total_frames == 50 and finished.total_samples == 50 * 640


def test_a_stop_scheduled_ahead_keeps_the_stream_open_for_acks_and_steering(mono_server):
    result = scheduled(mono_server, pb.SessionRequest(set_prompt=pb.SetPrompt(text=TECHNO, at=pb.At(frame=12))),
                       frames=24)
    assert result.of("finished")[0].total_frames == 24
    assert notices(result, pb.NOTICE_KIND_PROMPT_APPLIED) == [12]


def test_a_scheduled_sampling_change_lands_as_a_change_on_what_is_in_effect_then(mono_server):
    result = scheduled(mono_server, pb.SessionRequest(set_prompt=pb.SetPrompt(sampling=pb.Sampling(temperature=0.5),
                                                                         at=pb.At(frame=40))),
                       pb.SessionRequest(set_prompt=pb.SetPrompt(sampling=pb.Sampling(top_k=10))))
    for chunk in result.of("audio"):  # the later immediate change is kept, the scheduled one waits for frame 40
        assert chunk.sampling.top_k == 10, chunk.first_frame
        assert chunk.sampling.temperature == pytest.approx(0.5 if chunk.first_frame >= 40 else 1.0), chunk.first_frame


def test_a_command_due_at_the_frame_reached_applies_in_the_order_sent(mono_server):
    result = scheduled(mono_server, pb.SessionRequest(set_prompt=pb.SetPrompt(text=TECHNO, at=pb.At(frame=0))),
                       pb.SessionRequest(set_prompt=pb.SetPrompt(text="ambient pads")), frames=10)
    assert {c.prompt for c in result.of("audio")} == {"ambient pads"}  # sent last, so in effect


def test_a_transition_in_beats_lasts_that_many_beats_of_the_tempo(mono_server):
    result = scheduled(mono_server, pb.SessionRequest(set_prompt=pb.SetPrompt(
        text=TECHNO, at=pb.At(bar=1), transition=pb.Transition(beats=4.0))), tempo=TEMPO, frames=70)
    applied = notices(result, pb.NOTICE_KIND_PROMPT_APPLIED)
    assert applied == [25]  # bar 1 of the tempo
    assert notices(result, pb.NOTICE_KIND_TRANSITION_ENDED) == [25 + 20 - 1]  # 4 beats of 5 frames


def test_a_time_at_the_clients_earliest_schedulable_sample_never_ends_the_session(mono_server):
    """LiveSession.earliest_schedulable_sample bounds what the server may have generated: commands aimed at it,
    again and again while the session runs paced by a clock, are all taken (none is 'already generated')."""
    import threading
    import time

    from client import MusicGenClient
    from client.requests import At

    with MusicGenClient(mono_server.address) as client:
        session = client.open_session("warm lofi beat", max_lead_seconds=0.5)
        rate, started_at = session.started.sample_rate, time.monotonic()
        reader = threading.Thread(target=lambda: [None for _ in session], daemon=True)
        reader.start()
        sent = 0
        while time.monotonic() - started_at < 5.0 and session.finished is None:
            session.ack(min(session.samples_received, round((time.monotonic() - started_at) * rate)))
            session.set_prompt(f"take {sent}", at=At.sample(session.earliest_schedulable_sample()))
            sent += 1
            time.sleep(0.013)
        finished = session.finished
        session.close()
    assert finished is None, finished.message
    assert sent > 100
