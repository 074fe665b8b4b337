"""The blocking client: `MusicGenClient`, one-shot `Generation`s and steerable `LiveSession`s.

A live session's requests go through a thread-safe queue that gRPC's request iterator drains, so any thread
may steer (`set_prompt`, `append_audio`, `ack`, `pause`, `resume`, `stop`) while another iterates the events.
The request stream stays open until the session finishes or is closed: the protocol reads a half-close as stop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from musicgen.v1 import musicgen_pb2 as pb
from musicgen.v1 import musicgen_pb2_grpc as pb_grpc

from . import requests as rq
from .connection import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, Connection
from .errors import MusicGenError, from_rpc_error
from .events import AudioChunk, Event, EventTracker, Finished, ModelInfo, Sampling, Started, from_pb
from .requests import StartOptions, start_message

_END = object()  # ends the request stream (half-close)


class SessionControl(EventTracker):
    """Steering shared by the blocking and the asyncio session. Every method only queues a request, so it
    returns at once and may be called from any thread (or task) while audio flows.

    The request stream is closed (half-close) as soon as nothing more can usefully be sent: after stop(),
    once every frame of a finite session has arrived, and at Finished. A request written after the server has
    ended the call would otherwise race its status (grpc.aio turns such a failed write into INTERNAL)."""

    _max_message_bytes: int
    keeps_notices = False

    def __init__(self) -> None:
        super().__init__()
        self.samples_acked = 0
        self.tempo: rq.Tempo | None = None  # the session tempo sent (start or set_tempo), for bars and beats
        self._ack_lock = threading.Lock()
        self._requests_open = True

    def _enqueue(self, item: object) -> None:
        raise NotImplementedError

    def _send(self, request: object) -> None:
        if self._requests_open:
            self._enqueue(request)

    def _end_requests(self) -> None:
        """Half-close the request stream (idempotent)."""
        if self._requests_open:
            self._requests_open = False
            self._enqueue(_END)

    def set_prompt(self, text: str | None = None, *, prompts: rq.PromptWeights | None = None,
                   transition_seconds: float | None = None, transition_frames: int | None = None,
                   guidance_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, greedy: bool | None = None, seed: int | None = None,
                   at: rq.At | None = None, rollback_seconds: float | None = None,
                   transition_beats: float | None = None) -> None:
        """New text prompt (None keeps the current one, "" is unconditional), or `prompts`, several texts with
        weights ({text: weight} or [(text, weight)]; the server normalises them to sum 1), and/or sampling
        fields (None keeps each); applies from the next decoder step. A Notice(PROMPT_APPLIED) reports the
        frame. transition_seconds / transition_frames / transition_beats (of the session tempo): move the
        weights to the new prompts linearly over that long instead of at once; Notice(TRANSITION_ENDED) reports
        the first frame under the new ones alone.
        at: when it lands (`At.bar(8)`, `At.next_bar()`, `At.sample(n)`, ...; None = the next step).
        rollback_seconds: instant steering: land this long after what was last acked as played, rolling back
        audio already sent (a Retracted event says from which sample; a Player drops it from its buffer)."""
        sampling = Sampling(guidance_scale, temperature, top_k, top_p, greedy, seed)
        self._send(rq.set_prompt_request(text, sampling, prompts, transition_seconds, transition_frames, at,
                                         rollback_seconds, transition_beats))

    def append_audio(self, samples: np.ndarray, sample_rate: int, replace_context: bool = False,
                     at: rq.At | None = None) -> None:
        """Continue from this audio ((samples,) or (samples, channels) float in [-1, 1], or int16), e.g. the bar
        a host just looped. Sent as `partial` parts under the message-size limit; Notice(AUDIO_APPENDED)
        reports the frame generation follows it from. replace_context: it alone becomes the context. at: when."""
        for request in rq.append_audio_requests(samples, sample_rate, replace_context, self._max_message_bytes, at):
            self._send(request)

    def ack(self, samples_played: int) -> None:
        """Report playback: total output samples per channel played so far. Drives the server's pacing.
        Values not above the last ack are dropped; values beyond what was received are clamped."""
        with self._ack_lock:
            samples = min(int(samples_played), self.samples_received)
            if samples <= self.samples_acked:
                return
            self.samples_acked = samples
        self._send(rq.ack_request(samples))

    def pause(self, at: rq.At | None = None) -> None:
        """Stop generating after the current step, or at `at` (audio already made still arrives);
        Notice(PAUSED)."""
        self._send(rq.pause_request(at))

    def resume(self) -> None:
        """Continue after pause (or a start_paused session); Notice(RESUMED)."""
        self._send(rq.REQUEST_RESUME)

    def stop(self, at: rq.At | None = None) -> None:
        """End the session: the server sends the remaining audio, then Finished(STOPPED). Nothing more can be
        sent after it. at: end there instead (the output ends at that frame); acks and steering go on until."""
        self._send(rq.stop_request(at))
        if at is None:
            self._end_requests()

    def set_tempo(self, bpm: float, beats_per_bar: int = 4, beat_one_sample: int = 0) -> None:
        """The session's tempo, for steering at bars and beats from here on (`tempo` keeps the latest)."""
        self.tempo = rq.Tempo(bpm, beats_per_bar, beat_one_sample)
        self._send(pb.SessionRequest(set_tempo=self.tempo.to_pb()))

    def earliest_schedulable_sample(self) -> int:
        """The first output sample a scheduled command (`at=`) can name that the server cannot have generated
        yet (an earlier one ends the session with FAILED_PRECONDITION). Paced, a bound: the server sends at most
        its lead past the acks, holds up to a chunk more than it sent and generates its latency beyond that.
        Unpaced, an estimate: what arrived plus the latency, two chunks and a second of generation."""
        started = self.started
        slack = started.latency_samples + 2 * started.chunk_samples + started.samples_per_frame
        if started.unpaced:
            return self.samples_received + slack + started.sample_rate
        return self.samples_acked + round(started.max_lead_seconds * started.sample_rate) + slack

    def _track(self, event: Event) -> None:
        self.track(event)
        if isinstance(event, AudioChunk) and self.has_every_frame(event):
            self._end_requests()  # every frame is here: the server is finishing
        elif isinstance(event, Finished):
            self._end_requests()

    @property
    def sample_rate(self) -> int:
        return self.started.sample_rate

    @property
    def channels(self) -> int:
        return self.started.channels


