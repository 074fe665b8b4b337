"""Instant steering by rollback over a real server on loopback: a change lands just after what the client has
played, the audio sent past it is retracted and generated again, the frames before it are untouched and the
frames from it equal a session that applied the change there (the same random draws)."""

from __future__ import annotations

import numpy as np
import torch

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import MusicGen
from server_harness import RequestQueue

LOFI, TECHNO = "warm lofi beat with piano", "dark techno"
SEEDED = pb.Sampling(seed=5, guidance_scale=3.0)


def rolled_back(mono_server, played_frames: int, margin: float, frames_after: int = 20, **start_fields):
    """A paced session (1 s lead) acked to `played_frames`, then steered to TECHNO with a rollback margin.
    -> (every event, the final codes (codebooks, frames) and audio (channels, samples) with each sample
    taken from the last chunk that carried it)."""
    start = pb.StartSession(prompt=LOFI, sampling=SEEDED, return_codes=True, chunk_frames=1, max_lead_seconds=1.0,
                            **start_fields)
    requests = RequestQueue(pb.SessionRequest(start=start))
    call = mono_server.stub().Session(iter(requests))
    events, steered, resumed_at, spf = [], False, None, None
    for event in call:
        events.append(event)
        kind = event.WhichOneof("event")
        if kind == "started":
            spf = int(event.started.samples_per_frame)
        elif kind == "audio" and not steered and event.audio.first_frame >= 40:  # 40 frames sent, 10 played
            requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=played_frames * spf)))
            requests.send(pb.SessionRequest(set_prompt=pb.SetPrompt(
                text=TECHNO, rollback=pb.Rollback(margin_seconds=margin))))
            steered = True
        elif kind == "retracted":
            resumed_at = event.retracted.frame
        elif kind == "audio" and resumed_at is not None and event.audio.first_frame >= resumed_at + frames_after:
            requests.send(pb.SessionRequest(stop=pb.Stop()))
            break
        elif kind == "audio" and steered and resumed_at is None and event.audio.first_frame >= 48:
            requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=played_frames * spf)))
    events.extend(call)
    chunks = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    kinds = [e.WhichOneof("event") for e in events]
    resent = [e.audio for e in events[kinds.index("retracted"):] if e.WhichOneof("event") == "audio"]
    last = max(c.first_frame + c.frame_count for c in resent)  # past it, only retracted audio was sent
    codes = np.zeros((4, last), dtype=np.int64)
    audio = np.zeros(last * spf, dtype=np.float32)
    for c in chunks:  # later chunks overwrite what was retracted
        if c.first_frame < last:
            n = min(c.frame_count, last - c.first_frame)
            codes[:, c.first_frame: c.first_frame + n] = np.array(c.codes).reshape(-1, 4).T[:, :n]
            audio[c.start_sample: c.start_sample + n * spf] = np.frombuffer(c.pcm, dtype="<f4")[:n * spf]
    return events, codes, audio


@torch.inference_mode()
def reference(mono_model: MusicGen, frames: int, switch_step: int | None) -> np.ndarray:
    """Sampled with the session's seed, the text switched before step `switch_step` (the core's own step)."""
    params = mono_model.default_sampling(seed=5, guidance_scale=3.0)
    state = mono_model.start_sequence(mono_model.encode_text([LOFI])[0], params)
    step = 0
    while state.grid.first_frame_of_next_column() < frames:
        if step == switch_step:
            state.cross = mono_model.cross_attention(mono_model.encode_text([TECHNO])[0], True)
        mono_model.step([state])
        step += 1
    return state.grid.frames(0, frames).numpy()


def test_a_rollback_lands_after_the_played_audio_plus_the_margin_and_regenerates_from_there(mono_server, mono_model):
    events, codes, audio = rolled_back(mono_server, played_frames=10, margin=0.1)
    retracted = [e.retracted for e in events if e.WhichOneof("event") == "retracted"]
    assert [(r.frame, r.sample) for r in retracted] == [(15, 15 * 640)]  # 10 played + 0.1 s (5 frames)
    applied = [e.notice.frame for e in events if e.WhichOneof("event") == "notice"
               and e.notice.kind == pb.NOTICE_KIND_PROMPT_APPLIED]
    assert applied == [15]
    after = [e.audio for e in events[events.index(next(e for e in events if e.WhichOneof("event") == "retracted")):]
             if e.WhichOneof("event") == "audio"]
    assert after[0].first_frame == 15 and after[0].start_sample == 15 * 640 and after[0].prompt_revision == 1
    sequences = [e.audio.sequence for e in events if e.WhichOneof("event") == "audio"]
    assert sequences == list(range(len(sequences)))  # chunk numbering goes on
    frames = codes.shape[1]
    assert np.array_equal(codes[:, :15], reference(mono_model, 15, None))
    expected = reference(mono_model, frames, 15 + 3)
    assert np.array_equal(codes, expected), np.argwhere(codes != expected)  # the change applied at frame 15
    offline = mono_model.decode_audio(torch.from_numpy(codes))[0].numpy()
    tail = (frames - 4) * 640  # the last frames' audio waits for right context
    assert np.abs(audio[15 * 640: tail] - offline[15 * 640: tail]).max() < 1e-5


