"""Clients that vanish, send bytes that do not parse, or push every documented range: each gets the documented
status, the session is freed at once, and the log gets one line and no traceback."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import MusicGen
from server.engine import EngineConfig
from server_harness import RequestQueue, ServerThread, collect, start_request

INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
STALL_SECONDS = 0.5


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, EngineConfig(max_sessions=4, stall_timeout_seconds=STALL_SECONDS)) as running:
        yield running


def wait_until_idle(server, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while server.engine.active_sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.engine.active_sessions


def raw_session(server, messages: list[bytes], timeout: float = 30) -> tuple[list, grpc.RpcError | None]:
    """Send raw bytes as SessionRequests (no client-side serialization), then half-close."""
    events = []
    try:
        for event in server.raw_session()(iter(messages), timeout=timeout):
            events.append(event)
    except grpc.RpcError as error:
        return events, error
    return events, None


def no_tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# -- a client that is gone without a cancel reaching the server -----------------------------------------------

def test_paced_session_without_acks_ends_at_the_stall_timeout(server):
    queue = RequestQueue(start_request("warm lofi beat", max_lead_seconds=0.2))
    events = []
    with pytest.raises(grpc.RpcError) as error:
        for event in server.stub().Session(iter(queue), timeout=30):
            events.append(event)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.value.details().startswith("ack: no Ack for 0.5 s")
    finished = events[-1].finished
    assert finished.reason == pb.FINISH_REASON_ERROR and finished.message == error.value.details()
    assert wait_until_idle(server) == 0


def test_acks_keep_a_session_alive_past_the_stall_timeout(server):
    queue = RequestQueue(start_request("warm lofi beat", max_lead_seconds=0.2, chunk_frames=2))
    call = server.stub().Session(iter(queue), timeout=30)
    began = time.monotonic()
    for event in call:
        if event.WhichOneof("event") == "audio":
            queue.send(pb.SessionRequest(ack=pb.Ack(samples_played=event.audio.start_sample +
                                                    event.audio.sample_count)))
            if time.monotonic() - began > 4 * STALL_SECONDS:
                queue.send(pb.SessionRequest(stop=pb.Stop()))
                queue.close()
                break
    assert collect(call).of("finished")[0].reason == pb.FINISH_REASON_STOPPED


def test_a_paused_session_is_never_stalled(server):
    queue = RequestQueue(start_request("warm lofi beat", start_paused=True))
    call = server.stub().Session(iter(queue), timeout=30)
    assert next(call).WhichOneof("event") == "started"
    time.sleep(3 * STALL_SECONDS)
    assert server.engine.active_sessions == 1
    queue.send(pb.SessionRequest(stop=pb.Stop()))
    queue.close()
    assert collect(call).of("finished")[0].reason == pb.FINISH_REASON_STOPPED


# -- bytes that do not parse ----------------------------------------------------------------------------------

VALID_START = pb.SessionRequest(start=pb.StartSession(prompt="abc", unpaced=True)).SerializeToString()
BAD_UTF8_START = VALID_START.replace(b"abc", b"a\xffc")


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", BAD_UTF8_START, b"\x0a\x05abc"],
                         ids=["corrupt", "bad_utf8", "truncated"])
def test_undecodable_first_message_is_invalid_argument(server, caplog, data):
    caplog.set_level(logging.INFO)
    events, error = raw_session(server, [data])
    assert events == [] and error.code() == INVALID
    assert error.details().startswith("request: not a valid musicgen.v1.SessionRequest")
    assert no_tracebacks(caplog) == []
    assert len([r for r in caplog.records if "event=rejected" in r.getMessage()]) == 1


def test_undecodable_message_after_start_ends_the_session_at_once(server, caplog):
    caplog.set_level(logging.INFO)
    queue = RequestQueue()
    queue.send(VALID_START)
    call = server.raw_session()(iter(queue), timeout=20)
    events = [next(call)]
    assert events[0].WhichOneof("event") == "started"
    queue.send(b"\xff\xff\xff\xff")
    with pytest.raises(grpc.RpcError) as error:
        events.extend(call)
    assert error.value.code() == INVALID and error.value.details().startswith("request: not a valid")
    assert events[-1].finished.reason == pb.FINISH_REASON_ERROR
    assert wait_until_idle(server) == 0
    assert no_tracebacks(caplog) == []


def test_undecodable_generate_request_is_invalid_argument(server):
    with pytest.raises(grpc.RpcError) as error:
        list(server.raw_generate()(b"\x0a\x03\xff\xff\xff", timeout=10))
    assert error.value.code() == INVALID and error.value.details().startswith("request: not a valid")


def test_empty_first_message_is_invalid_argument_naming_request(server):
    events, error = raw_session(server, [b""])
    assert error.code() == INVALID and error.details().startswith("request: empty message")


def test_stream_closed_before_start_is_failed_precondition(server):
    events, error = raw_session(server, [])
    assert error.code() == PRECONDITION and error.details().startswith("request: ")


# -- requests after stop --------------------------------------------------------------------------------------

def test_requests_after_stop_are_ignored(server):
    too_long = " ".join(["warm lofi beat"] * 400)
    messages = [start_request("warm lofi beat", unpaced=True), pb.SessionRequest(stop=pb.Stop()),
                pb.SessionRequest(set_prompt=pb.SetPrompt(text=too_long)), start_request("again"),
                pb.SessionRequest()]
    result = collect(server.stub().Session(iter(messages), timeout=30))  # raises on a non-OK status
    assert result.of("finished")[0].reason == pb.FINISH_REASON_STOPPED


def test_undecodable_bytes_after_stop_are_ignored(server):
    stop = pb.SessionRequest(stop=pb.Stop()).SerializeToString()
    events, error = raw_session(server, [VALID_START, stop, b"\xff\xff\xff\xff"])
    assert error is None and events[-1].finished.reason == pb.FINISH_REASON_STOPPED


# -- documented ranges, and what ModelInfo tells ---------------------------------------------------------------

def test_model_info_states_every_limit_the_server_enforces(server, model):
    info = server.stub().GetModelInfo(pb.GetModelInfoRequest())
    assert info.max_duration_seconds == 86400
    assert info.stall_timeout_seconds == STALL_SECONDS
    assert info.unpaced_lead_seconds == 60
    assert info.dtype == "float32"


def test_server_picked_seeds_are_exact_in_javascript(server):
    for _ in range(5):
        events = collect(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(duration_frames=1))))
        assert events.of("started")[0].sampling.seed < 2 ** 53


def test_a_duration_of_whole_seconds_is_rounded_up_to_whole_frames(server, model):
    request = pb.GenerateRequest(request=pb.StartSession(duration_seconds=0.101))
    finished = collect(server.stub().Generate(request)).of("finished")[0]
    assert finished.total_frames == 6  # ceil(0.101 s x 50 frames/s)
    assert finished.total_samples == 6 * model.config.audio_encoder.hop_length


def test_append_parts_must_share_their_encoding(server):
    floats = pb.AudioData(pcm=np.zeros(640, "<f4").tobytes(), sample_rate=32000, channels=1,
                          encoding=pb.AUDIO_ENCODING_FLOAT32_LE)
    ints = pb.AudioData(pcm=np.zeros(1280, "<i2").tobytes(), sample_rate=32000, channels=1,
                        encoding=pb.AUDIO_ENCODING_INT16_LE)
    messages = [start_request("x", max_lead_seconds=0.1),
                pb.SessionRequest(append_audio=pb.AppendAudio(audio=floats, partial=True)),
                pb.SessionRequest(append_audio=pb.AppendAudio(audio=ints))]
    queue = RequestQueue()
    for message in messages:
        queue.send(message)
    with pytest.raises(grpc.RpcError) as error:
        collect(server.stub().Session(iter(queue), timeout=30))
    assert error.value.code() == INVALID
    assert error.value.details().startswith("append_audio.audio.encoding: every part of one append")


def test_decoder_lookahead_above_the_exact_value_is_refused(server):
    exact = server.stub().GetModelInfo(pb.GetModelInfoRequest()).exact_decoder_lookahead_frames
    _, error = raw_session(server, [start_request("x", decoder_lookahead_frames=exact + 1).SerializeToString()])
    assert error.code() == INVALID
    assert error.details() == f"start.decoder_lookahead_frames: must be in [0, {exact}] (the exact value), got {exact + 1}"
    events, error = raw_session(server, [start_request("x", decoder_lookahead_frames=exact, unpaced=True,
                                                       duration_frames=2).SerializeToString()])
    assert error is None and events[0].started.decoder_lookahead_frames == exact


def test_a_bad_request_after_the_session_completed_is_ignored(server):
    """A request that arrives once every frame has been generated changes nothing: Finished(COMPLETED), OK."""
    queue = RequestQueue(start_request("x", unpaced=True, duration_frames=3, chunk_frames=1))
    events = []
    for event in server.stub().Session(iter(queue), timeout=30):
        events.append(event)
        if event.WhichOneof("event") == "finished":
            queue.send(pb.SessionRequest(ack=pb.Ack(samples_played=10 ** 12)))  # would be INVALID_ARGUMENT
            queue.close()
    assert events[-1].finished.reason == pb.FINISH_REASON_COMPLETED  # and no RpcError was raised
