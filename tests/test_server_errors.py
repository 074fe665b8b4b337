"""Bad input gets a clear status naming the field, and never disturbs the other sessions. Security options."""

from __future__ import annotations

import math
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from musicgen.v1 import musicgen_pb2 as pb
from musicgen.v1 import musicgen_pb2_grpc as pb_grpc
from musicgen_core import MusicGen
from server.engine import EngineConfig
from server.main import ServerOptions
from server_harness import RequestQueue, ServerThread, collect, start_request

INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, EngineConfig(max_sessions=6)) as running:
        yield running


@pytest.fixture
def bystander(server):
    """A healthy paced session running beside every bad request; it must keep streaming throughout."""
    requests = RequestQueue(start_request("ambient pad", max_lead_seconds=60, chunk_frames=1))
    call = server.stub().Session(iter(requests))
    chunks = []
    reader = threading.Thread(target=lambda: [chunks.append(e) for e in call if e.WhichOneof("event") == "audio"],
                              daemon=True)
    reader.start()
    yield chunks
    before = len(chunks)
    deadline = __import__("time").monotonic() + 10
    while len(chunks) == before and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.02)
    assert len(chunks) > before, "the bystander session stopped streaming"
    requests.send(pb.SessionRequest(stop=pb.Stop()))
    reader.join(30)


def pcm_message(samples: np.ndarray, rate: int = 32000, channels: int = 1) -> pb.AudioData:
    return pb.AudioData(pcm=samples.astype("<f4").tobytes(), sample_rate=rate, channels=channels,
                        encoding=pb.AUDIO_ENCODING_FLOAT32_LE)


def call_status(server, requests: list[pb.SessionRequest]) -> grpc.RpcError:
    queue = RequestQueue()
    for request in requests:
        queue.send(request)
    with pytest.raises(grpc.RpcError) as error:
        for _ in server.stub().Session(iter(queue), timeout=30):
            pass
    queue.close()
    return error.value


GOOD_START = start_request("warm lofi beat", unpaced=True)
TOO_LONG = " ".join(["warm lofi beat"] * 400)