class LiveSession(SessionControl):
    """A live session (blocking). Iterate it for events (Started first, then AudioChunk and Notice, Finished
    last); steer it from any thread. `close()` (or leaving a `with` block) cancels it at once."""

    def __init__(self, stub: pb_grpc.MusicGenStub, connection: Connection, start: pb.StartSession,
                 timeout: float | None):
        super().__init__()
        self._max_message_bytes = connection.max_message_bytes
        self._target = connection.target
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(pb.SessionRequest(start=start))
        if start.HasField("tempo"):
            self.tempo = rq.Tempo(start.tempo.bpm, start.tempo.beats_per_bar, start.tempo.beat_one_sample)
        self._closed = False
        self._call = stub.Session(self._request_stream(), metadata=connection.metadata, timeout=timeout)
        first = self._next()  # the server's verdict on the start: Started, or an error status
        if not isinstance(first, Started):
            self.close()
            raise MusicGenError(f"expected Started as the first event, got {first!r}")
        self._pending: list[Event] = [first]

    def _request_stream(self) -> Iterator[pb.SessionRequest]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def _enqueue(self, item: object) -> None:
        self._requests.put(item)

    def _next(self) -> Event | None:
        """The next event, None at the end of the stream; gRPC errors become client exceptions."""
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                self._end_requests()
                return None
            except grpc.RpcError as error:
                self._end_requests()  # releases gRPC's request thread
                if self._closed and error.code() == grpc.StatusCode.CANCELLED:
                    return None
                raise from_rpc_error(error, self._target) from None
            event = from_pb(message, self.started)
            if event is not None:
                self._track(event)
                return event

    def __iter__(self) -> Iterator[Event]:
        """The session's events, in order. One consumer at a time."""
        while self._pending:
            yield self._pending.pop(0)
        while (event := self._next()) is not None:
            yield event

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def chunks(self) -> Iterator[AudioChunk]:
        """Only the audio chunks of the session (other events still update started/finished)."""
        return (event for event in self if isinstance(event, AudioChunk))

    def close(self) -> None:
        """Cancel the session now (no more events; the server frees it at once). Idempotent."""
        if not self._closed:
            self._closed = True
            self._call.cancel()
            self._end_requests()

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Generation(EventTracker):
    """A one-shot generation (blocking): iterate it for AudioChunks; `started`, `notices` and `finished` fill
    in as the stream goes. `audio()` collects everything as one (samples, channels) array."""

    def __init__(self, call, target: str):
        super().__init__()
        self._call = call
        self._target = target
        self._cancelled = False
        first = self._next()
        if not isinstance(first, Started):
            raise MusicGenError(f"expected Started as the first event, got {first!r}")
        self.started = first

    def _next(self) -> Event | None:
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                return None
            except grpc.RpcError as error:
                if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                    return None
                raise from_rpc_error(error, self._target) from None
            event = from_pb(message, self.started)
            self.track(event)
            if isinstance(event, (Started, AudioChunk)):
                return event

    def __iter__(self) -> Iterator[AudioChunk]:
        while (event := self._next()) is not None:
            yield event

    def audio(self) -> np.ndarray:
        """All (remaining) audio as one (samples, channels) float32 array."""
        parts = [chunk.audio for chunk in self]
        return np.concatenate(parts) if parts else np.zeros((0, self.started.channels), np.float32)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class MusicGenClient:
    """Blocking client of a MusicGen server.

    target: "host:port". TLS: `secure=True` (system roots) or `root_certificates` (PEM bytes or a file path;
    implies TLS); `tls_server_name` overrides the name checked in the server's certificate. token: sent as
    `authorization: Bearer <token>` on every call. timeout: seconds for unary calls (model_info);
    stream_timeout: a deadline for whole sessions and generations (None: none). max_message_bytes: the
    server's message limit, under which appended audio is split.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, secure: bool = False,
                 root_certificates: bytes | str | Path | None = None, token: str | None = None,
                 timeout: float | None = 10.0, stream_timeout: float | None = None,
                 tls_server_name: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel_options: tuple[tuple[str, object], ...] = ()):
        self.connection = Connection.build(target, secure=secure, root_certificates=root_certificates, token=token,
                                           tls_server_name=tls_server_name, max_message_bytes=max_message_bytes,
                                           options=channel_options)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._channel = self.connection.channel()
        self._stub = pb_grpc.MusicGenStub(self._channel)

    @property
    def target(self) -> str:
        return self.connection.target

    def model_info(self) -> ModelInfo:
        """The served model, its audio format, and the server's limits and defaults."""
        try:
            reply = self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.connection.metadata,
                                            timeout=self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.target) from None
        return ModelInfo.from_pb(reply)

    def generate(self, prompt: str = "", options: StartOptions | None = None, **fields) -> Generation:
        """Generate audio as fast as the server can; returns once the server has accepted the request (bad
        parameters raise InvalidArgument here). Iterate the result for AudioChunks.

        options: a StartOptions; keyword fields (any of StartOptions': seconds or frames, sampling as a Sampling
        or a dict of its fields, chunk_frames, sample_rate 0 / 44100 / 48000, encoding "float32" or "int16" on
        the wire, lookahead, audio_prompt with audio_prompt_rate, return_codes, ...) replace its own.
        """
        request = pb.GenerateRequest(request=start_message(prompt, options, fields, self.connection.max_message_bytes))
        call = self._stub.Generate(request, metadata=self.connection.metadata, timeout=self.stream_timeout)
        return Generation(call, self.target)

    def open_session(self, prompt: str = "", options: StartOptions | None = None, **fields) -> LiveSession:
        """Open a live session and wait for its Started event (bad parameters raise InvalidArgument, a full
        server ResourceExhausted). Options as for `generate`, plus pacing: max_lead_seconds (how far the server
        may run ahead of your acks; 0 = its default, 2 s), unpaced, start_paused; seconds/frames unset =
        unbounded (until stop or close)."""
        failover = fields.pop("failover", False)
        failover_seconds = fields.pop("failover_seconds", 10.0)
        start = start_message(prompt, options, fields, self.connection.max_message_bytes)
        if failover:  # resume on another replica when the stream breaks (client/failover.py)
            from .failover import FailoverSession
            return FailoverSession(self, start, failover_seconds)
        return self._open(start)

    def _open(self, start: pb.StartSession) -> LiveSession:
        return LiveSession(self._stub, self.connection, start, self.stream_timeout)

    @classmethod
    def replicas(cls, addresses: list[str] | str, **options) -> "MusicGenClient":
        """A client over several server replicas ("host:port" addresses, or one name resolving to several):
        gRPC balances new calls round-robin over the healthy ones (grpc.health.v1); open sessions with
        `failover=True` to have them resume elsewhere when their replica goes."""
        from .failover import SERVICE_CONFIG, replica_target
        return cls(replica_target(addresses), channel_options=(("grpc.service_config", SERVICE_CONFIG),
                                                                ("grpc.enable_retries", 0)), **options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MusicGenClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
