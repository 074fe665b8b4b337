"""The gRPC transport: convert, delegate to the engine, convert back. No model math here."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc
import numpy as np

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core.prompts import MAX_PROMPTS
from musicgen_core.quantize import quantization_backend

from . import convert
from .engine import Engine, SessionHandle
from .events import (Event, Failure, Finished, FinishReason, ServerClosingError, SessionLimitError, SessionSpec,
                     SpecError, Started)

log = logging.getLogger("musicgen.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MusicGen"].full_name
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
FAILURE_STATUS = {Failure.INTERNAL: grpc.StatusCode.INTERNAL, Failure.STALLED: grpc.StatusCode.DEADLINE_EXCEEDED,
                  Failure.REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
                  Failure.TOO_LATE: grpc.StatusCode.FAILED_PRECONDITION,
                  Failure.TOO_MANY: grpc.StatusCode.RESOURCE_EXHAUSTED}
HALF_CLOSE_WAIT_SECONDS = 2.0  # after Finished, how long the call waits for the client to half-close


class Undecodable:
    """A request whose bytes did not parse. The deserializer returns it instead of raising, so the handler
    answers INVALID_ARGUMENT (grpc itself would end the call with UNKNOWN, or stop reading a stream)."""

    def __init__(self, type_name: str, error: Exception):
        self.description = f"not a valid {type_name} ({error})"


def tolerant_parser(message_type) -> Callable[[bytes], object]:
    type_name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as error:  # DecodeError: corrupt wire format, bad UTF-8 in a string field, ...
            return Undecodable(type_name, error)

    return parse


def add_to_server(service: "MusicGenService", server: grpc.aio.Server) -> None:
    """Register the service with deserializers that never raise (see Undecodable)."""
    handlers = {
        "Session": grpc.stream_stream_rpc_method_handler(
            service.Session, request_deserializer=tolerant_parser(pb.SessionRequest),
            response_serializer=pb.SessionEvent.SerializeToString),
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=tolerant_parser(pb.GenerateRequest),
            response_serializer=pb.SessionEvent.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=tolerant_parser(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class MusicGenService:
    def __init__(self, engine: Engine, max_message_bytes: int, version: str = "0.1.0"):
        self.engine = engine
        self.model = engine.model
        self.max_message_bytes = max_message_bytes
        self.version = version

    # -- RPCs ---------------------------------------------------------------------------------------------

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        config, limits = self.model.config, self.engine.limits
        exact = convert.exact_lookahead_frames(self.model)
        return pb.ModelInfo(
            model_name=config.name, sample_rate=config.sampling_rate, channels=config.audio_channels,
            frame_rate=config.frame_rate, num_codebooks=config.decoder.num_codebooks,
            codebook_size=config.decoder.vocab_size, samples_per_frame=config.audio_encoder.hop_length,
            max_context_frames=limits.context_frames, default_reprime_keep_frames=limits.reprime_keep_frames,
            exact_decoder_lookahead_frames=exact, max_sessions=self.engine.config.max_sessions,
            active_sessions=self.engine.active_sessions,
            supported_output_sample_rates=sorted({config.sampling_rate, *convert.SUPPORTED_OUTPUT_RATES}),
            max_text_tokens=self.model.tokenizer.max_tokens, max_prompts=MAX_PROMPTS, max_message_bytes=self.max_message_bytes,
            max_audio_prompt_seconds=convert.MAX_AUDIO_PROMPT_SECONDS,
            default_chunk_frames=convert.DEFAULT_CHUNK_FRAMES, max_chunk_frames=convert.MAX_CHUNK_FRAMES,
            default_max_lead_seconds=convert.DEFAULT_LEAD_SECONDS, max_lead_seconds=convert.MAX_LEAD_SECONDS,
            max_duration_seconds=convert.MAX_DURATION_SECONDS,
            stall_timeout_seconds=self.engine.config.stall_timeout_seconds,
            unpaced_lead_seconds=convert.UNPACED_LEAD_SECONDS,
            engine_realtime_factor=self.engine.headroom.realtime_factor or 0.0,
            default_sampling=convert.sampling_to_pb(self.model.default_sampling()),
            server_version=self.version, device=str(self.model.device), dtype=self._dtype_name())

    async def Generate(self, request, context) -> AsyncIterator[pb.SessionEvent]:
        if isinstance(request, Undecodable):
            await self._reject(context, INVALID, f"request: {request.description}")
        spec = await self._spec(request.request, context, paced=False, field="request")
        async for event in self._run(spec, request.request.return_codes, None, context, "request"):
            yield event

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.SessionEvent]:
        start = await self._first_request(request_iterator, context)
        spec = await self._spec(start, context, paced=True, field="start")
        async for event in self._run(spec, start.return_codes, request_iterator, context, "start"):
            yield event

    # -- plumbing -----------------------------------------------------------------------------------------

    def _dtype_name(self) -> str:
        backend = quantization_backend(self.model.decoder)
        if backend is not None:
            return backend.partition("-")[0]  # "int8" or "int4"
        return str(self.model.dtype).removeprefix("torch.")

    async def _reject(self, context, code: grpc.StatusCode, details: str, session_id: str = "-") -> None:
        """End the call with a status; one log line, no traceback."""
        log.info("session=%s event=rejected status=%s details=%r", session_id, code.name, details)
        await context.abort(code, details)

    async def _first_request(self, requests, context) -> pb.StartSession:
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            await self._reject(context, PRECONDITION, "request: the stream ended before a start message")
        if isinstance(first, Undecodable):
            await self._reject(context, INVALID, f"request: {first.description}")
        kind = first.WhichOneof("request")
        if kind is None:
            await self._reject(context, INVALID, "request: empty message (no member of the oneof set)")
        if kind != "start":
            await self._reject(context, PRECONDITION, f"{kind}: the first message must be start")
        return first.start

    async def _spec(self, start: pb.StartSession, context, paced: bool, field: str) -> SessionSpec:
        try:
            return await asyncio.to_thread(convert.spec_from_pb, self.model, start, paced=paced, field=field)
        except SpecError as error:
            await self._reject(context, INVALID, str(error))

    async def _open(self, spec: SessionSpec, sink: Callable[[Event], None], context, root: str) -> SessionHandle:
        """Admit the session. The engine names StartSession's fields; `root` is where that message sits."""
        try:
            return self.engine.open_session(spec, sink)
        except SessionLimitError as error:
            await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except ServerClosingError as error:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, str(error))
        except SpecError as error:
            await self._reject(context, INVALID, f"{root}.{error}")

    async def _run(self, spec: SessionSpec, return_codes: bool, requests, context, root: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        handle = await self._open(spec, sink, context, root)
        log.info("session=%s event=open client=%r text=%r frames=%s paced=%s", handle.id, spec.client_name,
                 spec.weighted_prompts.label, spec.total_frames, spec.max_lead_seconds is not None)
        paced = spec.max_lead_seconds is not None
        # output samples per channel sent / acknowledged, numbered from the start: a resumed session has "sent"
        # up to its first sample already (its client's acks check out before Started is even dequeued here),
        # and its client may still be playing audio from before it (acks below it are fine)
        progress = {"sent": spec.resume.first_sample if spec.resume is not None else 0, "acked": 0}
        reader = (asyncio.create_task(self._read(requests, handle, queue, progress, paced))
                  if requests is not None else None)

        def on_done(_) -> None:  # the call ended however it ended: free the session even if this generator
            handle.close()       # is left suspended (grpc does not close a response generator it abandons)
            if reader is not None:
                reader.cancel()

        context.add_done_callback(on_done)
        started: Started | None = None
        aborting: _Abort | None = None  # a bad request after Started: its status follows the session's Finished
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Abort):
                    if started is None:
                        await self._reject(context, item.code, item.details, handle.id)
                    aborting = item
                    handle.fail(item.details)  # the client sees Finished(ERROR) with the totals, then the status
                    continue
                if isinstance(item, Started):
                    started = item
                message = convert.event_to_pb(item, spec, started, return_codes)
                if message.WhichOneof("event") == "audio":
                    progress["sent"] += message.audio.sample_count
                elif message.WhichOneof("event") == "retracted":  # sent again from there: acks wait for it
                    progress["sent"] = message.retracted.sample
                yield message
                if not paced and message.WhichOneof("event") == "audio":
                    handle.ack(progress["sent"])  # delivered: unpaced sessions are held by what was read
                if isinstance(item, Finished):
                    await self._end(item, handle, reader, context, aborting)
                    return
        finally:
            if reader is not None:
                reader.cancel()
            handle.close()  # frees the session at once if it is still running (cancel, disconnect, abort)

    async def _end(self, finished: Finished, handle: SessionHandle, reader, context, aborting) -> None:
        log.info("session=%s event=finished reason=%s frames=%d samples=%d steps=%d mean_step_ms=%.2f",
                 handle.id, finished.reason.value, finished.total_frames, finished.total_samples, finished.steps,
                 finished.mean_step_ms)
        if finished.reason is FinishReason.ERROR:  # a bad request that came after a clean end is ignored
            if aborting is not None:
                await self._reject(context, aborting.code, aborting.details, handle.id)
            await self._reject(context, FAILURE_STATUS[finished.failure or Failure.INTERNAL], finished.message,
                               handle.id)
        if reader is not None:  # let the client half-close first, so its last writes are not lost
            await asyncio.wait({reader}, timeout=HALF_CLOSE_WAIT_SECONDS)

    async def _read(self, requests, handle: SessionHandle, queue: asyncio.Queue, progress: dict,
                    paced: bool) -> None:
        """Apply steering messages as they arrive; a bad one ends the call with its status. After stop,
        everything is read and ignored (the session is ending; the half-close is still awaited)."""
        parts: list = []
        stopped = stop_scheduled = False
        try:
            async for message in requests:
                if stopped:
                    continue
                if isinstance(message, Undecodable):
                    raise _Abort(INVALID, f"request: {message.description}")
                kind = message.WhichOneof("request")
                if kind == "start":
                    raise _Abort(PRECONDITION, "start: the session has already started")
                if kind is None:
                    raise _Abort(INVALID, "request: empty message (no member of the oneof set)")
                await self._steer(kind, message, handle, parts, progress, paced)
                scheduled = kind == "stop" and convert.at_from_pb(message.stop, "stop.at") is not None
                stopped = kind == "stop" and not scheduled  # a scheduled stop still takes acks and steering
                stop_scheduled = stop_scheduled or scheduled
            if not stop_scheduled:
                handle.stop()  # half-close: the client has nothing more to say, so the session ends
        except _Abort as abort:
            queue.put_nowait(abort)
        except SpecError as error:
            queue.put_nowait(_Abort(INVALID, str(error)))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the client's stream broke: nothing more to read, the session goes on
            log.debug("session=%s request stream ended: %s", handle.id, error)

    async def _steer(self, kind: str, message: pb.SessionRequest, handle: SessionHandle, parts: list,
                     progress: dict, paced: bool) -> None:
        if kind == "ack":
            played = message.ack.samples_played
            if played < progress["acked"]:
                raise SpecError("ack.samples_played", f"decreased from {progress['acked']} to {played}")
            if played > progress["sent"]:
                raise SpecError("ack.samples_played", f"{played} exceeds the {progress['sent']} samples sent")
            progress["acked"] = played
            if paced:  # unpaced sessions are acked by delivery (see _run); the client's acks are only checked
                handle.ack(played)
        elif kind == "pause":
            handle.pause(convert.at_from_pb(message.pause, "pause.at"))
        elif kind == "resume":
            handle.resume()
        elif kind == "stop":
            handle.stop(convert.at_from_pb(message.stop, "stop.at"))
        elif kind == "set_tempo":
            handle.set_tempo(convert.tempo_from_pb(message.set_tempo, "set_tempo"))
        elif kind == "set_prompt":
            change = message.set_prompt
            text, prompts = None, None
            if change.HasField("text"):
                text = convert.check_text(self.model, change.text, "set_prompt.text")
            if change.prompts:
                if text is not None:
                    raise SpecError("set_prompt.prompts", "give text or prompts, not both")
                prompts = convert.prompts_from_pb(self.model, change.prompts, "set_prompt.prompts")
            changes = None
            if change.HasField("sampling"):  # checked here, merged on the engine when the change lands
                current = handle.params
                params = convert.sampling_from_pb(self.model, change.sampling, current, "set_prompt.sampling")
                if params.uses_guidance != current.uses_guidance:
                    raise SpecError("set_prompt.sampling.guidance_scale",
                                    "cannot switch guidance on or off mid-session (<= 1 vs > 1)")
                changes = convert.sampling_changes(change.sampling)
            transition, transition_beats = 0, None
            if change.HasField("transition"):
                if text is None and prompts is None:
                    raise SpecError("set_prompt.transition", "needs text or prompts to move to")
                length = convert.transition_frames(self.model, change.transition, "set_prompt.transition")
                transition, transition_beats = (0, length) if isinstance(length, float) else (length, None)
            rollback = None
            if change.HasField("rollback"):
                if text is None and prompts is None:
                    raise SpecError("set_prompt.rollback", "needs text or prompts to change to")
                rollback = convert.rollback_frames(self.model, change.rollback, "set_prompt.rollback")
            handle.set_prompt(text, prompts=prompts, transition_frames=transition,
                              at=convert.at_from_pb(change, "set_prompt.at"), sampling_changes=changes,
                              rollback_frames=rollback, transition_beats=transition_beats)
        elif kind == "append_audio":
            await self._append(message.append_audio, handle, parts)

    async def _append(self, append: pb.AppendAudio, handle: SessionHandle, parts: list) -> None:
        """Buffer the parts of one append (one format for all), then hand the joined audio to the session."""
        if not append.HasField("audio"):
            raise SpecError("append_audio.audio", "missing")
        audio, rate = convert.audio_from_pb(append.audio, "append_audio.audio")
        if parts:
            first = parts[0]
            for name, value in (("encoding", append.audio.encoding), ("sample_rate", rate),
                                ("channels", audio.shape[0])):
                if first[name] != value:
                    parts.clear()
                    raise SpecError(f"append_audio.audio.{name}", f"every part of one append must share it: "
                                                                  f"{value} after {first[name]}")
        parts.append({"audio": audio, "encoding": append.audio.encoding, "sample_rate": rate,
                      "channels": audio.shape[0]})
        total = sum(p["audio"].shape[1] for p in parts)
        if total / rate > convert.MAX_AUDIO_PROMPT_SECONDS:
            parts.clear()
            raise SpecError("append_audio.audio.pcm", f"appended audio exceeds {convert.MAX_AUDIO_PROMPT_SECONDS:g} s")
        if not append.partial:
            joined = np.concatenate([p["audio"] for p in parts], axis=1)
            parts.clear()
            model_audio = await asyncio.to_thread(convert.audio_for_model, self.model, joined, rate,
                                                  "append_audio.audio")
            handle.append_audio(model_audio, append.replace_context, convert.at_from_pb(append, "append_audio.at"))