START_CASES = [
    ("temperature", pb.StartSession(sampling=pb.Sampling(temperature=0.0)), "start.sampling.temperature"),
    ("top_p", pb.StartSession(sampling=pb.Sampling(top_p=1.5)), "start.sampling.top_p"),
    ("guidance", pb.StartSession(sampling=pb.Sampling(guidance_scale=math.nan)), "start.sampling.guidance_scale"),
    ("chunk", pb.StartSession(chunk_frames=100000), "start.chunk_frames"),
    ("duration", pb.StartSession(duration_seconds=-1.0), "start.duration_seconds"),
    ("output_rate", pb.StartSession(output=pb.AudioFormat(sample_rate=22050)), "start.output.sample_rate"),
    ("output_channels", pb.StartSession(output=pb.AudioFormat(channels=3)), "start.output.channels"),
    ("lead", pb.StartSession(max_lead_seconds=1e9), "start.max_lead_seconds"),
    ("text_over_limit", pb.StartSession(prompt=TOO_LONG), "start.prompt"),
    ("weight_negative", pb.StartSession(prompts=[pb.WeightedPrompt(text="a", weight=1.0),
                                                 pb.WeightedPrompt(text="b", weight=-0.5)]), "start.prompts[1].weight"),
    ("weight_nan", pb.StartSession(prompts=[pb.WeightedPrompt(text="a", weight=math.nan)]), "start.prompts[0].weight"),
    ("weight_inf", pb.StartSession(prompts=[pb.WeightedPrompt(text="a", weight=math.inf)]), "start.prompts[0].weight"),
    ("weights_all_zero", pb.StartSession(prompts=[pb.WeightedPrompt(text="a"), pb.WeightedPrompt(text="b")]),
     "start.prompts"),
    ("too_many_prompts", pb.StartSession(prompts=[pb.WeightedPrompt(text=f"p{i}", weight=1.0) for i in range(5)]),
     "start.prompts"),
    ("prompt_and_prompts", pb.StartSession(prompt="a", prompts=[pb.WeightedPrompt(text="b", weight=1.0)]),
     "start.prompts"),
    ("tempo_bpm_zero", pb.StartSession(tempo=pb.Tempo(bpm=0.0, beats_per_bar=4)), "start.tempo.bpm"),
    ("tempo_bpm_nan", pb.StartSession(tempo=pb.Tempo(bpm=math.nan, beats_per_bar=4)), "start.tempo.bpm"),
    ("tempo_no_beats", pb.StartSession(tempo=pb.Tempo(bpm=120.0)), "start.tempo.beats_per_bar"),
    ("resume_partial_frame", pb.StartSession(resume=pb.ResumeFrom(codes=[1] * 5, at_sample=640 * 4)),
     "start.resume.codes"),
    ("resume_code_out_of_range", pb.StartSession(resume=pb.ResumeFrom(codes=[5000] * 4, at_sample=640)),
     "start.resume.codes"),
    ("resume_longer_than_the_window", pb.StartSession(context_frames=10, resume=pb.ResumeFrom(
        codes=[1] * 4 * 11, at_sample=640 * 11)), "start.resume.codes"),
    ("resume_between_frames", pb.StartSession(resume=pb.ResumeFrom(codes=[1] * 4, at_sample=1000)),
     "start.resume.at_sample"),
    ("resume_before_its_frames", pb.StartSession(resume=pb.ResumeFrom(codes=[1] * 8, at_sample=640)),
     "start.resume.at_sample"),
    ("resume_and_audio_prompt", pb.StartSession(audio_prompt=pcm_message(np.zeros(640)),
                                                resume=pb.ResumeFrom(codes=[1] * 4, at_sample=640)),
     "start.resume"),
    ("weighted_text_over_limit", pb.StartSession(prompts=[pb.WeightedPrompt(text=TOO_LONG, weight=1.0)]),
     "start.prompts[0].text"),
    ("context", pb.StartSession(context_frames=100000), "start.context_frames"),
    ("reprime_keep", pb.StartSession(context_frames=10, reprime_keep_frames=10), "start.reprime_keep_frames"),
    ("top_k_wrapped_minus_one", pb.StartSession(sampling=pb.Sampling(top_k=4294967295)), "start.sampling.top_k"),
    ("top_k_above_codebook", pb.StartSession(sampling=pb.Sampling(top_k=100000)), "start.sampling.top_k"),
    ("seed_at_2_63", pb.StartSession(sampling=pb.Sampling(seed=2 ** 63)), "start.sampling.seed"),
    ("lookahead_above_exact", pb.StartSession(decoder_lookahead_frames=17), "start.decoder_lookahead_frames"),
    ("duration_frames_over_a_day", pb.StartSession(duration_frames=10 ** 12), "start.duration_frames"),
    ("duration_seconds_over_a_day", pb.StartSession(duration_seconds=86400.5), "start.duration_seconds"),
    ("output_encoding", pb.StartSession(output=pb.AudioFormat(encoding=7)), "start.output.encoding"),
    ("client_name", pb.StartSession(client_name="x" * 129), "start.client_name"),
    ("odd_pcm", pb.StartSession(audio_prompt=pb.AudioData(pcm=b"\x00" * 7, sample_rate=32000, channels=1,
                                                          encoding=pb.AUDIO_ENCODING_FLOAT32_LE)),
     "start.audio_prompt.pcm"),
    ("nan_pcm", pb.StartSession(audio_prompt=pcm_message(np.array([0.1, np.nan, 0.2]))), "start.audio_prompt.pcm"),
    ("inf_pcm", pb.StartSession(audio_prompt=pcm_message(np.array([0.1, np.inf]))), "start.audio_prompt.pcm"),
    ("input_rate", pb.StartSession(audio_prompt=pcm_message(np.zeros(100), rate=1000)),
     "start.audio_prompt.sample_rate"),
    ("input_channels", pb.StartSession(audio_prompt=pcm_message(np.zeros(100), channels=3)),
     "start.audio_prompt.channels"),
    ("no_encoding", pb.StartSession(audio_prompt=pb.AudioData(pcm=b"\x00" * 8, sample_rate=32000, channels=1)),
     "start.audio_prompt.encoding"),
]


