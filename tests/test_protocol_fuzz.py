"""Fuzzing the Session stream of a real server on loopback: random bytes, mutated valid messages and random field
values. Every case must end with a documented status (never UNKNOWN or INTERNAL), leave no traceback in the log
and no session behind, while a bystander session streams throughout. Bounded: a fixed number of examples."""

from __future__ import annotations

import logging
import math
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import MusicGen
from server.engine import EngineConfig
from server_harness import RequestQueue, ServerThread, start_request

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Problems(logging.Handler):
    """Collects every log record with a traceback or at ERROR and above, from every thread."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture(scope="module")
def server(mono_checkpoint):
    model = MusicGen.from_pretrained(mono_checkpoint)
    with ServerThread(model, EngineConfig(max_sessions=4)) as running:
        yield running


@pytest.fixture(scope="module")
def problems():
    handler = Problems()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def bystander(server):
    """A paced session that acks what it receives, streaming beside every fuzz case."""
    queue = RequestQueue(start_request("ambient pad", max_lead_seconds=0.5, chunk_frames=2))
    call = server.stub().Session(iter(queue))
    chunks: list[int] = []

    def play() -> None:
        for event in call:
            if event.WhichOneof("event") == "audio":
                chunks.append(event.audio.sequence)
                queue.send(pb.SessionRequest(ack=pb.Ack(samples_played=event.audio.start_sample +
                                                        event.audio.sample_count)))

    reader = threading.Thread(target=play, daemon=True)
    reader.start()
    yield chunks
    queue.send(pb.SessionRequest(stop=pb.Stop()))
    queue.close()
    reader.join(30)


def run_case(server, problems, bystander, messages: list[bytes]) -> None:
    before = len(bystander)
    code = grpc.StatusCode.OK
    try:
        for _ in server.raw_session()(iter(messages), timeout=20):
            pass
    except grpc.RpcError as error:
        code = error.code()
        assert code in DOCUMENTED, f"{code.name}: {error.details()}"
        if code is not grpc.StatusCode.OK:
            assert ": " in error.details(), error.details()  # '<field path>: <reason>'
    deadline = time.monotonic() + 10
    while server.engine.active_sessions > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.active_sessions == 1, "a fuzz case left its session behind"
    assert problems.records == [], [r.getMessage() for r in problems.records]
    deadline = time.monotonic() + 10
    while len(bystander) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(bystander) > before, "the bystander stopped streaming"


VALID = [
    start_request("warm lofi beat", unpaced=True),
    start_request("x", max_lead_seconds=0.2, chunk_frames=1, sampling=pb.Sampling(top_k=5, seed=7)),
    pb.SessionRequest(set_prompt=pb.SetPrompt(text="new", sampling=pb.Sampling(temperature=0.5))),
    pb.SessionRequest(ack=pb.Ack(samples_played=0)),
    pb.SessionRequest(append_audio=pb.AppendAudio(audio=pb.AudioData(pcm=b"\x00\x00" * 640, sample_rate=32000,
                                                                     channels=1, encoding=2))),
    pb.SessionRequest(pause=pb.Pause()), pb.SessionRequest(resume=pb.Resume()),
]
VALID_BYTES = [message.SerializeToString() for message in VALID]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        position = draw(st.integers(0, len(data)))
        if action == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[min(position, len(data) - 1)]
    return bytes(data)


EDGE_FLOATS = st.sampled_from([0.0, 1e-9, 0.5, 1.0, 3.0, 100.0, 100.5, -1.0, math.inf, -math.inf, math.nan, 1e300])
EDGE_UINT32 = st.sampled_from([0, 1, 2, 5, 250, 251, 2048, 2049, 4294967295])
EDGE_UINT64 = st.sampled_from([0, 1, 2 ** 53, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1])


@st.composite
def sampling(draw) -> pb.Sampling:
    message = pb.Sampling()
    for name, values in (("guidance_scale", EDGE_FLOATS), ("temperature", EDGE_FLOATS), ("top_p", EDGE_FLOATS),
                         ("top_k", EDGE_UINT32), ("seed", EDGE_UINT64), ("greedy", st.booleans())):
        if draw(st.booleans()):
            setattr(message, name, draw(values))
    return message


@st.composite
def start_message(draw) -> pb.SessionRequest:
    start = pb.StartSession(prompt=draw(st.text(max_size=20)), sampling=draw(sampling()),
                            chunk_frames=draw(EDGE_UINT32), max_lead_seconds=draw(EDGE_FLOATS),
                            unpaced=draw(st.booleans()), start_paused=draw(st.booleans()),
                            context_frames=draw(EDGE_UINT32), reprime_keep_frames=draw(EDGE_UINT32),
                            output=pb.AudioFormat(encoding=draw(st.sampled_from([0, 1, 2, 3, 99])),
                                                  sample_rate=draw(st.sampled_from([0, 32000, 44100, 48000, 1])),
                                                  channels=draw(st.sampled_from([0, 1, 2, 3]))))
    if draw(st.booleans()):
        start.decoder_lookahead_frames = draw(EDGE_UINT32)
    duration = draw(st.sampled_from(["none", "seconds", "frames", "unbounded"]))
    if duration == "seconds":
        start.duration_seconds = draw(EDGE_FLOATS)
    elif duration == "frames":
        start.duration_frames = draw(EDGE_UINT64)
    elif duration == "unbounded":
        start.unbounded = draw(st.booleans())
    return pb.SessionRequest(start=start)


@st.composite
def steering_message(draw) -> pb.SessionRequest:
    kind = draw(st.sampled_from(["set_prompt", "ack", "pause", "resume", "stop", "start", "empty"]))
    if kind == "set_prompt":
        change = pb.SetPrompt(sampling=draw(sampling()))
        if draw(st.booleans()):
            change.text = draw(st.text(max_size=20))
        return pb.SessionRequest(set_prompt=change)
    if kind == "ack":
        return pb.SessionRequest(ack=pb.Ack(samples_played=draw(EDGE_UINT64)))
    if kind == "start":
        return start_request("again")
    if kind == "empty":
        return pb.SessionRequest()
    return pb.SessionRequest(**{kind: getattr(pb, kind.capitalize())()})


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_the_first_message(server, problems, bystander, data):
    run_case(server, problems, bystander, [data])


@FUZZ
@given(data=mutated())
def test_a_mutated_message_after_a_valid_start(server, problems, bystander, data):
    run_case(server, problems, bystander, [VALID_BYTES[0], data])


@FUZZ
@given(data=mutated())
def test_a_mutated_first_message(server, problems, bystander, data):
    run_case(server, problems, bystander, [data])


@FUZZ
@given(start=start_message(), then=st.lists(steering_message(), max_size=3))
def test_random_field_values(server, problems, bystander, start, then):
    run_case(server, problems, bystander, [start.SerializeToString(), *(m.SerializeToString() for m in then)])
