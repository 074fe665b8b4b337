"""Typed, protobuf-free views of what the server sends: Started, AudioChunk, Notice, Finished, ModelInfo.

`from_pb` converts one `SessionEvent`; audio arrives as a float32 numpy array (samples, channels) whatever the
wire encoding was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum

import numpy as np

from musicgen.v1 import musicgen_pb2 as pb


class Encoding(str, Enum):
    """PCM layout on the wire (little-endian, channels interleaved)."""

    FLOAT32 = "float32"
    INT16 = "int16"

    @property
    def to_pb(self) -> int:
        return pb.AUDIO_ENCODING_INT16_LE if self is Encoding.INT16 else pb.AUDIO_ENCODING_FLOAT32_LE

    @classmethod
    def from_pb(cls, value: int) -> "Encoding":
        return cls.INT16 if value == pb.AUDIO_ENCODING_INT16_LE else cls.FLOAT32


class NoticeKind(str, Enum):
    PROMPT_APPLIED = "prompt_applied"
    CONTEXT_REPRIMED = "context_reprimed"
    AUDIO_APPENDED = "audio_appended"
    PAUSED = "paused"
    RESUMED = "resumed"
    SERVER_DRAINING = "server_draining"
    TRANSITION_ENDED = "transition_ended"
    OTHER = "other"  # an enum value newer than this client


class FinishReason(str, Enum):
    COMPLETED = "completed"
    STOPPED = "stopped"
    SERVER_SHUTDOWN = "server_shutdown"
    ERROR = "error"
    OTHER = "other"


_NOTICE_KINDS = {pb.NOTICE_KIND_PROMPT_APPLIED: NoticeKind.PROMPT_APPLIED,
                 pb.NOTICE_KIND_CONTEXT_REPRIMED: NoticeKind.CONTEXT_REPRIMED,
                 pb.NOTICE_KIND_AUDIO_APPENDED: NoticeKind.AUDIO_APPENDED,
                 pb.NOTICE_KIND_PAUSED: NoticeKind.PAUSED, pb.NOTICE_KIND_RESUMED: NoticeKind.RESUMED,
                 pb.NOTICE_KIND_SERVER_DRAINING: NoticeKind.SERVER_DRAINING,
                 pb.NOTICE_KIND_TRANSITION_ENDED: NoticeKind.TRANSITION_ENDED}
_FINISH_REASONS = {pb.FINISH_REASON_COMPLETED: FinishReason.COMPLETED, pb.FINISH_REASON_STOPPED: FinishReason.STOPPED,
                   pb.FINISH_REASON_SERVER_SHUTDOWN: FinishReason.SERVER_SHUTDOWN,
                   pb.FINISH_REASON_ERROR: FinishReason.ERROR}


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None = the server's default (or, in `set_prompt`, keep the current value)."""

    guidance_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool | None = None
    seed: int | None = None

    def to_pb(self) -> pb.Sampling:
        return pb.Sampling(**{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})

    @classmethod
    def from_pb(cls, message: pb.Sampling) -> "Sampling":
        return cls(**{f.name: getattr(message, f.name) if message.HasField(f.name) else None for f in fields(cls)})

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


@dataclass(frozen=True)
class Started:
    """The session is open: the format and settings the server actually uses (every default resolved)."""

    session_id: str
    sample_rate: int
    channels: int
    encoding: Encoding
    frame_rate: float
    samples_per_frame: float  # output samples per frame (640 at 32 kHz, 960 at 48 kHz)
    latency_samples: int  # algorithmic latency in output samples (codebook delay + decoder lookahead + resampler)
    codebook_delay_samples: int
    decoder_lookahead_samples: int
    resampler_samples: int
    chunk_samples: int
    chunk_frames: int
    context_frames: int
    reprime_keep_frames: int
    sampling: Sampling
    decoder_lookahead_frames: int
    exact_decoding: bool
    max_lead_seconds: float  # 0 when unpaced
    unpaced: bool
    duration_frames: int | None  # None = unbounded
    audio_prompt_frames: int
    prompt: str
    paused: bool
    prompts: tuple[tuple[str, float], ...] = ()  # (text, normalised weight) in effect at the start
    first_sample: int = 0  # where the first chunk starts: a resumed session's StartOptions.resume_at_sample

    @property
    def duration_samples(self) -> int | None:
        return None if self.duration_frames is None else round(self.duration_frames * self.samples_per_frame)


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """A contiguous piece of the session's output: `audio` covers samples [start_sample, end_sample)."""

    sequence: int
    start_sample: int
    first_frame: int
    frame_count: int
    audio: np.ndarray  # (samples, channels) float32, nominal range [-1, 1]
    prompt: str
    prompt_revision: int
    sampling: Sampling
    codes: np.ndarray | None = None  # (frames, codebooks) int64, with return_codes only
    realtime_factor: float = 0.0  # the session's running real-time factor on the server (0: not yet measured)
    prompts: tuple[tuple[str, float], ...] = ()  # (text, normalised weight) of that revision

    @property
    def sample_count(self) -> int:
        return self.audio.shape[0]

    @property
    def end_sample(self) -> int:
        return self.start_sample + self.audio.shape[0]