def field_path_exists(path: str, root) -> bool:
    """Does `path` ("start.sampling.top_k") name a field (or, last, a oneof) of the message `root`?"""
    descriptor = root.DESCRIPTOR
    for index, name in enumerate(path.split(".")):
        last = index == len(path.split(".")) - 1
        name = name.split("[")[0]  # prompts[1] names an entry of a repeated field
        if last and name in descriptor.oneofs_by_name:
            return True
        field = descriptor.fields_by_name.get(name)
        if field is None:
            return False
        if not last:
            if field.message_type is None:
                return False
            descriptor = field.message_type
    return True


def assert_names_its_field(details: str, expected: str, root=pb.SessionRequest) -> None:
    """One rule for every status message: '<path from the request root>: <reason>'."""
    path, _, reason = details.partition(": ")
    assert path == expected and reason, details
    assert field_path_exists(path, root), f"{path} is not a field path of {root.DESCRIPTOR.full_name}"


@pytest.mark.parametrize("start,field", [(c[1], c[2]) for c in START_CASES], ids=[c[0] for c in START_CASES])
def test_bad_start_is_invalid_argument_naming_the_field(server, bystander, start, field):
    error = call_status(server, [pb.SessionRequest(start=start)])
    assert error.code() == INVALID
    assert_names_its_field(error.details(), field)


STEER_CASES = [
    ("odd_pcm", pb.SessionRequest(append_audio=pb.AppendAudio(audio=pb.AudioData(
        pcm=b"\x00" * 5, sample_rate=32000, channels=1, encoding=pb.AUDIO_ENCODING_INT16_LE))),
     INVALID, "append_audio.audio.pcm"),
    ("nan_pcm", pb.SessionRequest(append_audio=pb.AppendAudio(audio=pcm_message(np.array([np.nan] * 4)))),
     INVALID, "append_audio.audio.pcm"),
    ("wrong_rate", pb.SessionRequest(append_audio=pb.AppendAudio(audio=pcm_message(np.zeros(10), rate=300000))),
     INVALID, "append_audio.audio.sample_rate"),
    ("too_long_audio", pb.SessionRequest(append_audio=pb.AppendAudio(audio=pcm_message(np.zeros(32000 * 31)))),
     INVALID, "append_audio.audio.pcm"),
    ("text_over_limit", pb.SessionRequest(set_prompt=pb.SetPrompt(text=TOO_LONG)), INVALID, "set_prompt.text"),
    ("weight_nan", pb.SessionRequest(set_prompt=pb.SetPrompt(prompts=[pb.WeightedPrompt(text="a", weight=1.0),
                                                                      pb.WeightedPrompt(text="b", weight=math.nan)])),
     INVALID, "set_prompt.prompts[1].weight"),
    ("weights_all_zero", pb.SessionRequest(set_prompt=pb.SetPrompt(prompts=[pb.WeightedPrompt(text="a")])),
     INVALID, "set_prompt.prompts"),
    ("too_many_prompts", pb.SessionRequest(set_prompt=pb.SetPrompt(
        prompts=[pb.WeightedPrompt(text=f"p{i}", weight=1.0) for i in range(5)])), INVALID, "set_prompt.prompts"),
    ("text_and_prompts", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", prompts=[pb.WeightedPrompt(
        text="b", weight=1.0)])), INVALID, "set_prompt.prompts"),
    ("bar_without_tempo", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", at=pb.At(bar=4))), INVALID,
     "set_prompt.at.bar"),
    ("next_beat_without_tempo", pb.SessionRequest(pause=pb.Pause(at=pb.At(next_beat=True))), INVALID,
     "pause.at.next_beat"),
    ("set_tempo_zero", pb.SessionRequest(set_tempo=pb.Tempo(bpm=0.0, beats_per_bar=4)), INVALID, "set_tempo.bpm"),
    ("rollback_alone", pb.SessionRequest(set_prompt=pb.SetPrompt(rollback=pb.Rollback(margin_seconds=0.2))),
     INVALID, "set_prompt.rollback"),
    ("rollback_margin_nan", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", rollback=pb.Rollback(
        margin_seconds=math.nan))), INVALID, "set_prompt.rollback.margin_seconds"),
    ("rollback_margin_negative", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", rollback=pb.Rollback(
        margin_seconds=-0.1))), INVALID, "set_prompt.rollback.margin_seconds"),
    ("transition_in_beats_without_tempo", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", transition=pb.Transition(
        beats=4.0))), INVALID, "set_prompt.transition.beats"),
    ("transition_alone", pb.SessionRequest(set_prompt=pb.SetPrompt(transition=pb.Transition(seconds=2.0))),
     INVALID, "set_prompt.transition"),
    ("transition_nan", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", transition=pb.Transition(
        seconds=math.nan))), INVALID, "set_prompt.transition.seconds"),
    ("transition_negative", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", transition=pb.Transition(
        seconds=-1.0))), INVALID, "set_prompt.transition.seconds"),
    ("transition_too_long", pb.SessionRequest(set_prompt=pb.SetPrompt(text="a", transition=pb.Transition(
        frames=10 ** 6))), INVALID, "set_prompt.transition.frames"),
    ("bad_sampling", pb.SessionRequest(set_prompt=pb.SetPrompt(sampling=pb.Sampling(top_k=0, top_p=0.0))),
     INVALID, "set_prompt.sampling.top_p"),
    ("guidance_switch", pb.SessionRequest(set_prompt=pb.SetPrompt(sampling=pb.Sampling(guidance_scale=1.0))),
     INVALID, "set_prompt.sampling.guidance_scale"),
    ("second_start", GOOD_START, PRECONDITION, "start"),
    ("empty_message", pb.SessionRequest(), INVALID, "request"),
    ("mixed_rates", [pb.SessionRequest(append_audio=pb.AppendAudio(audio=pcm_message(np.zeros(64)), partial=True)),
                     pb.SessionRequest(append_audio=pb.AppendAudio(audio=pcm_message(np.zeros(64), rate=16000)))],
     INVALID, "append_audio.audio.sample_rate"),
    ("no_audio", pb.SessionRequest(append_audio=pb.AppendAudio()), INVALID, "append_audio.audio"),
    ("top_k_wrapped", pb.SessionRequest(set_prompt=pb.SetPrompt(sampling=pb.Sampling(top_k=4294967295))),
     INVALID, "set_prompt.sampling.top_k"),
]


