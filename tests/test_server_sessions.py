"""The live server over real gRPC on loopback: exact audio, batching, steering, endless sessions, pacing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_cli import wav
from musicgen_core import MusicGen
from server.engine import EngineConfig
from server_harness import RequestQueue, ServerThread, collect, start_request

PROMPTS = ["warm lofi beat with piano", "dark techno", "ambient pad with strings", "funky bass groove"]
GREEDY = pb.Sampling(greedy=True, guidance_scale=3.0)


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, EngineConfig(max_sessions=8)) as running:
        yield running


def generate_request(prompt: str, frames: int, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(request=pb.StartSession(prompt=prompt, sampling=GREEDY, duration_frames=frames,
                                                      return_codes=True, **fields))


def unbounded_reference(model: MusicGen, text: str, frames: int, prompt_codes=None,
                        switch: tuple[int, str] | None = None) -> torch.Tensor:
    """Offline, with the core API: greedy unbounded generation (no end padding), optionally switching the
    conditioning before a given step. Returns (codebooks, frames)."""
    params = model.default_sampling(greedy=True, guidance_scale=3.0)
    state = model.start_sequence(model.encode_text([text])[0], params, prompt_codes)
    step = 0
    while state.grid.first_frame_of_next_column() < state.grid.prompt_frames + frames:  # frames to complete
        if switch is not None and step == switch[0]:
            state.cross = model.cross_attention(model.encode_text([switch[1]])[0], True)
        model.step([state])
        step += 1
    return state.grid.frames(state.grid.prompt_frames, state.grid.prompt_frames + frames)


def test_greedy_session_equals_musicgen_generate(server, mono_checkpoint, tmp_path):
    cli = subprocess.run([sys.executable, "-m", "musicgen_cli.generate", "--model", str(mono_checkpoint),
                          "--prompt", PROMPTS[0], "--frames", "40", "--greedy", "--guidance-scale", "3",
                          "--out", str(tmp_path / "ref.wav"), "--codes-out", str(tmp_path / "ref.npy")],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    requests = RequestQueue(start_request(PROMPTS[0], sampling=GREEDY, duration_frames=40, unpaced=True,
                                          return_codes=True, chunk_frames=7))
    got = collect(server.stub().Session(iter(requests)))
    requests.close()
    assert np.array_equal(got.codes, np.load(tmp_path / "ref.npy"))
    reference, _ = wav.read(tmp_path / "ref.wav")
    assert got.pcm.shape == reference.shape
    assert np.abs(got.pcm - reference).max() < 1e-4  # the WAV is 16-bit: steps of 3e-5
    finished = got.of("finished")[0]
    assert finished.reason == pb.FINISH_REASON_COMPLETED and finished.total_frames == 40


def test_a_warmed_up_server_has_run_its_warm_up_before_the_first_call_and_serves_the_same(server, model):
    def run(target):
        requests = RequestQueue(start_request(PROMPTS[0], sampling=GREEDY, duration_frames=12, unpaced=True,
                                              return_codes=True, chunk_frames=4))
        got = collect(target.stub().Session(iter(requests)))
        requests.close()
        return got

    with ServerThread(model, EngineConfig(max_sessions=2), warm_up=True) as warmed:
        assert warmed.engine.steps > 0 and warmed.engine.active_sessions == 0  # before any call
        got = run(warmed)
    expected = run(server)
    assert got.codes.shape == (4, 12)
    assert np.array_equal(got.codes, expected.codes) and np.array_equal(got.pcm, expected.pcm)


def test_chunks_are_frame_aligned_and_contiguous(server):
    got = collect(server.stub().Generate(generate_request(PROMPTS[1], 33, chunk_frames=5)))
    chunks = got.of("audio")
    started = got.of("started")[0]
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert [c.frame_count for c in chunks] == [5] * 6 + [3]
    for before, after in zip(chunks, chunks[1:]):
        assert after.start_sample == before.start_sample + before.sample_count
        assert after.first_frame == before.first_frame + before.frame_count
    for chunk in chunks:
        assert chunk.start_sample == chunk.first_frame * started.samples_per_frame
        assert chunk.sample_count == chunk.frame_count * started.samples_per_frame


def test_four_concurrent_greedy_sessions_equal_each_alone(server, model):
    results: dict[str, np.ndarray] = {}

    def run(prompt: str) -> None:
        results[prompt] = collect(server.stub().Generate(generate_request(prompt, 30))).codes

    threads = [threading.Thread(target=run, args=(prompt,)) for prompt in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert server.engine.steps < 4 * 33  # the sessions really shared steps
    for prompt in PROMPTS:
        alone = model.generate(prompt, frames=30, params=model.default_sampling(greedy=True, guidance_scale=3.0))
        assert np.array_equal(results[prompt], alone.codes[0].numpy()), prompt


def wait_for(events, kind: str, timeout: float = 30.0):
    """Next event of a kind from a live call iterator (other events collected on the way)."""
    seen = []
    deadline = time.monotonic() + timeout
    for event in events:
        seen.append(event)
        if event.WhichOneof("event") == kind:
            return event, seen
        assert time.monotonic() < deadline, f"no {kind} event"
    raise AssertionError(f"stream ended before a {kind} event")


def test_set_prompt_changes_output_from_the_reported_frame_and_not_before(server, model):
    requests = RequestQueue(start_request(PROMPTS[0], sampling=GREEDY, return_codes=True, chunk_frames=1,
                                          max_lead_seconds=0.2))
    call = server.stub().Session(iter(requests))
    _, before = wait_for(call, "audio")
    time.sleep(0.5)  # the session fills its 0.2 s lead and waits for acks
    requests.send(pb.SessionRequest(set_prompt=pb.SetPrompt(text=PROMPTS[1])))
    notice, seen = wait_for(call, "notice")
    applied = notice.notice.frame
    assert notice.notice.kind == pb.NOTICE_KIND_PROMPT_APPLIED
    chunks = [e.audio for e in before + seen if e.WhichOneof("event") == "audio"]
    while sum(c.frame_count for c in chunks) < applied + 12:
        requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=chunks[-1].start_sample + chunks[-1].sample_count)))
        event, _ = wait_for(call, "audio")
        chunks.append(event.audio)
    requests.send(pb.SessionRequest(stop=pb.Stop()))
    tail = collect(call)
    codes = np.array([code for c in chunks for code in c.codes]).reshape(-1, 4).T
    frames = codes.shape[1]
    unchanged = unbounded_reference(model, PROMPTS[0], frames).numpy()
    # the switch happened before the step that generates column applied + 1 + max_delay (step index applied+3)
    switched = unbounded_reference(model, PROMPTS[0], frames, switch=(applied + 3, PROMPTS[1])).numpy()
    assert np.array_equal(codes[:, :applied], unchanged[:, :applied])
    assert not np.array_equal(codes[:, applied:], unchanged[:, applied:])
    assert np.array_equal(codes, switched)
    revisions = [(c.first_frame, c.prompt_revision, c.prompt) for c in chunks]
    assert all(rev == (0 if first < applied else 1) for first, rev, _ in revisions)
    assert tail.of("finished")[0].reason == pb.FINISH_REASON_STOPPED


def test_append_audio_continues_exactly_as_an_offline_continuation(server, model):
    audio = (0.3 * np.random.default_rng(3).standard_normal(640 * 8)).astype("<f4")
    requests = RequestQueue(start_request(PROMPTS[2], sampling=GREEDY, return_codes=True, chunk_frames=1,
                                          max_lead_seconds=0.2))
    call = server.stub().Session(iter(requests))
    wait_for(call, "audio")
    requests.send(pb.SessionRequest(append_audio=pb.AppendAudio(
        audio=pb.AudioData(pcm=audio.tobytes(), sample_rate=32000, channels=1,
                           encoding=pb.AUDIO_ENCODING_FLOAT32_LE), replace_context=True)))
    notice, seen = wait_for(call, "notice")
    assert notice.notice.kind == pb.NOTICE_KIND_AUDIO_APPENDED
    appended_at = notice.notice.frame
    received = [e.audio for e in seen if e.WhichOneof("event") == "audio"]
    chunks = []
    while sum(c.frame_count for c in chunks) < 15:
        if received:
            last = received[-1]
            requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=last.start_sample + last.sample_count)))
        event, _ = wait_for(call, "audio")
        received.append(event.audio)
        if event.audio.first_frame >= appended_at:
            chunks.append(event.audio)
    requests.send(pb.SessionRequest(stop=pb.Stop()))
    collect(call)
    codes = np.array([code for c in chunks for code in c.codes]).reshape(-1, 4).T
    assert chunks[0].first_frame == appended_at
    prompt_codes = model.encode_audio(torch.from_numpy(audio[None].copy()))
    reference = unbounded_reference(model, PROMPTS[2], codes.shape[1], prompt_codes=prompt_codes).numpy()
    assert np.array_equal(codes, reference)


def test_session_runs_past_the_position_limit_without_a_gap(model):
    with ServerThread(model, EngineConfig(context_frames=40, reprime_keep_frames=16)) as small:
        requests = RequestQueue(start_request(PROMPTS[3], sampling=GREEDY, unpaced=True, chunk_frames=10))
        call = small.stub().Session(iter(requests))
        chunks = []
        notices = []
        for event in call:
            if event.WhichOneof("event") == "audio":
                chunks.append(event.audio)
            elif event.WhichOneof("event") == "notice":
                notices.append(event.notice)
            if sum(c.frame_count for c in chunks) >= 300:  # past the checkpoint's 256 positions
                break
        requests.send(pb.SessionRequest(stop=pb.Stop()))
        collect(call)
    assert sum(n.kind == pb.NOTICE_KIND_CONTEXT_REPRIMED for n in notices) >= 10
    assert [c.first_frame for c in chunks] == list(range(0, 10 * len(chunks), 10))
    for before, after in zip(chunks, chunks[1:]):
        assert after.start_sample == before.start_sample + before.sample_count
    pcm = np.concatenate([np.frombuffer(c.pcm, "<f4") for c in chunks])
    assert np.isfinite(pcm).all() and np.abs(pcm).max() > 0


def test_pacing_holds_the_session_at_its_lead_until_acks_arrive(server):
    requests = RequestQueue(start_request(PROMPTS[0], max_lead_seconds=0.3, chunk_frames=5))
    call = server.stub().Session(iter(requests))
    received = []
    lock = threading.Lock()

    def drain():
        for event in call:
            if event.WhichOneof("event") == "audio":
                with lock:
                    received.append(event.audio.sample_count)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    time.sleep(1.5)
    with lock:
        held = sum(received)
    lead, chunk = int(0.3 * 32000), 5 * 640
    assert lead <= held <= lead + chunk  # stopped at its lead: nothing acknowledged yet
    time.sleep(0.5)
    with lock:
        assert sum(received) == held  # still waiting
    requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=held)))
    time.sleep(1.0)
    with lock:
        moved = sum(received)
    assert held + lead <= moved <= held + lead + chunk
    requests.send(pb.SessionRequest(stop=pb.Stop()))
    reader.join(30)


def test_paused_session_generates_nothing_until_resumed(server):
    requests = RequestQueue(start_request(PROMPTS[0], unpaced=True, start_paused=True, chunk_frames=5))
    call = server.stub().Session(iter(requests))
    started, _ = wait_for(call, "started")
    assert started.started.paused
    steps = server.engine.steps
    time.sleep(0.5)
    assert server.engine.steps == steps
    requests.send(pb.SessionRequest(resume=pb.Resume()))
    notice, _ = wait_for(call, "notice")
    assert notice.notice.kind == pb.NOTICE_KIND_RESUMED
    wait_for(call, "audio")
    requests.send(pb.SessionRequest(stop=pb.Stop()))
    assert collect(call).of("finished")[0].reason == pb.FINISH_REASON_STOPPED


@pytest.mark.parametrize("rate", [44100, 48000])
def test_output_resampled_to_44k1_and_48k_as_int16(server, model, rate):
    got = collect(server.stub().Generate(generate_request(PROMPTS[0], 20, output=pb.AudioFormat(
        sample_rate=rate, encoding=pb.AUDIO_ENCODING_INT16_LE))), encoding="<i2")
    started = got.of("started")[0]
    assert started.output.sample_rate == rate and started.samples_per_frame == 640 * rate / 32000
    assert got.pcm.shape[1] == 20 * 640 * rate // 32000
    offline = model.generate(PROMPTS[0], frames=20, params=model.default_sampling(greedy=True)).audio[0]
    import soxr
    reference = soxr.resample(offline.numpy().T, 32000, rate, quality="HQ").T
    assert np.abs(got.pcm - reference).max() < 2e-4


def test_model_info_reports_the_model(server, model):
    info = server.stub().GetModelInfo(pb.GetModelInfoRequest())
    assert (info.sample_rate, info.channels, info.frame_rate, info.num_codebooks) == (32000, 1, 50, 4)
    assert info.max_context_frames == 256 - 4 and info.max_sessions == 8
    assert list(info.supported_output_sample_rates) == [32000, 44100, 48000]
    assert info.default_sampling.top_k == 50 and info.default_sampling.guidance_scale == 3.0


def test_cancel_frees_memory_after_200_sessions(model):
    import psutil
    process = psutil.Process()
    with ServerThread(model, EngineConfig(max_sessions=4)) as running:
        def cycle(count: int) -> None:
            for _ in range(count):
                call = running.stub().Session(iter(RequestQueue(start_request(PROMPTS[0], unpaced=True))))
                for event in call:
                    if event.WhichOneof("event") == "audio":
                        call.cancel()
                        break

        cycle(20)  # warm up allocators and caches
        deadline = time.monotonic() + 10
        while running.engine.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        baseline = process.memory_info().rss
        cycle(200)
        deadline = time.monotonic() + 10
        while running.engine.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.engine.active_sessions == 0
        grown = process.memory_info().rss - baseline
    assert grown < 40 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.1f} MiB over 200 sessions"


def test_graceful_shutdown_finishes_sessions_first(model):
    with ServerThread(model) as running:
        requests = RequestQueue(start_request(PROMPTS[0], unpaced=True))
        call = running.stub().Session(iter(requests))
        wait_for(call, "audio")
        running.stop()
        finished = [e.finished for e in call if e.WhichOneof("event") == "finished"]
    assert finished and finished[0].reason == pb.FINISH_REASON_SERVER_SHUTDOWN


def test_low_latency_lookahead_reports_less_latency_and_stays_close(server, model):
    exact = collect(server.stub().Generate(generate_request(PROMPTS[0], 30)))
    fast = collect(server.stub().Generate(generate_request(PROMPTS[0], 30, decoder_lookahead_frames=1)))
    exact_started, fast_started = exact.of("started")[0], fast.of("started")[0]
    assert exact_started.exact_decoding and not fast_started.exact_decoding
    assert fast_started.latency_samples < exact_started.latency_samples
    assert np.array_equal(fast.codes, exact.codes) and fast.pcm.shape == exact.pcm.shape
    noise = np.sum((fast.pcm - exact.pcm) ** 2)
    assert noise > 0 and 10 * np.log10(np.sum(exact.pcm ** 2) / noise) > 10


def test_mono_model_streams_stereo_on_request_and_reports_its_seed(server):
    got = collect(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(
        prompt=PROMPTS[0], duration_frames=10, output=pb.AudioFormat(channels=2)))), channels=2)
    started = got.of("started")[0]
    assert started.output.channels == 2 and np.array_equal(got.pcm[0], got.pcm[1])
    assert started.sampling.HasField("seed")  # chosen by the server, so the session can be replayed
    replay = collect(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(
        prompt=PROMPTS[0], duration_frames=10, return_codes=True, sampling=pb.Sampling(seed=started.sampling.seed)))))
    first = collect(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(
        prompt=PROMPTS[0], duration_frames=10, return_codes=True, sampling=pb.Sampling(seed=started.sampling.seed)))))
    assert np.array_equal(replay.codes, first.codes)
    finished = got.of("finished")[0]
    assert finished.stats.steps == 13 and finished.stats.wall_seconds > 0 and finished.stats.realtime_factor > 0


def test_a_lead_shorter_than_a_chunk_still_makes_progress_with_acks(server):
    """Held at a 50 ms lead with 10-frame chunks, the session hands over what is final, so acks keep it going."""
    requests = RequestQueue(start_request(PROMPTS[1], max_lead_seconds=0.05, chunk_frames=10))
    call = server.stub().Session(iter(requests))
    played, stopped = 0, False
    for event in call:
        if event.WhichOneof("event") == "audio" and not stopped:  # after Stop the tail comes regardless
            assert event.audio.frame_count == 10  # full chunks: held-back chunks wait for acks
            assert event.audio.start_sample + event.audio.sample_count - played <= 0.05 * 32000 + 10 * 640
            played = event.audio.start_sample + event.audio.sample_count
            requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=played)))
            if played >= 32000:
                requests.send(pb.SessionRequest(stop=pb.Stop()))
                stopped = True
    assert played >= 32000