@dataclass(frozen=True)
class Retracted:
    """The audio from output sample `sample` (frame `frame`) on is withdrawn: drop what was buffered from
    there; the next chunk starts at `sample` again (a SetPrompt with rollback)."""

    frame: int
    sample: int


@dataclass(frozen=True)
class Notice:
    """Something changed in the session at `frame` (= output sample `sample`)."""

    kind: NoticeKind
    frame: int
    sample: int
    prompt_revision: int
    message: str


@dataclass(frozen=True)
class SessionStats:
    steps: int = 0
    mean_step_ms: float = 0.0
    max_step_ms: float = 0.0
    mean_batch_sessions: float = 0.0
    mean_decode_ms_per_frame: float = 0.0
    wall_seconds: float = 0.0
    waiting_seconds: float = 0.0
    realtime_factor: float = 0.0
    reprimes: int = 0


@dataclass(frozen=True)
class Finished:
    """The last event: why the session ended and how much audio was sent in total."""

    reason: FinishReason
    total_frames: int
    total_samples: int
    message: str
    stats: SessionStats = field(default_factory=SessionStats)


@dataclass(frozen=True)
class ModelInfo:
    """The served model, its format, and the server's limits and defaults."""

    model_name: str
    sample_rate: int
    channels: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int
    samples_per_frame: int
    max_context_frames: int
    default_reprime_keep_frames: int
    exact_decoder_lookahead_frames: int
    max_sessions: int
    active_sessions: int
    supported_output_sample_rates: tuple[int, ...]
    max_text_tokens: int
    max_message_bytes: int
    max_audio_prompt_seconds: float
    default_chunk_frames: int
    max_chunk_frames: int
    default_max_lead_seconds: float
    max_lead_seconds: float
    max_duration_seconds: float
    stall_timeout_seconds: float  # a session waiting at its lead this long with no ack ends (DEADLINE_EXCEEDED)
    unpaced_lead_seconds: float
    engine_realtime_factor: float  # the server's headroom: > 1 keeps up (0 before its first step)
    max_prompts: int  # most weighted prompts a session may have at once
    default_sampling: Sampling
    server_version: str
    device: str
    dtype: str

    @classmethod
    def from_pb(cls, message: pb.ModelInfo) -> "ModelInfo":
        values = {f.name: getattr(message, f.name) for f in fields(cls)}
        values["supported_output_sample_rates"] = tuple(message.supported_output_sample_rates)
        values["default_sampling"] = Sampling.from_pb(message.default_sampling)
        return cls(**values)


Event = Started | AudioChunk | Notice | Retracted | Finished


class EventTracker:
    """What a stream's events have told so far, kept the same way by every client object (blocking and
    asyncio generations and sessions): Started, Finished, the notices, the samples received. A live session,
    which may run for ever, does not keep its notices (its reader gets each one as an event)."""

    keeps_notices = True

    def __init__(self) -> None:
        self.started: Started | None = None
        self.finished: Finished | None = None
        self.notices: list[Notice] = []
        self.samples_received = 0  # output samples per channel in the chunks received so far

    def track(self, event: "Event | None") -> None:
        if isinstance(event, AudioChunk):
            self.samples_received = event.end_sample
        elif isinstance(event, Started):
            self.started = event
            self.samples_received = event.first_sample  # a resumed session's numbering goes on from there
        elif isinstance(event, Retracted):
            self.samples_received = min(self.samples_received, event.sample)
        elif isinstance(event, Notice) and self.keeps_notices:
            self.notices.append(event)
        elif isinstance(event, Finished):
            self.finished = event

    def has_every_frame(self, chunk: AudioChunk) -> bool:
        """Does this chunk end a finite stream (every frame received)?"""
        total = self.started.duration_frames if self.started else None
        first = round(self.started.first_sample / self.started.samples_per_frame) if self.started else 0
        return total is not None and chunk.first_frame + chunk.frame_count - first >= total


