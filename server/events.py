"""What a session asks for and what it emits, as plain dataclasses (the transport converts them to protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from musicgen_core import SamplingParams, WeightedPrompts

from .timeline import Tempo


class SpecError(ValueError):
    """A request value out of range; `field` names it (the transport answers INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class SessionLimitError(RuntimeError):
    """No room for another session (RESOURCE_EXHAUSTED)."""


class ServerClosingError(RuntimeError):
    """The server is shutting down (UNAVAILABLE)."""


class Encoding(Enum):
    FLOAT32 = "float32"
    INT16 = "int16"


@dataclass(frozen=True)
class ResumeFrom:
    """A session continued from its codes: frames [first_frame - n, first_frame) (codebooks, n) int64."""

    codes: np.ndarray
    first_frame: int
    first_sample: int  # first_frame x the output's samples per frame


@dataclass(frozen=True)
class SessionSpec:
    text: str | None  # None or '' = unconditional; `prompts` instead for several weighted texts
    params: SamplingParams
    total_frames: int | None = None  # new frames to generate; None = unbounded
    audio_prompt: np.ndarray | None = None  # (channels, samples) float32 at the model's rate
    chunk_frames: int = 10
    output_rate: int = 0  # 0 = the model's rate
    output_channels: int = 0  # 0 = the model's; 1 averages a stereo model, 2 duplicates a mono one
    encoding: Encoding = Encoding.FLOAT32
    lookahead_frames: float | None = None  # None = exact decoding
    max_lead_seconds: float | None = 2.0  # None = as fast as possible (no pacing by acks)
    # Unpaced: the most audio sent beyond what the transport reports delivered (acks it on delivery), so a
    # client that stops reading holds its session instead of growing the server's buffers. None = no limit.
    delivery_lead_seconds: float | None = None
    client_name: str = ""
    context_frames: int = 0  # 0 = the engine's window
    reprime_keep_frames: int = 0  # 0 = the engine's default
    start_paused: bool = False
    prompts: WeightedPrompts | None = None  # several texts with weights (text is then None)
    tempo: Tempo | None = None  # for commands scheduled at bars and beats
    resume: ResumeFrom | None = None  # continue from these codes (another replica's session)

    @property
    def weighted_prompts(self) -> WeightedPrompts:
        return self.prompts if self.prompts is not None else WeightedPrompts.single(self.text)


@dataclass(frozen=True)
class Started:
    """Every sample count is at the session's output rate, as on the wire."""

    session_id: str
    sample_rate: int  # the output rate
    channels: int  # the model's
    encoding: Encoding
    frame_rate: int
    samples_per_frame: int
    latency_samples: int  # algorithmic latency: the three parts below
    latency_codebook_delay_samples: int
    latency_decoder_lookahead_samples: int
    latency_resampler_samples: int
    context_frames: int
    reprime_keep_frames: int
    prompt_frames: int
    exact_decoding: bool
    lookahead_frames: int
    paused: bool
    first_frame: int = 0  # a resumed session's first frame (its first sample: first_frame x samples_per_frame)


@dataclass(frozen=True)
class AudioChunk:
    sequence: int
    start_sample: int  # per channel, at the output rate, continuous from 0
    first_frame: int  # frames whose codes fed this chunk (generated frames, session numbering)
    frame_count: int
    pcm: np.ndarray  # (channels, samples) float32
    codes: np.ndarray  # (codebooks, frame_count) int64: the frames this chunk fed to the codec
    prompt: str  # the text, or `text=weight | ...` for weighted prompts
    prompt_revision: int
    params: SamplingParams
    realtime_factor: float | None = None  # the session's running figure when sent (headroom.py)
    prompts: WeightedPrompts | None = None  # the texts and normalised weights in effect


@dataclass(frozen=True)
class Retracted:
    """The audio sent from `sample` (frame `frame`) on is withdrawn: it is generated again (a rollback)."""

    frame: int
    sample: int


class NoticeKind(Enum):
    PROMPT_APPLIED = "prompt_applied"
    CONTEXT_REPRIMED = "context_reprimed"
    AUDIO_APPENDED = "audio_appended"
    PAUSED = "paused"
    RESUMED = "resumed"
    TRANSITION_ENDED = "transition_ended"
    SERVER_DRAINING = "server_draining"


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    frame: int
    message: str
    revision: int = 0  # the prompt revision in effect from `frame` on


class FinishReason(Enum):
    COMPLETED = "completed"
    STOPPED = "stopped"
    SERVER_SHUTDOWN = "server_shutdown"
    CANCELLED = "cancelled"
    ERROR = "error"


class Failure(Enum):
    """Why a session finished with ERROR, so the transport can pick the status."""

    INTERNAL = "internal"  # a server bug
    REQUEST = "request"  # a bad request: the transport that found it knows the status
    STALLED = "stalled"  # held at its lead with no ack (paced) or no read (unpaced) for the stall timeout
    TOO_LATE = "too_late"  # a command scheduled at a frame already generated
    TOO_MANY = "too_many"  # more scheduled commands than a session keeps


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    total_frames: int
    total_samples: int
    steps: int
    mean_step_ms: float
    message: str = ""
    stats: "SessionStats | None" = None
    failure: Failure | None = None  # set when reason is ERROR


Event = Started | AudioChunk | Notice | Retracted | Finished


@dataclass
class SessionStats:
    steps: int = 0
    step_seconds: float = 0.0  # wall time of the decoder steps this session took part in
    max_step_seconds: float = 0.0
    batch_sessions: int = 0  # sum over steps of the sessions stepped together
    decode_seconds: float = 0.0  # streaming codec time
    frames: int = 0
    samples: int = 0
    reprimes: int = 0
    wall_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