@pytest.mark.parametrize("request_,code,text", [(c[1], c[2], c[3]) for c in STEER_CASES],
                         ids=[c[0] for c in STEER_CASES])
def test_bad_message_mid_session_ends_it_with_its_status(server, bystander, request_, code, text):
    requests = request_ if isinstance(request_, list) else [request_]
    error = call_status(server, [start_request("warm lofi beat", max_lead_seconds=0.1), *requests])
    assert error.code() == code
    assert_names_its_field(error.details(), text)


def test_a_change_scheduled_at_a_frame_already_generated_is_failed_precondition(server, bystander):
    queue = RequestQueue(start_request("warm lofi beat", unpaced=True, chunk_frames=10))
    with pytest.raises(grpc.RpcError) as error:
        for event in server.stub().Session(iter(queue), timeout=30):
            if event.WhichOneof("event") == "audio":  # frames 0-9 are out: frame 2 is long past
                queue.send(pb.SessionRequest(set_prompt=pb.SetPrompt(text="dark techno", at=pb.At(frame=2))))
    assert error.value.code() == PRECONDITION
    assert_names_its_field(error.value.details(), "set_prompt.at.frame")
    assert "frame 2 (sample 1280) is already generated" in error.value.details()


def test_bad_message_mid_session_first_sends_finished_with_totals(server):
    queue = RequestQueue(start_request("warm lofi beat", max_lead_seconds=0.1))
    events = []
    with pytest.raises(grpc.RpcError):
        for event in server.stub().Session(iter(queue), timeout=30):
            events.append(event)
            if event.WhichOneof("event") == "started":
                queue.send(pb.SessionRequest(set_prompt=pb.SetPrompt(text=TOO_LONG)))
    assert events[-1].WhichOneof("event") == "finished"
    assert events[-1].finished.reason == pb.FINISH_REASON_ERROR


def test_first_message_must_be_start(server, bystander):
    error = call_status(server, [pb.SessionRequest(ack=pb.Ack(samples_played=0))])
    assert error.code() == PRECONDITION and "first message must be start" in error.details()
    assert_names_its_field(error.details(), "ack")  # the member sent