def decode_interleaved_pcm(pcm: bytes, encoding: Encoding, channels: int) -> np.ndarray:
    """Interleaved little-endian bytes -> (samples, channels) float32. int16 is divided by 32767, the inverse of
    the server's encoding (full scale 32767), so int16 -> float -> `encode_interleaved_pcm` is lossless."""
    if encoding is Encoding.INT16:
        return (np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0).reshape(-1, channels)
    return np.frombuffer(pcm, dtype="<f4").astype(np.float32).reshape(-1, channels)


def encode_interleaved_pcm(audio: np.ndarray, encoding: Encoding = Encoding.FLOAT32) -> bytes:
    """(samples, channels) float -> interleaved little-endian bytes (int16: x 32767, rounded and clipped)."""
    if encoding is Encoding.INT16:
        return np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2").tobytes()
    return np.ascontiguousarray(audio, dtype="<f4").tobytes()


def _prompts_from_pb(entries) -> tuple[tuple[str, float], ...]:
    return tuple((entry.text, entry.weight) for entry in entries)


def started_from_pb(message: pb.Started) -> Started:
    latency = message.latency
    return Started(
        session_id=message.session_id, sample_rate=message.output.sample_rate, channels=message.output.channels or 1,
        encoding=Encoding.from_pb(message.output.encoding), frame_rate=message.frame_rate,
        samples_per_frame=message.samples_per_frame, latency_samples=message.latency_samples,
        codebook_delay_samples=latency.codebook_delay_samples,
        decoder_lookahead_samples=latency.decoder_lookahead_samples, resampler_samples=latency.resampler_samples,
        chunk_samples=latency.chunk_samples, chunk_frames=message.chunk_frames, context_frames=message.context_frames,
        reprime_keep_frames=message.reprime_keep_frames, sampling=Sampling.from_pb(message.sampling),
        decoder_lookahead_frames=message.decoder_lookahead_frames, exact_decoding=message.exact_decoding,
        max_lead_seconds=message.max_lead_seconds, unpaced=message.unpaced,
        duration_frames=message.duration_frames if message.HasField("duration_frames") else None,
        audio_prompt_frames=message.audio_prompt_frames, prompt=message.prompt, paused=message.paused,
        prompts=_prompts_from_pb(message.prompts), first_sample=message.first_sample)


def from_pb(message: pb.SessionEvent, started: Started | None) -> Event | None:
    """One SessionEvent as a typed event; None for a member this client does not know (ignored)."""
    kind = message.WhichOneof("event")
    if kind == "started":
        return started_from_pb(message.started)
    if kind == "audio":
        chunk = message.audio
        channels = started.channels if started else 1
        encoding = started.encoding if started else Encoding.FLOAT32
        codes = None
        if chunk.codes:
            codes = np.asarray(chunk.codes, dtype=np.int64).reshape(max(chunk.frame_count, 1), -1)
        return AudioChunk(sequence=chunk.sequence, start_sample=chunk.start_sample, first_frame=chunk.first_frame,
                          frame_count=chunk.frame_count, audio=decode_interleaved_pcm(chunk.pcm, encoding, channels),
                          prompt=chunk.prompt, prompt_revision=chunk.prompt_revision,
                          sampling=Sampling.from_pb(chunk.sampling), codes=codes,
                          realtime_factor=chunk.realtime_factor, prompts=_prompts_from_pb(chunk.prompts))
    if kind == "notice":
        notice = message.notice
        return Notice(kind=_NOTICE_KINDS.get(notice.kind, NoticeKind.OTHER), frame=notice.frame, sample=notice.sample,
                      prompt_revision=notice.prompt_revision, message=notice.message)
    if kind == "retracted":
        return Retracted(frame=message.retracted.frame, sample=message.retracted.sample)
    if kind == "finished":
        done = message.finished
        stats = SessionStats(**{f.name: getattr(done.stats, f.name) for f in fields(SessionStats)})
        return Finished(reason=_FINISH_REASONS.get(done.reason, FinishReason.OTHER), total_frames=done.total_frames,
                        total_samples=done.total_samples, message=done.message, stats=stats)
    return None
