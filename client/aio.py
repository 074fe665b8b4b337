"""The asyncio client: `AsyncMusicGenClient`, `AsyncGeneration`, `AsyncLiveSession`.

GetModelInfo and Generate run on grpc.aio; live sessions on a blocking call bridged to the loop (see
AsyncLiveSession for why). Steering methods are plain (non-async) calls that only queue a request, so any task,
callback or thread may call them while a task iterates the events (`async for event in session`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from musicgen.v1 import musicgen_pb2 as pb
from musicgen.v1 import musicgen_pb2_grpc as pb_grpc

from .connection import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, Connection
from .errors import MusicGenError, from_rpc_error
from .events import AudioChunk, Event, EventTracker, Finished, ModelInfo, Started, from_pb
from .requests import At, PromptWeights, StartOptions, start_message
from .session import LiveSession

_SKIP = object()
_END = object()


async def _read(call, target: str, cancelled: bool, started: Started | None) -> Event | None | object:
    """One converted event from an aio stream: None at its end (or after our own cancel), _SKIP for an event
    member this client does not know; gRPC errors become client exceptions."""
    try:
        message = await call.read()
    except asyncio.CancelledError:
        if cancelled:
            return None
        raise
    except grpc.aio.AioRpcError as error:
        if cancelled and error.code() == grpc.StatusCode.CANCELLED:
            return None
        raise from_rpc_error(error, target) from None
    if message is grpc.aio.EOF:
        return None
    event = from_pb(message, started)
    return _SKIP if event is None else event


class AsyncLiveSession:
    """A live session (asyncio). `async for event in session`: Started, then AudioChunk and Notice, Finished
    last. Steer from any task or thread (the methods only queue a request and return at once); `close()` (or
    leaving `async with`) cancels it.

    The bidirectional stream runs on a blocking gRPC call (a `LiveSession`) whose events a reader thread hands
    to the event loop through a bounded asyncio.Queue. grpc.aio is not used for this one RPC: when a request
    is written after the server has ended the call (an ack racing the server's own end of a finite session,
    which a client cannot rule out), grpc.aio replaces the call's OK status with INTERNAL and drops the
    events not yet read, Finished included (20 of 20 short sessions failed that way here); the blocking API
    ignores such a write.
    """

    def __init__(self, live: LiveSession, loop: asyncio.AbstractEventLoop, queue_events: int = 64):
        self._live = live
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue(queue_events)
        self._reader = threading.Thread(target=self._read, name="musicgen-session-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Reader thread: the blocking iteration, each event (then an end marker) put on the loop's queue,
        waiting while the queue is full (back-pressure, as a blocking reader would give)."""
        item: object = _END
        try:
            for event in self._live:
                if not self._hand_over(event):
                    return
        except BaseException as error:  # a MusicGenError: re-raised in the consumer
            item = error
        self._hand_over(item)

    def _hand_over(self, item: object) -> bool:
        try:
            future = asyncio.run_coroutine_threadsafe(self._events.put(item), self._loop)
            while True:
                try:
                    future.result(timeout=0.5)
                    return True
                except concurrent.futures.TimeoutError:
                    if self._live.closed or self._loop.is_closed():
                        future.cancel()
                        return False
        except Exception:  # the loop is closed or gone: nobody is listening any more
            self._live.close()
            return False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            item = await self._events.get()
            if item is _END:
                self._events.put_nowait(_END)  # later iterations end at once too
                return
            if isinstance(item, BaseException):
                self._events.put_nowait(_END)
                raise item
            yield item

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """Only the audio chunks (other events still update started/finished)."""
        async for event in self:
            if isinstance(event, AudioChunk):
                yield event

    # -- steering and state: those of LiveSession, safe from any task or thread ------------------------------

    def set_prompt(self, text: str | None = None, *, prompts: PromptWeights | None = None,
                   transition_seconds: float | None = None, transition_frames: int | None = None,
                   guidance_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, greedy: bool | None = None, seed: int | None = None,
                   at: At | None = None, rollback_seconds: float | None = None,
                   transition_beats: float | None = None) -> None:
        """See `LiveSession.set_prompt`."""
        self._live.set_prompt(text, prompts=prompts, transition_seconds=transition_seconds,
                              transition_frames=transition_frames, guidance_scale=guidance_scale,
                              temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed, at=at,
                              rollback_seconds=rollback_seconds, transition_beats=transition_beats)

    def append_audio(self, samples: np.ndarray, sample_rate: int, replace_context: bool = False,
                     at: At | None = None) -> None:
        """See `LiveSession.append_audio`."""
        self._live.append_audio(samples, sample_rate, replace_context, at)

    def ack(self, samples_played: int) -> None:
        """See `LiveSession.ack`."""
        self._live.ack(samples_played)

    def pause(self, at: At | None = None) -> None:
        self._live.pause(at)

    def resume(self) -> None:
        self._live.resume()

    def stop(self, at: At | None = None) -> None:
        """End the session: the remaining audio and Finished(STOPPED) still arrive."""
        self._live.stop(at)

    def set_tempo(self, bpm: float, beats_per_bar: int = 4, beat_one_sample: int = 0) -> None:
        self._live.set_tempo(bpm, beats_per_bar, beat_one_sample)

    def close(self) -> None:
        """Cancel the session now. Idempotent; safe from any thread."""
        self._live.close()

    @property
    def started(self) -> Started:
        return self._live.started

    @property
    def finished(self) -> Finished | None:
        return self._live.finished

    @property
    def samples_received(self) -> int:
        return self._live.samples_received

    @property
    def samples_acked(self) -> int:
        return self._live.samples_acked

    @property
    def sample_rate(self) -> int:
        return self._live.sample_rate

    @property
    def channels(self) -> int:
        return self._live.channels

    async def __aenter__(self) -> "AsyncLiveSession":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class AsyncGeneration(EventTracker):
    """A one-shot generation (asyncio): `async for chunk in generation`; `started`, `notices`, `finished`."""

    def __init__(self, call, target: str):
        super().__init__()
        self._call = call
        self._target = target
        self._cancelled = False

    async def _next(self) -> Event | None:
        while True:
            event = await _read(self._call, self._target, self._cancelled, self.started)
            if event is None:
                return None
            if event is not _SKIP:
                self.track(event)
                if isinstance(event, (Started, AudioChunk)):
                    return event

    async def _open(self) -> None:
        first = await self._next()
        if not isinstance(first, Started):
            raise MusicGenError(f"expected Started as the first event, got {first!r}")
        self.started = first

    async def __aiter__(self) -> AsyncIterator[AudioChunk]:
        while (event := await self._next()) is not None:
            yield event

    async def audio(self) -> np.ndarray:
        """All (remaining) audio as one (samples, channels) float32 array."""
        parts = [chunk.audio async for chunk in self]
        return np.concatenate(parts) if parts else np.zeros((0, self.started.channels), np.float32)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class AsyncMusicGenClient:
    """asyncio client of a MusicGen server; the arguments are those of `MusicGenClient`. Create it inside a
    running event loop (grpc.aio channels belong to one loop)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, secure: bool = False,
                 root_certificates: bytes | str | Path | None = None, token: str | None = None,
                 timeout: float | None = 10.0, stream_timeout: float | None = None,
                 tls_server_name: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.connection = Connection.build(target, secure=secure, root_certificates=root_certificates, token=token,
                                           tls_server_name=tls_server_name, max_message_bytes=max_message_bytes)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._channel = self.connection.aio_channel()
        self._stub = pb_grpc.MusicGenStub(self._channel)
        self._session_channel: grpc.Channel | None = None  # blocking, for Session: see AsyncLiveSession
        self._session_stub: pb_grpc.MusicGenStub | None = None

    @property
    def target(self) -> str:
        return self.connection.target

    async def model_info(self) -> ModelInfo:
        """The served model, its audio format, and the server's limits and defaults."""
        try:
            reply = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.connection.metadata,
                                                  timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, self.target) from None
        return ModelInfo.from_pb(reply)

    async def generate(self, prompt: str = "", options: StartOptions | None = None,
                       **fields) -> AsyncGeneration:
        """As `MusicGenClient.generate`; returns once the server accepted the request."""
        request = pb.GenerateRequest(request=start_message(prompt, options, fields, self.connection.max_message_bytes))
        call = self._stub.Generate(request, metadata=self.connection.metadata, timeout=self.stream_timeout)
        generation = AsyncGeneration(call, self.target)
        await generation._open()
        return generation

    async def open_session(self, prompt: str = "", options: StartOptions | None = None,
                           **fields) -> AsyncLiveSession:
        """As `MusicGenClient.open_session`; returns once Started has arrived."""
        start = start_message(prompt, options, fields, self.connection.max_message_bytes)
        if self._session_stub is None:
            self._session_channel = self.connection.channel()
            self._session_stub = pb_grpc.MusicGenStub(self._session_channel)
        live = await asyncio.to_thread(LiveSession, self._session_stub, self.connection, start, self.stream_timeout)
        return AsyncLiveSession(live, asyncio.get_running_loop())

    async def close(self) -> None:
        await self._channel.close()
        if self._session_channel is not None:
            self._session_channel.close()

    async def __aenter__(self) -> "AsyncMusicGenClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
