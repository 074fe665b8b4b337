"""The gRPC transport: convert, delegate to the engine, convert back. No model math here."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import AsyncIterator

import grpc
import numpy as np

from musicgen.v1 import musicgen_pb2 as pb
from musicgen.v1 import musicgen_pb2_grpc as pb_grpc
from musicgen_core.streaming_codec import decoder_lookahead_samples

from . import convert
from .engine import Engine, SessionHandle
from .events import (Event, Finished, OrderError, ServerClosingError, SessionLimitError, SessionSpec, SpecError,
                     Started)

log = logging.getLogger("musicgen.server")

_STOP = object()


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class MusicGenService(pb_grpc.MusicGenServicer):
    def __init__(self, engine: Engine, max_message_bytes: int, version: str = "0.1.0"):
        self.engine = engine
        self.model = engine.model
        self.max_message_bytes = max_message_bytes
        self.version = version

    # -- RPCs ---------------------------------------------------------------------------------------------

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        config, limits = self.model.config, self.engine.limits
        exact = math.ceil(decoder_lookahead_samples(config.audio_encoder) / config.audio_encoder.hop_length)
        return pb.ModelInfo(
            model_name=config.name, sample_rate=config.sampling_rate, channels=config.audio_channels,
            frame_rate=config.frame_rate, num_codebooks=config.decoder.num_codebooks,
            codebook_size=config.decoder.vocab_size, samples_per_frame=config.audio_encoder.hop_length,
            max_context_frames=limits.window_frames, default_reprime_keep_frames=limits.reprime_frames,
            exact_decoder_lookahead_frames=exact, max_sessions=self.engine.config.max_sessions,
            active_sessions=self.engine.active_sessions,
            supported_output_sample_rates=sorted({config.sampling_rate, *convert.SUPPORTED_OUTPUT_RATES}),
            max_text_tokens=self.model.tokenizer.max_tokens, max_message_bytes=self.max_message_bytes,
            max_audio_prompt_seconds=convert.MAX_AUDIO_PROMPT_SECONDS,
            default_chunk_frames=convert.DEFAULT_CHUNK_FRAMES, max_chunk_frames=convert.MAX_CHUNK_FRAMES,
            default_max_lead_seconds=convert.DEFAULT_LEAD_SECONDS, max_lead_seconds=convert.MAX_LEAD_SECONDS,
            default_sampling=convert.sampling_to_pb(self.model.default_sampling()),
            server_version=self.version, device=str(self.model.device), dtype=str(self.model.dtype))

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.SessionEvent]:
        spec = await self._spec(request.request, context, paced=False, field="request")
        async for event in self._run(spec, request.request.return_codes, None, context):
            yield event

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.SessionEvent]:
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the stream ended before a start message")
        if first.WhichOneof("request") != "start":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the first message must be start, got {first.WhichOneof('request') or 'nothing'}")
        spec = await self._spec(first.start, context, paced=True, field="start")
        async for event in self._run(spec, first.start.return_codes, request_iterator, context):
            yield event

    # -- plumbing -----------------------------------------------------------------------------------------

    async def _spec(self, start: pb.StartSession, context, paced: bool, field: str) -> SessionSpec:
        try:
            return await asyncio.to_thread(convert.spec_from_pb, self.model, start, paced=paced, field=field)
        except SpecError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    async def _run(self, spec: SessionSpec, return_codes: bool, requests, context):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            handle = self.engine.open_session(spec, sink)
        except SessionLimitError as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except ServerClosingError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        except SpecError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        log.info("session=%s event=open client=%r text=%r frames=%s paced=%s", handle.id, spec.client_name,
                 spec.text, spec.total_frames, spec.max_lead_seconds is not None)
        progress = {"sent": 0, "acked": 0}  # output samples per channel sent / acknowledged
        reader = (asyncio.create_task(self._read(requests, handle, queue, progress))
                  if requests is not None else None)
        started: Started | None = None
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Abort):
                    if started is not None:  # the client sees the totals, then the status
                        handle.close()
                        yield convert.event_to_pb(handle.error_totals(item.details), spec, started, return_codes)
                    await context.abort(item.code, item.details)
                if item is _STOP:
                    continue
                if isinstance(item, Started):
                    started = item
                message = convert.event_to_pb(item, spec, started, return_codes)
                if message.WhichOneof("event") == "audio":
                    progress["sent"] += message.audio.sample_count
                yield message
                if isinstance(item, Finished):
                    if reader is not None:  # let the client half-close first, so its last writes are not lost
                        await asyncio.wait({reader}, timeout=2.0)
                    log.info("session=%s event=finished reason=%s frames=%d samples=%d steps=%d mean_step_ms=%.2f",
                             handle.id, item.reason.value, item.total_frames, item.total_samples, item.steps,
                             item.mean_step_ms)
                    return
        finally:
            if reader is not None:
                reader.cancel()
            handle.close()  # frees the session at once if it is still running (cancel, disconnect, abort)

    async def _read(self, requests, handle: SessionHandle, queue: asyncio.Queue, progress: dict) -> None:
        """Apply steering messages as they arrive; a bad one ends the call with its status."""
        parts: list = []
        try:
            async for message in requests:
                kind = message.WhichOneof("request")
                if kind == "start":
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "start: the session has already started")
                if kind is None:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request: empty message (no field of the oneof set)")
                await self._steer(kind, message, handle, parts, progress)
            handle.stop()  # half-close: the client has nothing more to say, so the session ends
        except _Abort as abort:
            queue.put_nowait(abort)
        except SpecError as error:
            queue.put_nowait(_Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error)))
        except OrderError as error:
            queue.put_nowait(_Abort(grpc.StatusCode.FAILED_PRECONDITION, str(error)))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the client's stream broke: nothing more to read, the session goes on
            log.debug("session=%s request stream ended: %s", handle.id, error)

    async def _steer(self, kind: str, message: pb.SessionRequest, handle: SessionHandle, parts: list,
                     progress: dict) -> None:
        if kind == "ack":
            played = message.ack.samples_played
            if played < progress["acked"]:
                raise SpecError("ack.samples_played", f"decreased from {progress['acked']} to {played}")
            if played > progress["sent"]:
                raise SpecError("ack.samples_played", f"{played} exceeds the {progress['sent']} samples sent")
            progress["acked"] = played
            handle.ack(played)
        elif kind == "pause":
            handle.pause()
        elif kind == "resume":
            handle.resume()
        elif kind == "stop":
            handle.stop()
        elif kind == "set_prompt":
            change = message.set_prompt
            text = None
            if change.HasField("text"):
                text = convert.check_text(self.model, change.text, "set_prompt.text")
            params = None
            if change.HasField("sampling"):
                current = handle.params
                params = convert.sampling_from_pb(change.sampling, current, "set_prompt.sampling")
                if params.uses_guidance != current.uses_guidance:
                    raise SpecError("set_prompt.sampling.guidance_scale",
                                    "cannot switch guidance on or off mid-session (<= 1 vs > 1)")
            handle.set_prompt(text, params)
        elif kind == "append_audio":
            append = message.append_audio
            if not append.HasField("audio"):
                raise SpecError("append_audio.audio", "missing")
            audio, rate = convert.audio_from_pb(append.audio, "append_audio.audio")
            if parts and (parts[0][1] != rate or parts[0][0].shape[0] != audio.shape[0]):
                raise SpecError("append_audio.audio", "every part of one append must share sample_rate and channels")
            parts.append((audio, rate))
            total = sum(p[0].shape[1] for p in parts)
            if total / rate > convert.MAX_AUDIO_PROMPT_SECONDS:
                parts.clear()
                raise SpecError("append_audio.audio.pcm", f"appended audio exceeds "
                                                          f"{convert.MAX_AUDIO_PROMPT_SECONDS:g} s")
            if not append.partial:
                joined = np.concatenate([p[0] for p in parts], axis=1)
                parts.clear()
                model_audio = await asyncio.to_thread(convert.audio_for_model, self.model, joined, rate,
                                                      "append_audio.audio")
                handle.append_audio(model_audio, append.replace_context)
