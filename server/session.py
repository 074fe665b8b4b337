"""One live session on the engine thread: its sequence state, its audio stream, its pacing and its events.

Everything here runs on the engine's scheduler thread; the transport talks to a session only through
`SessionHandle` (engine.py), whose commands are applied here between decoder steps.

Output is cut into frame-aligned chunks: chunk frames [f, f + n) carry exactly output samples
[f * spf, (f + n) * spf) and those frames' codes. Frames go to the streaming codec as soon as their last
codebook resolves; a chunk goes out once its audio is final.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from musicgen_core import MusicGen, SamplingParams, SequenceState, TextConditioning
from musicgen_core.streaming_codec import (StreamLatency, algorithmic_latency, decode_step, final_output_count,
                                           flush, init_decoder_state, split_channels)

from .events import (AudioChunk, Event, Failure, Finished, FinishReason, Notice, NoticeKind, SessionSpec,
                     SessionStats, Started)


@dataclass(frozen=True)
class Limits:
    """A session's context limits, from EngineConfig, the model and the session's request."""

    window_frames: int  # decoder context in frames before a re-prime
    reprime_frames: int  # frames of recent context a re-primed sequence starts from


@dataclass(frozen=True)
class Revision:
    """The conditioning in effect from `from_frame` on."""

    number: int
    from_frame: int
    text: str
    params: SamplingParams


_LAG_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # codec -> {format: lags}


class AudioOut:
    """Frames -> PCM at the output rate: the streaming EnCodec decoder plus a streaming resampler. soxr's
    stream removes its own delay, so output sample n is input time n / output_rate."""

    def __init__(self, model: MusicGen, lookahead_frames: float | None, output_rate: int):
        self.model = model
        self.channels = model.config.audio_channels
        self.decoder = init_decoder_state(model.codec, batch=self.channels, lookahead_frames=lookahead_frames)
        self.model_rate = model.config.sampling_rate
        self.output_rate = output_rate or self.model_rate
        self.samples_per_frame = model.config.audio_encoder.hop_length * self.output_rate // self.model_rate
        self.resampler = self._new_resampler()

    def output_lag_frames(self, latency: StreamLatency, chunk_frames: int, prefix_frames: int = 0,
                          pushes: int = 64) -> tuple[int, int]:
        """-> (path lag, send lag) in whole frames, measured by running the session's push pattern through the
        codec's sample arithmetic and a fresh resampler of the same kind (soxr's hold depends on the block's
        phase: 170 to 1270 samples at 44.1 kHz; its delay() reads 0 until it has seen input).

        path lag: the most frames, right after a push, given to the codec but not final at the output.
        The session's first push carries chunk_frames + that many, so each push makes one whole chunk final.
        send lag: with that first push, the most frames given to the codec but not yet sendable in whole
        chunks; with the codebook delay, this is the latency the session reports. prefix_frames: an audio
        prompt given to the codec first (its audio is never sent). Memoized per codec: ~10-20 ms to compute."""
        key = (self.output_rate, self.channels, latency, chunk_frames, prefix_frames, pushes)
        memo = _LAG_MEMO.setdefault(self.model.codec, {})
        if key not in memo:
            memo[key] = self._measure_lags(latency, chunk_frames, prefix_frames, pushes)
        return memo[key]

    def _measure_lags(self, latency: StreamLatency, chunk_frames: int, prefix_frames: int,
                      pushes: int) -> tuple[int, int]:
        path = self._lags(latency, prefix_frames, chunk_frames, math.ceil(latency.codec_lookahead_samples /
                                                                          latency.hop_length), pushes)[0]
        return path, self._lags(latency, prefix_frames, chunk_frames, path, pushes)[1]

    def _lags(self, latency: StreamLatency, prefix: int, chunk: int, extra: int, pushes: int) -> tuple[int, int]:
        hop, layers, spf = latency.hop_length, self.model.codec.decoder.layers, self.samples_per_frame
        probe = self._new_resampler()
        frames_in = final_before = out = 0
        path = send = 0
        for index in range(-1 if prefix else 0, pushes):
            frames_in += prefix if index < 0 else chunk + extra if index == 0 else chunk
            final = (final_output_count(layers, frames_in) if latency.exact
                     else max(0, frames_in * hop - latency.codec_lookahead_samples))
            new = np.zeros((final - final_before, self.channels), dtype=np.float32)
            final_before = final
            out += new.shape[0] if probe is None else probe.resample_chunk(new).shape[0]
            if index >= 0:
                generated_in, generated_out = frames_in - prefix, max(0, out // spf - prefix)
                path = max(path, generated_in - generated_out)
                send = max(send, generated_in - generated_out // chunk * chunk)
        return path, send

    def _new_resampler(self):
        if self.output_rate == self.model_rate:
            return None
        import soxr
        return soxr.ResampleStream(self.model_rate, self.output_rate, self.channels, dtype="float32",
                                   quality="HQ")

    @torch.inference_mode()
    def push(self, frames: torch.Tensor) -> np.ndarray:
        """frames: (codebooks, n) -> (channels, samples) float32 of newly final audio."""
        codes = split_channels(frames.to(self.model.device), self.channels)
        return self._resample(decode_step(self.model.codec, self.decoder, codes), last=False)

    @torch.inference_mode()
    def finish(self) -> np.ndarray:
        return self._resample(flush(self.model.codec, self.decoder), last=True)

    def _resample(self, pcm: torch.Tensor, last: bool) -> np.ndarray:
        audio = pcm[:, 0].float().cpu().numpy()  # (channels, samples): the codec batch holds the channels
        if self.resampler is None:
            return audio
        out = self.resampler.resample_chunk(np.ascontiguousarray(audio.T), last=last)
        return np.ascontiguousarray(out.T, dtype=np.float32)


class TextEncodings:
    """The text encoder's output per prompt text, the most recently used `capacity` kept. The encoder is a pure
    function of the text, so a hit is exact; it spares a musicgen-small session ~45 ms of CPU time each time a
    prompt comes back (a new session, a set-prompt back to an earlier text, every re-prime). Engine thread only."""

    def __init__(self, model: MusicGen, capacity: int = 64):
        self.model, self.capacity = model, capacity
        self._entries: OrderedDict[str, TextConditioning] = OrderedDict()

    def __call__(self, text: str) -> TextConditioning:
        if text in self._entries:
            self._entries.move_to_end(text)
            return self._entries[text]
        conditioning = self.model.encode_text([text])[0]
        self._entries[text] = conditioning
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return conditioning


class Session:
    def __init__(self, session_id: str, spec: SessionSpec, model: MusicGen, limits: Limits,
                 sink: Callable[[Event], None], encode_text: Callable[[str], TextConditioning] | None = None):
        self.id = session_id
        self.spec = spec
        self.model = model
        self.encode_text = encode_text or (lambda text: model.encode_text([text])[0])
        self.limits = limits
        self.sink = sink
        self.params: SamplingParams = spec.params
        self.text = spec.text or ""
        self.revisions = [Revision(0, 0, self.text, self.params)]
        self.state: SequenceState | None = None
        self.audio: AudioOut | None = None
        self.generator: torch.Generator | None = None  # one per session, carried across re-primes
        self.frame_offset = 0  # session frame index of the current grid's frame 0
        self.frames_done = 0  # generated frames resolved so far (session numbering, prompt excluded)
        codebooks = model.config.decoder.num_codebooks
        self.history = torch.zeros(codebooks, 0, dtype=torch.long)  # recent frames, for re-priming
        self.unsent_codes = torch.zeros(codebooks, 0, dtype=torch.long)  # resolved, not yet in a chunk
        self.unsent_pcm = np.zeros((model.config.audio_channels, 0), dtype=np.float32)
        self.codec_pending: list[torch.Tensor] = []  # resolved frames not yet given to the codec
        self.lag_frames = 0  # frames the output path (codec, resampler) needs past a frame before its audio is final
        self.generated_pushed = 0  # generated frames given to the codec so far (the audio prompt's not counted)
        self.skip_samples = 0  # audio-prompt samples the codec will produce that the client already has
        self.frames_sent = 0
        self.boundaries: list[int] = []  # frames a chunk must start at (prompt changes, appends, pauses)
        self.sequence = 0
        self.acked_samples = 0  # paced: the client's Ack; unpaced: what the transport has delivered
        self.last_ack = time.monotonic()
        self.held_since: float | None = None  # when the session last began to wait at its lead
        self.paused = spec.start_paused
        self.finished = False
        self.stats = SessionStats()
        self.created = time.monotonic()

    @property
    def emitted_samples(self) -> int:
        return self.frames_sent * self.audio.samples_per_frame if self.audio else self.stats.samples

    # -- lifecycle ----------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Encode the conditioning and any audio prompt, warm the codec with the prompt, send Started."""
        spec, config = self.spec, self.model.config
        prompt_codes, prefix = None, 0
        if spec.audio_prompt is not None:
            prompt_codes = self.model.encode_audio(torch.from_numpy(spec.audio_prompt)).cpu()
            self.history = prompt_codes[:, -self.limits.window_frames:]
        self.audio = AudioOut(self.model, spec.lookahead_frames, spec.output_rate)
        if prompt_codes is not None:  # the client has this audio: decode it only to warm the codec state
            prefix = prompt_codes.shape[1]
            self.skip_samples = prefix * self.audio.samples_per_frame
            self._take_pcm(self.audio.push(prompt_codes))
            prompt_codes = prompt_codes[:, -(self.limits.window_frames - 1):]
        self._start_sequence(prompt_codes)
        latency = algorithmic_latency(config.decoder, config.audio_encoder, spec.lookahead_frames)
        hop = config.audio_encoder.hop_length
        held_frames = math.ceil(latency.codec_lookahead_samples / hop)  # chunks are whole frames
        self.lag_frames, send_lag = self.audio.output_lag_frames(latency, spec.chunk_frames, prefix)
        spf = self.audio.samples_per_frame
        self.sink(Started(
            session_id=self.id, sample_rate=self.audio.output_rate, channels=config.audio_channels,
            encoding=spec.encoding, frame_rate=config.frame_rate, samples_per_frame=hop,
            latency_samples=(latency.delay_steps + send_lag) * spf,
            latency_resampler_samples=(send_lag - held_frames) * spf,
            latency_delay_steps=latency.delay_steps, latency_codec_samples=held_frames * hop,
            context_frames=self.limits.window_frames, reprime_frames=self.limits.reprime_frames,
            prompt_frames=0 if prompt_codes is None else prompt_codes.shape[1], exact_decoding=latency.exact,
            lookahead_frames=held_frames, paused=self.paused))

    def _start_sequence(self, prompt_codes: torch.Tensor | None) -> None:
        """A fresh decoder sequence continuing from prompt_codes (None: from nothing)."""
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[1]
        total = None
        if self.spec.total_frames is not None:
            remaining = self.spec.total_frames - self.frames_done
            if prompt_frames + remaining <= self.limits.window_frames:
                total = prompt_frames + remaining
        capacity = (total if total is not None else self.limits.window_frames) + 1 + \
            self.model.config.decoder.max_delay
        conditioning = self.encode_text(self.text)
        self.state = self.model.start_sequence(conditioning, self.params, prompt_codes, total_frames=total,
                                               capacity=capacity)
        if self.generator is None:
            self.generator = self.state.generator
        self.state.generator = self.generator  # a seeded session stays one reproducible stream
        self.frame_offset = self.frames_done - prompt_frames

    # -- scheduling ---------------------------------------------------------------------------------------

    def ready(self) -> bool:
        if self.finished or self.paused or self.state is None:
            return False
        return not self._over_lead()

    def _over_lead(self) -> bool:
        """Paced sessions keep the audio sent at most `max_lead_seconds` ahead of the acks: they neither step
        nor send another chunk while that far ahead (a chunk sent just under the lead may pass it by one).
        Unpaced ones are held the same way by what the transport delivered, at `delivery_lead_seconds`."""
        lead = self.spec.max_lead_seconds
        if lead is None:
            lead = self.spec.delivery_lead_seconds
        if lead is None:
            return False
        return self.emitted_samples - self.acked_samples >= lead * self.audio.output_rate

    def stalled(self, now: float, timeout: float) -> bool:
        """True when the session has waited at its lead for `timeout` seconds with no ack (or, unpaced, no
        delivery) since it began to wait: its client is gone without a cancel, or does not read or ack."""
        if self.finished or self.paused or self.audio is None or not self._over_lead():
            self.held_since = None
            return False
        if self.held_since is None:
            self.held_since = now
        return now - max(self.held_since, self.last_ack) >= timeout

    def stall(self, timeout: float) -> None:
        if self.spec.max_lead_seconds is None:
            message = f"the client read none of the audio sent for {timeout:g} s"  # names no request field
        else:
            message = (f"ack: no Ack for {timeout:g} s while the session waited at its lead; a paced client "
                       "must ack as it plays, or pause")
        self.finish(FinishReason.ERROR, message, Failure.STALLED)

    def after_step(self, completed_frame: int | None, step_seconds: float, batch: int = 1) -> None:
        self.stats.steps += 1
        self.stats.step_seconds += step_seconds
        self.stats.max_step_seconds = max(self.stats.max_step_seconds, step_seconds)
        self.stats.batch_sessions += batch
        grid = self.state.grid
        if completed_frame is not None and completed_frame >= grid.prompt_frames:
            self._resolved(grid.frame(completed_frame).clone())
        if self.state.finished:
            self.finish(FinishReason.COMPLETED)
        elif grid.next_column >= grid.capacity:
            self.reprime()

    def _resolved(self, frame: torch.Tensor) -> None:
        self.frames_done += 1
        self.history = torch.cat([self.history, frame[:, None]], dim=1)[:, -self.limits.window_frames:]
        self.unsent_codes = torch.cat([self.unsent_codes, frame[:, None]], dim=1)
        self.codec_pending.append(frame)
        # The first chunk needs lag_frames more frames before any of its audio is final: give them to the codec
        # in one call with it (each call costs the codec a pass over its weights: ~10 ms less to first audio).
        enough = self.spec.chunk_frames + max(0, self.lag_frames - self.generated_pushed)
        if len(self.codec_pending) >= enough:
            self._push_codec()
            self._send_chunks(final=False)

    def _push_codec(self) -> None:
        """Decode the frames waiting for the codec. They go in groups of chunk_frames: one call per frame costs
        2-3x more per frame (each call re-reads the codec's weights), and a chunk cannot go out before the
        codec has seen ~4 frames past its end anyway."""
        if not self.codec_pending:
            return
        started = time.perf_counter()
        self._take_pcm(self.audio.push(torch.stack(self.codec_pending, dim=1)))
        self.stats.decode_seconds += time.perf_counter() - started
        self.generated_pushed += len(self.codec_pending)
        self.codec_pending = []

    def _take_pcm(self, pcm: np.ndarray) -> None:
        if self.skip_samples:
            cut = min(self.skip_samples, pcm.shape[1])
            pcm, self.skip_samples = pcm[:, cut:], self.skip_samples - cut
        self.unsent_pcm = np.concatenate([self.unsent_pcm, pcm], axis=1)

    def _send_chunks(self, final: bool, force: bool = False) -> None:
        """Send every chunk whose audio is final; `force` sends a short one (pause, prompt change, end)."""
        spf = self.audio.samples_per_frame
        while True:
            whole = min(self.unsent_pcm.shape[1] // spf, self.unsent_codes.shape[1])
            if final:
                whole = self.unsent_codes.shape[1]
            stop = self.frames_sent + min(whole, self.spec.chunk_frames)
            for boundary in self.boundaries:
                if self.frames_sent < boundary < stop:
                    stop = boundary
            count = stop - self.frames_sent
            if count <= 0 or (count < self.spec.chunk_frames and not (final or force)
                              and stop not in self.boundaries):
                return
            if not final and self._over_lead():  # the rest waits for acks (see ack)
                return
            samples = self.unsent_pcm.shape[1] if final and count == self.unsent_codes.shape[1] else count * spf
            self._send(count, samples)

    def _send(self, count: int, samples: int) -> None:
        first = self.frames_sent
        revision = [r for r in self.revisions if r.from_frame <= first][-1]
        chunk = AudioChunk(sequence=self.sequence, start_sample=self.emitted_samples, first_frame=first,
                           frame_count=count, pcm=self.unsent_pcm[:, :samples],
                           codes=self.unsent_codes[:, :count].numpy(), prompt=revision.text,
                           prompt_revision=revision.number, params=revision.params)
        self.unsent_pcm = self.unsent_pcm[:, samples:]
        self.unsent_codes = self.unsent_codes[:, count:]
        self.boundaries = [b for b in self.boundaries if b > first + count]
        self.sequence += 1
        self.frames_sent += count
        self.stats.frames = self.frames_sent
        self.stats.samples = self.emitted_samples
        self.sink(chunk)

    def reprime(self) -> None:
        """The context window is full: start a new sequence from the most recent frames, same conditioning.
        The codec state is untouched, so the audio runs on without a gap."""
        keep = self.history[:, -self.limits.reprime_frames:] if self.limits.reprime_frames else None
        self._start_sequence(keep)
        self.stats.reprimes += 1
        self._notice(NoticeKind.CONTEXT_REPRIMED, self.frames_done,
                     f"context window of {self.limits.window_frames} frames reached; continuing from the "
                     f"last {0 if keep is None else keep.shape[1]} frames")

    # -- steering (applied between steps) ----------------------------------------------------------------

    def set_prompt(self, change: tuple[str | None, SamplingParams | None]) -> None:
        """New text and/or sampling from the next generated column; the self-attention cache is kept. The
        reported frame is the first with any code sampled under the change; earlier frames are untouched."""
        text, params = change
        if params is not None:
            if params.uses_guidance != self.params.uses_guidance:
                raise ValueError("sampling.guidance_scale: cannot switch guidance on or off mid-session")
            if params.seed is not None and params.seed != self.params.seed:
                self.generator.manual_seed(params.seed)
            self.params = params
            self.state.params = params
        if text is not None:
            self.text = text
            conditioning = self.encode_text(self.text)
            self.state.cross = self.model.cross_attention(conditioning, self.params.uses_guidance)
        grid = self.state.grid
        first_affected = self.frame_offset + max(grid.prompt_frames, grid.next_column - 1 - max(grid.delays))
        number = self.revisions[-1].number + 1
        self.revisions.append(Revision(number, first_affected, self.text, self.params))
        self.boundaries.append(first_affected)
        self._send_chunks(final=False)
        self._notice(NoticeKind.PROMPT_APPLIED, first_affected,
                     f"prompt revision {number} applies from frame {first_affected}")

    def append_audio(self, appended: tuple[np.ndarray, bool]) -> None:
        """Continue from this audio (channels, samples at the model's rate). replace_context: it alone becomes
        the context (an exact offline continuation of it); otherwise it extends the recent context."""
        audio, replace_context = appended
        codes = self.model.encode_audio(torch.from_numpy(audio)).cpu()
        context = codes if replace_context else torch.cat([self.history, codes], dim=1)
        keep = min(max(self.limits.reprime_frames, codes.shape[1]), self.limits.window_frames - 1)
        self.history = context[:, -self.limits.window_frames:]
        self.boundaries.append(self.frames_done)
        self._start_sequence(context[:, -keep:])
        self._send_chunks(final=False)
        self._notice(NoticeKind.AUDIO_APPENDED, self.frames_done,
                     f"continuing from {codes.shape[1]} frames of appended audio from frame {self.frames_done}")

    def ack(self, samples_played: int) -> None:
        self.acked_samples = max(self.acked_samples, samples_played)
        self.last_ack = time.monotonic()
        if self.audio is not None and not self.finished:
            self._send_chunks(final=False)  # chunks held back at the lead may go now

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._push_codec()
            self._send_chunks(final=False, force=True)
            self._notice(NoticeKind.PAUSED, self.frames_done, "paused")

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._notice(NoticeKind.RESUMED, self.frames_done, "resumed")

    def _notice(self, kind: NoticeKind, frame: int, message: str) -> None:
        self.sink(Notice(kind, frame, message, self.revisions[-1].number))

    def finish(self, reason: FinishReason, message: str = "", failure: Failure | None = None) -> None:
        """Send what is left (the codec's tail, for a clean end), then Finished. Idempotent."""
        if self.finished:
            return
        if reason in (FinishReason.COMPLETED, FinishReason.STOPPED, FinishReason.SERVER_SHUTDOWN) and self.audio:
            self._push_codec()
            self._take_pcm(self.audio.finish())
            self._send_chunks(final=True)
        self.finished = True
        self.stats.wall_seconds = time.monotonic() - self.created
        mean = 1000 * self.stats.step_seconds / max(self.stats.steps, 1)
        if reason is FinishReason.ERROR and failure is None:
            failure = Failure.INTERNAL
        self.sink(Finished(reason, self.frames_sent, self.emitted_samples, self.stats.steps, mean, message,
                           self.stats, failure))
        self.release()

    def release(self) -> None:
        """Drop the big tensors at once (the KV cache dominates)."""
        self.finished = True
        self.stats.samples = self.emitted_samples
        self.state = None
        self.audio = None
        self.history = self.history[:, :0]
