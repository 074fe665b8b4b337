"""The musicgen.v1 wire protocol: stubs import, messages round-trip, the .proto stays documented, named in
buf style, wire-stable, and in step with protos/README.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from musicgen.v1 import musicgen_pb2 as pb
from musicgen.v1 import musicgen_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "protos" / "musicgen" / "v1" / "musicgen.proto"
PROTOCOL_DOC = REPO / "protos" / "README.md"

CAMEL = re.compile(r"^[A-Z][a-zA-Z0-9]*$")
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


def all_messages(containers=None):
    """Every message descriptor of the file, nested ones included."""
    for message in containers if containers is not None else pb.DESCRIPTOR.message_types_by_name.values():
        yield message
        yield from all_messages(message.nested_types)


def all_enums():
    yield from pb.DESCRIPTOR.enum_types_by_name.values()
    for message in all_messages():
        yield from message.enum_types


def real_oneofs(message):
    """Declared oneofs, without the synthetic `_name` oneof that each proto3 `optional` field gets."""
    return [o for o in message.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]


def test_stubs_import_with_the_three_rpcs():
    service = pb.DESCRIPTOR.services_by_name["MusicGen"]
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert shapes == {"Session": (True, True), "Generate": (False, True), "GetModelInfo": (False, False)}
    assert pb.DESCRIPTOR.package == "musicgen.v1"
    for name in ("MusicGenStub", "MusicGenServicer", "add_MusicGenServicer_to_server"):
        assert hasattr(pb_grpc, name), name


def _sample_audio() -> pb.AudioData:
    return pb.AudioData(pcm=b"\x00\x01" * 8, sample_rate=48000, channels=2,
                        encoding=pb.AUDIO_ENCODING_INT16_LE)


SESSION_REQUESTS = {
    "start": pb.SessionRequest(start=pb.StartSession(
        prompt="warm lofi beat", sampling=pb.Sampling(guidance_scale=3.0, top_k=250, seed=7),
        audio_prompt=_sample_audio(), duration_seconds=8.0, chunk_frames=5,
        output=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_FLOAT32_LE, sample_rate=48000),
        decoder_lookahead_frames=0, max_lead_seconds=1.5, client_name="test", return_codes=True)),
    "set_prompt": pb.SessionRequest(set_prompt=pb.SetPrompt(text="", sampling=pb.Sampling(temperature=0.8))),
    "set_prompt_weighted_at_a_bar": pb.SessionRequest(set_prompt=pb.SetPrompt(
        prompts=[pb.WeightedPrompt(text="a", weight=0.25), pb.WeightedPrompt(text="b", weight=0.75)],
        transition=pb.Transition(seconds=4.0), at=pb.At(bar=8))),
    "append_audio": pb.SessionRequest(append_audio=pb.AppendAudio(audio=_sample_audio(), partial=True)),
    "ack": pb.SessionRequest(ack=pb.Ack(samples_played=123_456_789_012)),
    "pause": pb.SessionRequest(pause=pb.Pause()),
    "resume": pb.SessionRequest(resume=pb.Resume()),
    "stop": pb.SessionRequest(stop=pb.Stop(at=pb.At(sample=96_000))),
    "set_tempo": pb.SessionRequest(set_tempo=pb.Tempo(bpm=122.5, beats_per_bar=3, beat_one_sample=1234)),
}


def test_every_session_request_member_is_covered():
    members = {f.name for f in pb.SessionRequest.DESCRIPTOR.oneofs_by_name["request"].fields}
    assert members == {request.WhichOneof("request") for request in SESSION_REQUESTS.values()}


@pytest.mark.parametrize("member", sorted(SESSION_REQUESTS))
def test_session_request_round_trips_through_bytes(member):
    request = SESSION_REQUESTS[member]
    decoded = pb.SessionRequest.FromString(request.SerializeToString())
    assert decoded.WhichOneof("request") == request.WhichOneof("request")
    assert decoded == request


SESSION_EVENTS = {
    "started": pb.SessionEvent(started=pb.Started(
        session_id="s-1", output=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_INT16_LE, sample_rate=32000, channels=1),
        frame_rate=50.0, samples_per_frame=640.0, latency_samples=2560,
        latency=pb.Latency(codebook_delay_samples=1920, decoder_lookahead_samples=2560, chunk_samples=3200),
        context_frames=1500, reprime_keep_frames=1000, duration_frames=0)),
    "audio": pb.SessionEvent(audio=pb.AudioChunk(
        sequence=3, start_sample=9600, sample_count=3, first_frame=15, frame_count=5, pcm=b"\x00\x00" * 3,
        prompt="x", prompt_revision=1, codes=[0, 2047, 5, 6])),
    "notice": pb.SessionEvent(notice=pb.Notice(kind=pb.NOTICE_KIND_PROMPT_APPLIED, frame=40, sample=25600,
                                               prompt_revision=1)),
    "finished": pb.SessionEvent(finished=pb.Finished(reason=pb.FINISH_REASON_COMPLETED, total_frames=400,
                                                     total_samples=256000,
                                                     stats=pb.SessionStats(steps=403, mean_step_ms=12.5))),
    "retracted": pb.SessionEvent(retracted=pb.Retracted(frame=75, sample=48000)),
}


@pytest.mark.parametrize("member", sorted(SESSION_EVENTS))
def test_session_event_round_trips_through_bytes(member):
    assert {f.name for f in pb.SessionEvent.DESCRIPTOR.oneofs_by_name["event"].fields} == set(SESSION_EVENTS)
    event = SESSION_EVENTS[member]
    decoded = pb.SessionEvent.FromString(event.SerializeToString())
    assert decoded.WhichOneof("event") == member
    assert decoded == event


def test_optional_fields_tell_unset_from_zero():
    unset = pb.Sampling.FromString(pb.Sampling().SerializeToString())
    zero = pb.Sampling.FromString(pb.Sampling(guidance_scale=0.0, top_k=0, greedy=False, seed=0).SerializeToString())
    for name in ("guidance_scale", "top_k", "greedy", "seed"):
        assert not unset.HasField(name) and zero.HasField(name), name
    start = pb.StartSession.FromString(pb.StartSession(decoder_lookahead_frames=0).SerializeToString())
    assert start.HasField("decoder_lookahead_frames")
    assert not pb.StartSession().HasField("decoder_lookahead_frames")
    assert pb.StartSession(duration_frames=0).WhichOneof("duration") == "duration_frames"
    assert pb.StartSession().WhichOneof("duration") is None


def test_generate_request_reuses_start_session():
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["request"].message_type is pb.StartSession.DESCRIPTOR


# --- the .proto text: every declaration documented -----------------------------------------------------

DECLARATION = re.compile(
    r"^\s*(?:"
    r"(?:message|enum|service|oneof)\s+\w+\s*\{"  # blocks
    r"|rpc\s+\w+\s*\("  # methods
    r"|(?:optional\s+|repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+\s*;"  # fields
    r"|[A-Z][A-Z0-9_]*\s*=\s*-?\d+\s*;"  # enum values
    r")")


def declarations_without_comment(text: str) -> list[str]:
    """Declaration lines whose previous non-blank line is not a `//` comment."""
    missing, previous = [], ""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if DECLARATION.match(line) and not previous.startswith("//"):
            missing.append(f"{number}: {line.strip()}")
        previous = line.strip()
    return missing


def test_declaration_parser_sees_every_element():
    """Guard the comment check itself: it must recognise as many declarations as the descriptors hold."""
    text = PROTO.read_text()
    declared = sum(bool(DECLARATION.match(line)) for line in text.splitlines())
    messages = list(all_messages())
    expected = (len(messages) + sum(len(m.fields) + len(real_oneofs(m)) for m in messages)
                + sum(1 + len(e.values) for e in all_enums())
                + sum(1 + len(s.methods) for s in pb.DESCRIPTOR.services_by_name.values()))
    assert declared == expected
    assert declarations_without_comment("message A {\n  int32 b = 1;\n}\n") == ["1: message A {", "2: int32 b = 1;"]


def test_every_message_rpc_field_and_enum_value_has_a_comment():
    assert declarations_without_comment(PROTO.read_text()) == []


# --- buf-style naming -------------------------------------------------------------------------------------

def test_names_follow_buf_style():
    bad = []
    for message in all_messages():
        bad += [message.full_name] if not CAMEL.match(message.name) else []
        bad += [f"{message.name}.{f.name}" for f in message.fields if not SNAKE.match(f.name)]
        bad += [f"{message.name}.{o.name}" for o in real_oneofs(message) if not SNAKE.match(o.name)]
    for enum in all_enums():
        bad += [enum.full_name] if not CAMEL.match(enum.name) else []
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        bad += [v.name for v in enum.values if not (UPPER_SNAKE.match(v.name) and v.name.startswith(prefix))]
        bad += [] if enum.values_by_number[0].name == prefix + "UNSPECIFIED" else [f"{enum.name} zero value"]
    for service in pb.DESCRIPTOR.services_by_name.values():
        bad += [service.name] if not CAMEL.match(service.name) else []
        bad += [m.name for m in service.methods if not CAMEL.match(m.name)]
    assert bad == []


# --- wire stability: numbers already published never change (new fields may be added) ----------------------

PUBLISHED_NUMBERS = {
    "AudioData": {"pcm": 1, "sample_rate": 2, "channels": 3, "encoding": 4},
    "AudioFormat": {"encoding": 1, "sample_rate": 2, "channels": 3},
    "Sampling": {"guidance_scale": 1, "temperature": 2, "top_k": 3, "top_p": 4, "greedy": 5, "seed": 6},
    "SessionRequest": {"start": 1, "set_prompt": 2, "append_audio": 3, "ack": 4, "pause": 5, "resume": 6,
                       "stop": 7, "set_tempo": 8},
    "Tempo": {"bpm": 1, "beats_per_bar": 2, "beat_one_sample": 3},
    "At": {"sample": 1, "frame": 2, "bar": 3, "beat": 4, "next_bar": 5, "next_beat": 6},
    "Pause": {"at": 1},
    "Stop": {"at": 1},
    "StartSession": {"prompt": 1, "sampling": 2, "audio_prompt": 3, "duration_seconds": 4, "duration_frames": 5,
                     "unbounded": 6, "chunk_frames": 7, "output": 8, "decoder_lookahead_frames": 9,
                     "max_lead_seconds": 10, "unpaced": 11, "client_name": 12, "start_paused": 13,
                     "context_frames": 14, "reprime_keep_frames": 15, "return_codes": 16, "prompts": 17,
                     "tempo": 18, "resume": 19},
    "ResumeFrom": {"codes": 1, "at_sample": 2},
    "WeightedPrompt": {"text": 1, "weight": 2},
    "SetPrompt": {"text": 1, "sampling": 2, "prompts": 3, "transition": 4, "at": 5, "rollback": 6},
    "Transition": {"seconds": 1, "frames": 2, "beats": 3},
    "AppendAudio": {"audio": 1, "partial": 2, "replace_context": 3, "at": 4},
    "Ack": {"samples_played": 1},
    "GenerateRequest": {"request": 1},
    "SessionEvent": {"started": 1, "audio": 2, "notice": 3, "finished": 4, "retracted": 5},
    "Retracted": {"frame": 1, "sample": 2},
    "Rollback": {"margin_seconds": 1},
    "Started": {"session_id": 1, "output": 2, "frame_rate": 3, "samples_per_frame": 4, "latency_samples": 5,
                "latency": 6, "context_frames": 7, "reprime_keep_frames": 8, "sampling": 9, "chunk_frames": 10,
                "decoder_lookahead_frames": 11, "exact_decoding": 12, "max_lead_seconds": 13, "unpaced": 14,
                "duration_frames": 15, "audio_prompt_frames": 16, "prompt": 17, "paused": 18, "prompts": 19,
                "first_sample": 20},
    "Latency": {"codebook_delay_samples": 1, "decoder_lookahead_samples": 2, "resampler_samples": 3,
                "chunk_samples": 4},
    "AudioChunk": {"sequence": 1, "start_sample": 2, "sample_count": 3, "first_frame": 4, "frame_count": 5,
                   "pcm": 6, "prompt": 7, "prompt_revision": 8, "sampling": 9, "codes": 10, "prompts": 12},
    "Notice": {"kind": 1, "frame": 2, "sample": 3, "prompt_revision": 4, "message": 5},
    "Finished": {"reason": 1, "total_frames": 2, "total_samples": 3, "message": 4, "stats": 5},
    "SessionStats": {"steps": 1, "mean_step_ms": 2, "max_step_ms": 3, "mean_batch_sessions": 4,
                     "mean_decode_ms_per_frame": 5, "wall_seconds": 6, "waiting_seconds": 7, "realtime_factor": 8,
                     "reprimes": 9},
    "ModelInfo": {"model_name": 1, "sample_rate": 2, "channels": 3, "frame_rate": 4, "num_codebooks": 5,
                  "codebook_size": 6, "samples_per_frame": 7, "max_context_frames": 8,
                  "default_reprime_keep_frames": 9, "exact_decoder_lookahead_frames": 10, "max_sessions": 20,
                  "active_sessions": 21, "supported_output_sample_rates": 22, "max_text_tokens": 23,
                  "max_message_bytes": 24, "max_audio_prompt_seconds": 25, "default_chunk_frames": 26,
                  "max_chunk_frames": 27, "default_max_lead_seconds": 28, "max_lead_seconds": 29,
                  "max_prompts": 34, "default_sampling": 40, "server_version": 50, "device": 51, "dtype": 52},
}
PUBLISHED_ENUMS = {
    "AudioEncoding": {"AUDIO_ENCODING_FLOAT32_LE": 1, "AUDIO_ENCODING_INT16_LE": 2},
    "NoticeKind": {"NOTICE_KIND_PROMPT_APPLIED": 1, "NOTICE_KIND_CONTEXT_REPRIMED": 2,
                   "NOTICE_KIND_AUDIO_APPENDED": 3, "NOTICE_KIND_PAUSED": 4, "NOTICE_KIND_RESUMED": 5,
                   "NOTICE_KIND_SERVER_DRAINING": 6, "NOTICE_KIND_TRANSITION_ENDED": 7},
    "FinishReason": {"FINISH_REASON_COMPLETED": 1, "FINISH_REASON_STOPPED": 2,
                     "FINISH_REASON_SERVER_SHUTDOWN": 3, "FINISH_REASON_ERROR": 4},
}


def test_published_field_numbers_are_unchanged():
    messages = pb.DESCRIPTOR.message_types_by_name
    current = {name: {f: messages[name].fields_by_name[f].number if f in messages[name].fields_by_name else None
                      for f in fields} for name, fields in PUBLISHED_NUMBERS.items()}
    assert current == PUBLISHED_NUMBERS
    enums = pb.DESCRIPTOR.enum_types_by_name
    assert {name: {v: enums[name].values_by_name[v].number for v in values}
            for name, values in PUBLISHED_ENUMS.items()} == PUBLISHED_ENUMS


def test_protocol_document_names_every_message_and_rpc():
    doc = PROTOCOL_DOC.read_text()
    names = [m.name for m in all_messages()] + [e.name for e in all_enums()]
    names += [m.name for m in pb.DESCRIPTOR.services_by_name["MusicGen"].methods]
    assert [name for name in names if not re.search(rf"\b{name}\b", doc)] == []