def test_generate_without_duration_is_invalid(server):
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(prompt="x"))))
    assert error.value.code() == INVALID
    assert_names_its_field(error.value.details(), "request.duration", root=pb.GenerateRequest)


def test_generate_names_start_fields_under_request(server):
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(duration_frames=5,
                                                                               context_frames=100000))))
    assert_names_its_field(error.value.details(), "request.context_frames", root=pb.GenerateRequest)


def test_oversized_message_is_refused_by_grpc(server, bystander):
    huge = np.zeros(32000 * 40, dtype="<f4")  # 5 MB > the 4 MiB default limit
    error = call_status(server, [pb.SessionRequest(start=pb.StartSession(audio_prompt=pcm_message(huge)))])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_sessions_past_max_sessions_get_resource_exhausted(model):
    with ServerThread(model, EngineConfig(max_sessions=2)) as small:
        queues = [RequestQueue(start_request("a", max_lead_seconds=0.1)) for _ in range(2)]
        calls = [small.stub().Session(iter(q)) for q in queues]
        for call in calls:
            next(iter(call))  # Started: both admitted
        error = call_status(small, [start_request("b")])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 2 sessions" in error.details()
        calls[0].cancel()
        deadline = __import__("time").monotonic() + 10
        while small.engine.active_sessions > 1 and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.02)
        third = small.stub().Session(iter(RequestQueue(start_request("c", max_lead_seconds=0.1))))
        assert next(iter(third)).WhichOneof("event") == "started"
        third.cancel()
        calls[1].cancel()


def test_bearer_token_is_checked_on_every_call(model):
    with ServerThread(model, options=ServerOptions(port=0, token="s3cret")) as secured:
        stub = secured.stub()
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelInfo(pb.GetModelInfoRequest())
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(pb.GenerateRequest(request=pb.StartSession(duration_frames=2)),
                               metadata=[("authorization", "Bearer wrong")]))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[("authorization", "Bearer s3cret")])
        assert info.sample_rate == 32000


def test_tls_serves_with_a_certificate(model, tmp_path: Path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    with ServerThread(model, options=ServerOptions(host="localhost", port=0, tls_cert=cert, tls_key=key)) as tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = grpc.secure_channel(f"localhost:{tls.running.port}", credentials)
        info = pb_grpc.MusicGenStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.sample_rate == 32000
        with pytest.raises(grpc.RpcError):
            pb_grpc.MusicGenStub(grpc.insecure_channel(f"localhost:{tls.running.port}")).GetModelInfo(
                pb.GetModelInfoRequest(), timeout=5)


def test_health_and_reflection_answer(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "musicgen.v1.MusicGen"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"musicgen.v1.MusicGen", "grpc.health.v1.Health"} <= names


def test_unpaced_session_stops_cleanly_on_half_close(server):
    """Closing the request stream is Stop: the call ends with Finished(STOPPED) and the audio tail."""
    queue = RequestQueue(start_request("warm lofi beat", unpaced=True))
    call = server.stub().Session(iter(queue))
    for event in call:
        if event.WhichOneof("event") == "audio":
            queue.close()
            break
    rest = collect(call)
    assert rest.of("finished")[0].reason == pb.FINISH_REASON_STOPPED


@pytest.mark.parametrize("played,text", [(10 ** 9, "exceeds"), (-1, "decreased")], ids=["beyond_sent", "decreasing"])
def test_ack_must_not_exceed_what_was_sent_or_decrease(server, played, text):
    queue = RequestQueue(start_request("warm lofi beat", max_lead_seconds=0.1, chunk_frames=1))
    with pytest.raises(grpc.RpcError) as error:
        for event in server.stub().Session(iter(queue), timeout=30):
            if event.WhichOneof("event") == "audio":
                end = event.audio.start_sample + event.audio.sample_count
                queue.send(pb.SessionRequest(ack=pb.Ack(samples_played=end)))
                queue.send(pb.SessionRequest(ack=pb.Ack(samples_played=end - 1 if played < 0 else played)))
    assert error.value.code() == INVALID and text in error.value.details()
    assert_names_its_field(error.value.details(), "ack.samples_played")