def test_at_an_output_rate_of_48_khz_the_audio_after_the_splice_is_the_continuous_streams(mono_server, mono_model):
    import soxr

    events, codes, audio = rolled_back(mono_server, played_frames=10, margin=0.1,
                                       output=pb.AudioFormat(sample_rate=48000))
    assert [e.retracted.sample for e in events if e.WhichOneof("event") == "retracted"] == [15 * 960]
    offline = mono_model.decode_audio(torch.from_numpy(codes))[0].numpy()
    expected = soxr.resample(offline, 32000, 48000, quality="HQ")
    tail = (codes.shape[1] - 6) * 960  # right context of the codec and the resampler
    assert np.abs(audio[15 * 960: tail] - expected[15 * 960: tail]).max() < 1e-4


def test_a_margin_past_what_was_generated_schedules_the_change_without_retracting(mono_server):
    start = pb.StartSession(prompt=LOFI, sampling=SEEDED, chunk_frames=5, max_lead_seconds=1.0)
    requests = RequestQueue(pb.SessionRequest(start=start))
    events, steered = [], False
    for event in mono_server.stub().Session(iter(requests)):
        events.append(event)
        kind = event.WhichOneof("event")
        if kind == "audio" and not steered and event.audio.first_frame >= 20:
            requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=10 * 640)))
            requests.send(pb.SessionRequest(set_prompt=pb.SetPrompt(text=TECHNO,
                                                                    rollback=pb.Rollback(margin_seconds=2.0))))
            steered = True
        elif kind == "audio" and steered:  # a client that plays instantly
            requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=event.audio.start_sample
                                                       + event.audio.sample_count)))
        elif kind == "notice" and event.notice.kind == pb.NOTICE_KIND_PROMPT_APPLIED:
            requests.send(pb.SessionRequest(stop=pb.Stop()))
    assert not [e for e in events if e.WhichOneof("event") == "retracted"]
    applied = [e.notice.frame for e in events if e.WhichOneof("event") == "notice"
               and e.notice.kind == pb.NOTICE_KIND_PROMPT_APPLIED]
    assert applied == [10 + 100]  # 10 played + 2 s, landing when generation gets there


class ClockedOutput:
    """An output stream for the Player without PortAudio: a thread calls its callback every 10 ms of audio
    and keeps everything it was given, as a sound card would play it."""

    latency = 0.0

    def __init__(self, rate: int, channels: int, blocksize: int, callback):
        self.rate, self.channels, self.callback = rate, channels, callback
        self.block = blocksize or rate // 100
        self.played: list[np.ndarray] = []
        self._stop = __import__("threading").Event()
        self._thread = __import__("threading").Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time
        start, blocks = time.monotonic(), 0
        while not self._stop.is_set():
            out = np.zeros((self.block, self.channels), np.float32)
            self.callback(out, self.block, None, None)
            self.played.append(out)
            blocks += 1
            time.sleep(max(0.0, start + blocks * self.block / self.rate - time.monotonic()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def close(self) -> None:
        pass


def test_the_player_drops_the_retracted_audio_and_plays_the_new_audio_from_the_splice(mono_server):
    import time

    from client import AudioChunk, MusicGenClient, Player, Retracted

    outputs: list[ClockedOutput] = []

    def output(rate, channels, blocksize, callback):
        outputs.append(ClockedOutput(rate, channels, blocksize, callback))
        return outputs[-1]

    received: list = []
    with MusicGenClient(mono_server.address) as client:
        session = client.open_session(LOFI, sampling={"seed": 5, "guidance_scale": 3.0}, chunk_frames=2,
                                      max_lead_seconds=1.0)
        player = Player(session, output=output, start_fill_seconds=0.2, on_event=received.append).start()
        while player.samples_played < 0.5 * 32000:
            time.sleep(0.01)
        session.set_prompt(TECHNO, rollback_seconds=0.15)
        deadline = time.monotonic() + 10
        while not [e for e in received if isinstance(e, Retracted)] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.5)
        session.stop()
        player.wait(10)
        player.close()
    (retracted,) = [e for e in received if isinstance(e, Retracted)]
    stream = np.zeros(max(c.end_sample for c in received if isinstance(c, AudioChunk)), np.float32)
    for event in received:  # the stream as it stands: retracted audio replaced by what came after it
        if isinstance(event, AudioChunk):
            stream[event.start_sample: event.end_sample] = event.audio[:, 0]
    device = np.concatenate(outputs[0].played)[:, 0]
    first = int(np.flatnonzero(device)[0])
    played = device[first:]
    assert player.stats.underruns == 0 and player.retracted_late_frames == 0
    assert retracted.sample > 0.5 * 32000  # after what had been played when the change was sent
    n = min(len(played), len(stream)) - 1
    assert np.array_equal(played[:n], stream[:n])  # no gap, no repeat: old audio up to the splice, new after
