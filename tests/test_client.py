"""The client library and the `musicgen-client` CLI against a real server on loopback (no audio device needed)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from client import (AsyncMusicGenClient, AudioChunk, FailedPrecondition, Finished, FinishReason, InvalidArgument,
                    LiveInput, MusicGenClient, Notice, NoticeKind, Player, ResourceExhausted, RingBuffer, Started,
                    Unauthenticated, Unavailable)
from client.wavfile import WavWriter, read_wav, to_int16
from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import MusicGen
from server.engine import EngineConfig
from server.main import ServerOptions
from server_harness import ServerThread, collect

ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"greedy": True, "guidance_scale": 3.0}
BLOCK_SOUNDDEVICE = "import sys; sys.modules['sounddevice'] = None; from client.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, EngineConfig(max_sessions=8)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with MusicGenClient(server.address) as connected:
        yield connected


def run_cli(*args: str, block_sounddevice: bool = False, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", BLOCK_SOUNDDEVICE] if block_sounddevice else [sys.executable, "-m", "client.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
                          **kwargs)


def read_int16_wav(path: Path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path), "rb") as handle:
        data = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
        return data.reshape(-1, handle.getnchannels()), handle.getframerate(), handle.getsampwidth()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the CLI -----------------------------------------------------------------------------------------------

def test_play_no_playback_writes_exact_length_without_sounddevice(server, tmp_path):
    """--no-playback works where PortAudio is missing: sounddevice is made unimportable in the process."""
    out = tmp_path / "x.wav"
    result = run_cli("--server", server.address, "play", "warm lofi beat", "--no-playback", "--out", str(out),
                     "--seconds", "1", block_sounddevice=True)
    assert result.returncode == 0, result.stderr
    pcm, rate, width = read_int16_wav(out)
    assert (pcm.shape, rate, width) == ((50 * 640, 1), 32000, 2)
    assert "1.00 s received" in result.stderr  # the progress line (one per second off a terminal)


def test_play_greedy_wav_equals_the_server_stream(server, tmp_path):
    out = tmp_path / "greedy.wav"
    result = run_cli("--server", server.address, "play", "dark techno", "--no-playback", "--out", str(out),
                     "--seconds", "1", "--greedy", "--guidance-scale", "3", "--chunk-frames", "7")
    assert result.returncode == 0, result.stderr
    reference = collect(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(
        prompt="dark techno", sampling=pb.Sampling(greedy=True, guidance_scale=3.0), duration_seconds=1.0,
        chunk_frames=7))))  # the same chunking: the codec is fed in chunk-sized groups
    pcm, _, _ = read_int16_wav(out)
    assert np.array_equal(pcm, to_int16(reference.pcm.T))  # exact at 16 bits


def test_play_continue_from_equals_generate_with_that_audio_prompt(server, tmp_path):
    source = tmp_path / "in.wav"
    with WavWriter(source, 48000, 1) as writer:
        writer.write((np.sin(np.arange(24000) * 0.02) * 0.4)[:, None])
    out = tmp_path / "continued.wav"
    result = run_cli("--server", server.address, "play", "", "--no-playback", "--out", str(out), "--seconds", "0.5",
                     "--greedy", "--guidance-scale", "1", "--continue-from", str(source))
    assert result.returncode == 0, result.stderr
    audio, rate = read_wav(source)
    prompt = pb.AudioData(pcm=audio.astype("<f4").tobytes(), sample_rate=rate, channels=1,
                          encoding=pb.AUDIO_ENCODING_FLOAT32_LE)
    reference = collect(server.stub().Generate(pb.GenerateRequest(request=pb.StartSession(
        sampling=pb.Sampling(greedy=True, guidance_scale=1.0), duration_seconds=0.5, audio_prompt=prompt))))
    assert reference.of("started")[0].audio_prompt_frames == 25
    pcm, _, _ = read_int16_wav(out)
    assert np.array_equal(pcm, to_int16(reference.pcm.T))


def test_playback_without_portaudio_says_what_to_install(server, tmp_path):
    result = run_cli("--server", server.address, "play", "warm lofi beat", "--seconds", "1",
                     block_sounddevice=True)
    assert result.returncode == 2
    for needed in ("apt-get install libportaudio2", "pip install sounddevice", "--no-playback"):
        assert needed in result.stderr, result.stderr


def live_session_output(server, options: list[str], lines: list[tuple[str, float]]) -> str:
    """`musicgen-client live` with these options, fed each line after its pause; -> stdout + stderr."""
    process = subprocess.Popen([sys.executable, "-m", "client.cli", "--server", server.address, "live", *options,
                                "--no-playback", "--lead", "0.5"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line, pause in lines:
            time.sleep(pause)
            process.stdin.write(line + "\n")
            process.stdin.flush()
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    return stdout + stderr


def test_live_mode_steers_from_stdin(server, tmp_path):
    out = tmp_path / "live.wav"
    feed = tmp_path / "loop.wav"
    with WavWriter(feed, 44100, 2) as writer:  # any rate and channel count: the server converts
        writer.write(np.tile(np.sin(np.arange(44100) * 0.03)[:, None] * 0.3, (1, 2)))
    output = live_session_output(server, ["ambient pad", "--out", str(out)], [
        ("", 0.6), ("dark techno with heavy kicks", 0.5), (":pause", 0.3), (":resume", 0.4), (f":feed {feed}", 0.3),
        (":quit", 0.6)])
    applied = [line for line in output.splitlines() if line.startswith("notice: prompt applied at frame ")]
    assert len(applied) == 1, output
    frame = int(applied[0].split("at frame ")[1].split(",")[0])
    assert frame > 0
    assert "notice: paused at frame" in output and "notice: resumed at frame" in output
    assert "notice: audio appended at frame" in output
    assert "finished: stopped" in output
    pcm, _, _ = read_int16_wav(out)
    total = int(output.split("finished: stopped, ")[1].split(" samples")[0])
    assert pcm.shape[0] == total > frame * 640  # the WAV holds every sample sent, past the prompt change


def test_live_mode_takes_weighted_prompts_from_the_command_line_and_stdin(server):
    output = live_session_output(server, ["--weights", "ambient pad=3 | dark techno=1"], [
        ("", 0.6), (":weights ambient pad=nan", 0.2), (":weights ambient pad=1, dark techno=1", 0.5),
        (":morph 5f funky bass=1", 0.2), (":morph 3x y", 0.5), (":quit", 0.6)])
    assert "'ambient pad' has weight nan" in output  # refused here: the session plays on
    assert "prompts sent: ambient pad=1 | dark techno=1" in output
    assert len([line for line in output.splitlines() if line.startswith("notice: prompt applied at frame ")]) == 2
    assert "notice: transition ended at frame" in output
    assert "morph: expected" in output  # a malformed :morph is a message; the session plays on
    assert "finished: stopped" in output


def test_live_mode_schedules_commands_at_bars_of_its_tempo(server):
    # at 600 bpm a bar of 2 beats is 0.2 s: 10 frames
    output = live_session_output(server, ["lofi", "--tempo", "600", "--beats-per-bar", "2"], [
        ("", 0.6), (":at bar 0 dark techno", 0.1), (":at soon x", 0.1), (":at next-bar :morph 5f ambient", 0.8),
        (":now funky bass", 0.6), (":quit", 0.3)])
    assert "at: sample 0 may already be generated" in output  # refused here, not by the server
    assert "at: expected" in output
    applied = [int(line.split("at frame ")[1].split(",")[0]) for line in output.splitlines()
               if line.startswith("notice: prompt applied at frame ")]
    assert len(applied) == 2 and applied[0] % 10 == 0  # on a bar line
    assert "retracted: from frame" in output  # :now rolled back what was sent but not played
    assert "finished: stopped" in output


def test_weights_that_do_not_parse_are_a_usage_error(server):
    result = run_cli("--server", server.address, "play", "--weights", "ambient pad=0 | dark techno=0",
                     "--no-playback")
    assert result.returncode == 2 and "at least one weight must be > 0" in result.stderr
    result = run_cli("--server", server.address, "play", "lofi", "--weights", "a=1", "--no-playback")
    assert result.returncode == 2 and "not both" in result.stderr


# -- the library -------------------------------------------------------------------------------------------

def test_session_steering_from_another_thread(server):
    """set_prompt / pause / resume / append_audio (split into parts) / stop from a second thread while the
    first iterates and acks; the chunk numbering stays contiguous and every change is reported."""
    client = MusicGenClient(server.address, max_message_bytes=64 * 1024)  # 2 s of float32 audio -> 4 parts
    session = client.open_session("warm lofi beat", sampling=GREEDY, max_lead_seconds=0.5, chunk_frames=4,
                                  return_codes=True)
    events: list = []
    seen_notice = threading.Event()

    def steer() -> None:
        time.sleep(0.2)
        session.set_prompt("dark techno", temperature=0.9)
        time.sleep(0.2)
        session.pause()
        time.sleep(0.2)
        session.resume()
        session.append_audio(np.sin(np.arange(64000) * 0.05).astype(np.float32) * 0.3, 32000)
        seen_notice.wait(10)
        session.stop()

    threading.Thread(target=steer, daemon=True).start()
    with session:
        for event in session:
            events.append(event)
            if isinstance(event, AudioChunk):
                session.ack(event.end_sample)  # a consumer that plays instantly
            if isinstance(event, Notice) and event.kind is NoticeKind.AUDIO_APPENDED:
                seen_notice.set()
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert events[-1].reason is FinishReason.STOPPED
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert all(a.end_sample == b.start_sample for a, b in zip(chunks, chunks[1:]))
    assert all(c.codes.shape == (c.frame_count, 4) and c.audio.shape == (c.frame_count * 640, 1) for c in chunks)
    assert events[-1].total_samples == chunks[-1].end_sample == session.samples_received
    kinds = [e.kind for e in events if isinstance(e, Notice)]
    assert kinds == [NoticeKind.PROMPT_APPLIED, NoticeKind.PAUSED, NoticeKind.RESUMED, NoticeKind.AUDIO_APPENDED]
    applied = next(e for e in events if isinstance(e, Notice) and e.kind is NoticeKind.PROMPT_APPLIED)
    first_new = next(c for c in chunks if c.prompt_revision == 1)
    assert first_new.first_frame == applied.frame and first_new.prompt == "dark techno"
    assert first_new.sampling.temperature == pytest.approx(0.9)
    client.close()


def test_weighted_prompts_through_the_library_report_their_normalised_weights(client):
    session = client.open_session(prompts={"ambient pad": 3, "dark techno": 1}, sampling=GREEDY,
                                  max_lead_seconds=0.3, chunk_frames=4)
    chunks = []
    with session:
        for event in session:
            if isinstance(event, AudioChunk):
                chunks.append(event)
                session.ack(event.end_sample)
                if len(chunks) == 1:
                    session.set_prompt(prompts=[("ambient pad", 1), ("dark techno", 1)])
                if event.prompt_revision == 1:
                    session.stop()
    assert session.started.prompts == (("ambient pad", 0.75), ("dark techno", 0.25))
    assert chunks[0].prompts == (("ambient pad", 0.75), ("dark techno", 0.25))
    assert chunks[-1].prompts == (("ambient pad", 0.5), ("dark techno", 0.5))
    assert chunks[-1].prompt == "ambient pad=0.5 | dark techno=0.5"
    assert client.model_info().max_prompts == 4


def test_generate_returns_chunks_and_metadata(client):
    generation = client.generate("funky bass", frames=23, sampling=GREEDY, chunk_frames=5, encoding="int16",
                                 sample_rate=48000)
    assert generation.started.sample_rate == 48000 and generation.started.samples_per_frame == 960
    chunks = list(generation)
    assert [c.frame_count for c in chunks] == [5, 5, 5, 5, 3]
    assert sum(c.sample_count for c in chunks) == 23 * 960 == generation.finished.total_samples
    assert all(c.audio.dtype == np.float32 and np.abs(c.audio).max() <= 1.0 for c in chunks)


def test_the_servers_headroom_reaches_the_client(client):
    """Each chunk carries its session's running real-time factor; ModelInfo the engine's."""
    chunks = list(client.generate("funky bass", frames=12, sampling=GREEDY, chunk_frames=4))
    assert all(c.realtime_factor > 0 for c in chunks)
    assert client.model_info().engine_realtime_factor > 0


def test_async_client_matches_the_blocking_one(server, client):
    reference = client.generate("ambient pad", frames=30, sampling=GREEDY).audio()

    async def run() -> tuple[np.ndarray, list]:
        async with AsyncMusicGenClient(server.address) as aclient:
            info = await aclient.model_info()
            assert info.sample_rate == 32000 and info.num_codebooks == 4
            audio = await (await aclient.generate("ambient pad", frames=30, sampling=GREEDY)).audio()
            session = await aclient.open_session("ambient pad", sampling=GREEDY, max_lead_seconds=0.3)
            events = []

            async def steer() -> None:  # from another task while the first iterates
                await asyncio.sleep(0.1)
                session.set_prompt("dark techno")
                await asyncio.sleep(0.2)
                threading.Thread(target=session.stop).start()  # and from another thread

            steering = asyncio.create_task(steer())
            async with session:
                async for event in session:
                    events.append(event)
                    if isinstance(event, AudioChunk):
                        session.ack(event.end_sample)
            await steering
            with pytest.raises(InvalidArgument, match="start.chunk_frames"):
                await aclient.open_session("x", chunk_frames=100000)
            return audio, events

    audio, events = asyncio.run(run())
    assert np.array_equal(audio, reference)
    assert isinstance(events[0], Started) and events[-1].reason is FinishReason.STOPPED
    assert any(isinstance(e, Notice) and e.kind is NoticeKind.PROMPT_APPLIED for e in events)


def test_acks_racing_the_servers_own_end_never_break_a_session(server, client):
    """A short finite session outruns its slow reader: the reader's acks reach a call the server has already
    ended. Both clients must still deliver every chunk and Finished(COMPLETED). (grpc.aio turned such a
    write into INTERNAL and lost the tail in 20 of 20 tries, which is why AsyncLiveSession avoids it.)"""

    def check(session) -> None:
        assert session.finished.reason is FinishReason.COMPLETED
        assert session.finished.total_samples == session.samples_received == 15 * 640

    for _ in range(4):
        session = client.open_session("x", frames=15, chunk_frames=1)
        for event in session:
            if isinstance(event, AudioChunk):
                time.sleep(0.01)
                session.ack(event.end_sample)
        check(session)

    async def run() -> None:
        async with AsyncMusicGenClient(server.address) as aclient:
            for _ in range(4):
                session = await aclient.open_session("x", frames=15, chunk_frames=1)
                async for event in session:
                    if isinstance(event, AudioChunk):
                        await asyncio.sleep(0.01)
                        session.ack(event.end_sample)
                check(session)

    asyncio.run(run())


def test_bad_parameters_raise_invalid_argument_naming_the_field(client):
    with pytest.raises(InvalidArgument) as error:
        client.open_session("x", sampling={"top_p": 1.5})
    assert error.value.field == "start.sampling.top_p" and "1.5" in str(error.value)
    with pytest.raises(InvalidArgument) as error:
        client.generate("x", seconds=1, sample_rate=22050)
    assert error.value.field == "request.output.sample_rate"
    with pytest.raises(InvalidArgument) as error:
        client.generate("x")  # Generate needs a duration
    assert error.value.field.startswith("request.duration")


def test_error_after_start_ends_the_iteration_with_the_exception(client):
    session = client.open_session("x", max_lead_seconds=0.2)
    session._send(pb.SessionRequest(start=pb.StartSession()))  # a second start, past the client's guards
    with pytest.raises(FailedPrecondition, match="start"):
        for _ in session:
            pass
    assert session.finished.reason is FinishReason.ERROR


def test_unreachable_server_raises_unavailable():
    dead = MusicGenClient(f"127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(Unavailable, match="not reachable"):
        dead.model_info()
    with pytest.raises(Unavailable):
        dead.open_session("x")
    with pytest.raises(Unavailable):
        dead.generate("x", seconds=1)


def test_token_tls_and_admission(model, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    options = ServerOptions(host="localhost", port=0, token="s3cret", tls_cert=cert, tls_key=key)
    with ServerThread(model, EngineConfig(max_sessions=1), options=options) as secured:
        target = f"localhost:{secured.running.port}"
        with pytest.raises(Unauthenticated):
            MusicGenClient(target, root_certificates=cert, token="wrong").model_info()
        with pytest.raises(Unauthenticated):
            MusicGenClient(target, root_certificates=cert).open_session("x")
        good = MusicGenClient(target, root_certificates=cert, token="s3cret")
        assert good.model_info().max_sessions == 1
        with good.open_session("x", start_paused=True) as first:
            assert first.started.paused
            with pytest.raises(ResourceExhausted, match="limit"):
                good.open_session("y")
        result = run_cli("--server", target, "--tls-cert", str(cert), "--token", "s3cret", "info")
        assert result.returncode == 0 and "max_sessions: 1" in result.stdout, result.stderr


# -- the player's buffer logic, without a device -----------------------------------------------------------

def test_ring_buffer_keeps_order_across_threads():
    ring = RingBuffer(1000, 2)
    total = 200_000
    source = np.stack([np.arange(total), -np.arange(total)], axis=1).astype(np.float32)
    received = np.zeros_like(source)

    def produce() -> None:
        done, rng = 0, np.random.default_rng(1)
        while done < total:
            written = ring.write(source[done:done + int(rng.integers(1, 700))])
            done += written
            if not written:
                time.sleep(0)  # full: let the consumer run

    producer = threading.Thread(target=produce)
    producer.start()
    got, rng = 0, np.random.default_rng(2)
    while got < total:
        copied = ring.read_into(received[got:], min(int(rng.integers(1, 900)), total - got))
        got += copied
        if not copied:
            time.sleep(0)  # empty: let the producer run
    producer.join()
    assert np.array_equal(received, source)


class FakeClockedSink:
    """An output stream whose callback is driven by a thread at `speed` x real time with odd block sizes."""

    latency = 0.01

    def __init__(self, rate: int, channels: int, blocksize: int, callback, speed: float = 1.0):
        self.rate, self.channels, self.callback, self.speed = rate, channels, callback, speed
        self.blocks = [blocksize or 441, 97, 1024]
        self.played: list[np.ndarray] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start, frames, index = time.monotonic(), 0, 0
        while not self._stop.is_set():
            size = self.blocks[index % len(self.blocks)]
            out = np.full((size, self.channels), np.nan, np.float32)  # the callback must fill all of it
            self.callback(out, size, None, None)
            self.played.append(out)
            frames, index = frames + size, index + 1
            delay = start + frames / (self.rate * self.speed) - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def close(self) -> None:
        pass


def test_player_with_odd_host_blocks_plays_the_stream_in_order(client, tmp_path):
    """Any block size; int16 on the wire; the recorded WAV and the sink both get exactly the stream."""
    sinks = []

    def output(rate, channels, blocksize, callback):
        sinks.append(FakeClockedSink(rate, channels, 441, callback))
        return sinks[-1]

    session = client.open_session("warm lofi beat", sampling=GREEDY, seconds=1.0, encoding="int16",
                                  max_lead_seconds=0.5)
    player = Player(session, output=output, record_to=tmp_path / "rec.wav", start_fill_seconds=0.1)
    stats = player.play()
    reference = client.generate("warm lofi beat", seconds=1.0, sampling=GREEDY, encoding="int16").audio()
    played = np.concatenate(sinks[0].played)[:, 0]
    assert not np.isnan(played).any()
    start = stats.startup_frames
    assert not played[:start].any() and np.array_equal(played[start:start + 32000], reference[:, 0])
    assert not played[start + 32000:].any()
    assert stats.underruns == 0 and stats.samples_played == 32000
    recorded, _, _ = read_int16_wav(tmp_path / "rec.wav")
    assert np.array_equal(recorded, to_int16(reference))


def test_live_input_sends_what_the_device_captured(client):
    """LiveInput with a capture stream stand-in: every `every_seconds` of input becomes one append."""
    streams = []

    class FakeInput:
        def __init__(self, rate, channels, blocksize, callback):
            self.rate, self.channels, self.callback = rate, channels, callback
            self._stop = threading.Event()
            streams.append(self)

        def start(self):
            def run():
                phase = 0
                while not self._stop.is_set():
                    block = (np.sin((phase + np.arange(160)) * 0.05) * 0.3).astype(np.float32)[:, None]
                    self.callback(block, 160, None, None)
                    phase += 160
                    time.sleep(160 / self.rate / 8)  # 8x real time
            threading.Thread(target=run, daemon=True).start()

        def stop(self):
            self._stop.set()

        def close(self):
            pass

    session = client.open_session("x", max_lead_seconds=0.5)
    appended = []
    with session, LiveInput(session, every_seconds=0.25, sample_rate=16000, input=FakeInput) as live:
        for event in session:
            if isinstance(event, AudioChunk):
                session.ack(event.end_sample)
            if isinstance(event, Notice) and event.kind is NoticeKind.AUDIO_APPENDED:
                appended.append(event)
                if len(appended) == 2:
                    session.stop()
    assert live.blocks_sent >= 2 and live.overflows == 0 and live.error is None
    assert appended[0].frame <= appended[1].frame and session.finished.reason is FinishReason.STOPPED


def test_start_options_are_one_object_for_both_clients_with_keywords_on_top():
    from client import Encoding, Sampling, StartOptions
    from client.requests import start_message
    base = StartOptions(frames=5, chunk_frames=2, sampling=Sampling(top_k=3))
    built = StartOptions.build("warm lofi beat", base, encoding="int16", sampling={"greedy": True})
    assert (built.frames, built.chunk_frames, built.encoding) == (5, 2, Encoding.INT16)
    assert built.sampling == Sampling(greedy=True)  # a keyword replaces the field whole
    message = start_message("warm lofi beat", base, {"encoding": "int16", "sampling": {"greedy": True}}, 1 << 22)
    assert message == built.to_pb(1 << 22)
    with pytest.raises(TypeError, match="unknown session option.*bogus"):
        StartOptions.build("x", bogus=1)


def test_model_info_carries_every_limit_the_server_enforces(client):
    info = client.model_info()
    assert (info.max_duration_seconds, info.stall_timeout_seconds, info.unpaced_lead_seconds) == (86400, 10, 60)
    assert info.dtype == "float32"
