"""Building protobuf requests from Python values (the only place, with events.py, that touches protobuf)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from dataclasses import fields as fields_of

import numpy as np

from musicgen.v1 import musicgen_pb2 as pb

from .events import Encoding, Sampling, encode_interleaved_pcm

SamplingLike = Sampling | Mapping | None

# An AppendAudio part stays this far under the message limit (field tags, lengths, the other fields).
_MESSAGE_OVERHEAD_BYTES = 1024


def as_sampling(sampling: SamplingLike, **overrides) -> Sampling:
    """A Sampling from a Sampling, a mapping of its fields, or None; keyword overrides that are not None win."""
    if sampling is None:
        base = Sampling()
    elif isinstance(sampling, Sampling):
        base = sampling
    else:
        base = Sampling(**dict(sampling))
    changes = {name: value for name, value in overrides.items() if value is not None}
    return replace(base, **changes) if changes else base


def as_audio(samples: np.ndarray, field: str = "audio") -> np.ndarray:
    """(samples,) or (samples, channels) numeric -> (samples, channels) float32, checked locally."""
    audio = np.asarray(samples)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32767.0
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[1] not in (1, 2):
        raise ValueError(f"{field}: expected (samples,) or (samples, 1 or 2 channels), got shape {audio.shape}")
    if audio.shape[0] == 0:
        raise ValueError(f"{field}: no samples")
    if not np.isfinite(audio).all():
        raise ValueError(f"{field}: contains NaN or Inf")
    return audio


def audio_data(audio: np.ndarray, sample_rate: int, encoding: Encoding = Encoding.FLOAT32) -> pb.AudioData:
    return pb.AudioData(pcm=encode_interleaved_pcm(audio, encoding), sample_rate=int(sample_rate),
                        channels=audio.shape[1], encoding=encoding.to_pb)


@dataclass(frozen=True)
class At:
    """When a steering command lands (the protocol's At): At.sample(n), At.frame(n), At.bar(n), At.beat(n),
    At.next_bar(), At.next_beat(). Bars and beats need a session tempo (StartOptions.tempo, set_tempo)."""

    kind: str
    value: int = 0

    @classmethod
    def sample(cls, sample: int) -> "At":
        return cls("sample", int(sample))

    @classmethod
    def frame(cls, frame: int) -> "At":
        return cls("frame", int(frame))

    @classmethod
    def bar(cls, bar: int) -> "At":
        return cls("bar", int(bar))

    @classmethod
    def beat(cls, beat: int) -> "At":
        return cls("beat", int(beat))

    @classmethod
    def next_bar(cls) -> "At":
        return cls("next_bar")

    @classmethod
    def next_beat(cls) -> "At":
        return cls("next_beat")

    def sample_at(self, tempo: "Tempo | None", sample_rate: int) -> int | None:
        """The output sample this time names where it is fixed (sample, or a bar / beat with a tempo);
        None for a frame (it depends on samples per frame) and next_bar / next_beat."""
        if self.kind == "sample":
            return self.value
        if self.kind in ("bar", "beat") and tempo is not None:
            beats = self.value * (tempo.beats_per_bar if self.kind == "bar" else 1)
            return round(tempo.beat_one_sample + beats * 60.0 * sample_rate / tempo.bpm)
        return None

    def to_pb(self) -> pb.At:
        if self.kind in ("next_bar", "next_beat"):
            return pb.At(**{self.kind: True})
        if self.kind not in ("sample", "frame", "bar", "beat") or self.value < 0:
            raise ValueError(f"at: {self.kind} {self.value} is not a time (sample, frame, bar or beat >= 0)")
        return pb.At(**{self.kind: self.value})


@dataclass(frozen=True)
class Tempo:
    """A session's musical time: bpm, beats per bar, and the output sample of beat one (bar 0)."""

    bpm: float
    beats_per_bar: int = 4
    beat_one_sample: int = 0

    def to_pb(self) -> pb.Tempo:
        return pb.Tempo(bpm=float(self.bpm), beats_per_bar=int(self.beats_per_bar),
                        beat_one_sample=int(self.beat_one_sample))


@dataclass(frozen=True)
class StartOptions:
    """Everything a session start carries, in Python terms (see StartSession in the protocol)."""

    prompt: str = ""
    prompts: "PromptWeights | None" = None  # several texts with weights instead of `prompt`
    tempo: Tempo | None = None  # for steering at bars and beats
    resume_codes: np.ndarray | None = None  # (frames, codebooks) codes to continue from (AudioChunk.codes joined)
    resume_at_sample: int = 0  # the output sample those frames end at: where the new session's audio starts
    sampling: Sampling = Sampling()
    seconds: float | None = None
    frames: int | None = None
    chunk_frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    encoding: Encoding = Encoding.FLOAT32
    lookahead: int | None = None
    max_lead_seconds: float = 0.0
    unpaced: bool = False
    start_paused: bool = False
    audio_prompt: np.ndarray | None = None
    audio_prompt_rate: int | None = None
    return_codes: bool = False
    client_name: str = ""
    context_frames: int = 0
    reprime_keep_frames: int = 0

    @classmethod
    def build(cls, prompt: str = "", options: "StartOptions | None" = None, **fields) -> "StartOptions":
        """`options` (default: all defaults) with `prompt` and keyword fields replacing its own. `sampling` may
        be a Sampling or a mapping of its fields, `encoding` an Encoding or its name; an unknown field is a
        TypeError naming it. What the clients' generate and open_session take."""
        unknown = sorted(set(fields) - {f.name for f in fields_of(cls)})
        if unknown:
            raise TypeError(f"unknown session option(s): {', '.join(unknown)}")
        if "sampling" in fields:
            fields["sampling"] = as_sampling(fields["sampling"])
        if "encoding" in fields:
            fields["encoding"] = Encoding(fields["encoding"])
        base = options or cls()
        return replace(base, prompt=prompt or base.prompt, **fields)

    def to_pb(self, max_message_bytes: int) -> pb.StartSession:
        start = pb.StartSession(prompt=self.prompt, sampling=self.sampling.to_pb(), chunk_frames=self.chunk_frames,
                                output=pb.AudioFormat(encoding=Encoding(self.encoding).to_pb,
                                                      sample_rate=self.sample_rate, channels=self.channels),
                                max_lead_seconds=self.max_lead_seconds, unpaced=self.unpaced,
                                start_paused=self.start_paused, return_codes=self.return_codes,
                                client_name=self.client_name, context_frames=self.context_frames,
                                reprime_keep_frames=self.reprime_keep_frames)
        if self.prompts is not None:
            start.prompts.extend(weighted_prompts(self.prompts))
        if self.tempo is not None:
            start.tempo.CopyFrom(self.tempo.to_pb())
        if self.resume_codes is not None:
            codes = np.asarray(self.resume_codes)
            if codes.ndim != 2:
                raise ValueError(f"resume_codes: (frames, codebooks) codes, got shape {codes.shape}")
            start.resume.codes.extend(codes.astype(np.int64).reshape(-1).tolist())
            start.resume.at_sample = int(self.resume_at_sample)
        if self.seconds is not None and self.frames is not None:
            raise ValueError("give seconds or frames, not both")
        if self.seconds is not None:
            start.duration_seconds = float(self.seconds)
        elif self.frames is not None:
            start.duration_frames = int(self.frames)
        if self.lookahead is not None:
            start.decoder_lookahead_frames = int(self.lookahead)
        if self.audio_prompt is not None:
            if not self.audio_prompt_rate:
                raise ValueError("audio_prompt needs audio_prompt_rate (its sample rate in Hz)")
            audio = as_audio(self.audio_prompt, "audio_prompt")
            start.audio_prompt.CopyFrom(audio_data(audio, self.audio_prompt_rate))
            if start.ByteSize() > max_message_bytes - _MESSAGE_OVERHEAD_BYTES:  # int16 halves it
                start.audio_prompt.CopyFrom(audio_data(audio, self.audio_prompt_rate, Encoding.INT16))
            if start.ByteSize() > max_message_bytes - _MESSAGE_OVERHEAD_BYTES:
                raise ValueError(f"audio_prompt: {audio.shape[0]} samples do not fit in one {max_message_bytes}-byte "
                                 "message; open the session with start_paused=True, append_audio(..., "
                                 "replace_context=True) and resume()")
        return start


def start_message(prompt: str, options: StartOptions | None, fields: dict,
                  max_message_bytes: int) -> pb.StartSession:
    """The StartSession of a generate / open_session call (see StartOptions.build)."""
    return StartOptions.build(prompt, options, **fields).to_pb(max_message_bytes)


PromptWeights = Mapping[str, float] | Sequence[tuple[str, float]]


def weighted_prompts(prompts: PromptWeights) -> list[pb.WeightedPrompt]:
    """{text: weight} or [(text, weight), ...] -> the protocol's entries (the server validates and normalises)."""
    pairs = list(prompts.items()) if isinstance(prompts, Mapping) else list(prompts)
    return [pb.WeightedPrompt(text=str(text), weight=float(weight)) for text, weight in pairs]


def set_prompt_request(text: str | None, sampling: Sampling, prompts: PromptWeights | None = None,
                       transition_seconds: float | None = None, transition_frames: int | None = None,
                       at: At | None = None, rollback_seconds: float | None = None,
                       transition_beats: float | None = None) -> pb.SessionRequest:
    change = pb.SetPrompt()
    if transition_beats is not None:
        change.transition.beats = float(transition_beats)
    if rollback_seconds is not None:
        change.rollback.margin_seconds = float(rollback_seconds)
    if at is not None:
        change.at.CopyFrom(at.to_pb())
    if transition_seconds is not None and transition_frames is not None:
        raise ValueError("give transition_seconds or transition_frames, not both")
    if transition_seconds is not None:
        change.transition.seconds = float(transition_seconds)
    if transition_frames is not None:
        change.transition.frames = int(transition_frames)
    if text is not None and prompts is not None:
        raise ValueError("give text or prompts, not both")
    if text is not None:
        change.text = text
    if prompts is not None:
        change.prompts.extend(weighted_prompts(prompts))
    if not sampling.is_empty():
        change.sampling.CopyFrom(sampling.to_pb())
    return pb.SessionRequest(set_prompt=change)


def append_audio_requests(samples: np.ndarray, sample_rate: int, replace_context: bool,
                          max_message_bytes: int, at: At | None = None) -> Iterator[pb.SessionRequest]:
    """One append as AppendAudio messages each under the size limit: all but the last are `partial`."""
    audio = as_audio(samples, "append_audio")
    if not 8000 <= int(sample_rate) <= 192000:
        raise ValueError(f"append_audio.sample_rate: must be in [8000, 192000] Hz, got {sample_rate}")
    bytes_per_sample = 4 * audio.shape[1]
    per_part = max(1, (max_message_bytes - _MESSAGE_OVERHEAD_BYTES) // bytes_per_sample)
    starts = range(0, audio.shape[0], per_part)
    for index, start in enumerate(starts):
        part = audio[start:start + per_part]
        append = pb.AppendAudio(audio=audio_data(part, sample_rate), partial=index < len(starts) - 1,
                                replace_context=replace_context)
        if at is not None and not append.partial:
            append.at.CopyFrom(at.to_pb())
        yield pb.SessionRequest(append_audio=append)


REQUEST_RESUME = pb.SessionRequest(resume=pb.Resume())


def pause_request(at: At | None = None) -> pb.SessionRequest:
    return pb.SessionRequest(pause=pb.Pause(at=at.to_pb()) if at is not None else pb.Pause())


def stop_request(at: At | None = None) -> pb.SessionRequest:
    return pb.SessionRequest(stop=pb.Stop(at=at.to_pb()) if at is not None else pb.Stop())


def ack_request(samples_played: int) -> pb.SessionRequest:
    return pb.SessionRequest(ack=pb.Ack(samples_played=int(samples_played)))
