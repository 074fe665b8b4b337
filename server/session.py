"""One live session on the engine thread: its sequence state, its audio stream, its pacing and its events.

Everything here runs on the engine's scheduler thread; the transport talks to a session only through
`SessionHandle` (engine.py), whose commands are applied here between decoder steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from musicgen_core import MusicGen, SamplingParams, SequenceState
from musicgen_core.streaming_codec import (algorithmic_latency, decode_step, flush, init_decoder_state,
                                           split_channels)

from .events import (AudioChunk, Event, Finished, FinishReason, Notice, NoticeKind, SessionSpec, SessionStats,
                     Started)


@dataclass(frozen=True)
class Limits:
    """The engine's per-session limits, derived from EngineConfig and the model."""

    window_frames: int  # decoder context in frames before a re-prime
    reprime_frames: int  # frames of recent context a re-primed sequence starts from


class AudioOut:
    """Frames -> PCM at the output rate: the streaming EnCodec decoder plus an optional streaming resampler."""

    def __init__(self, model: MusicGen, lookahead_frames: float | None, output_rate: int):
        self.model = model
        self.channels = model.config.audio_channels
        self.decoder = init_decoder_state(model.codec, batch=self.channels, lookahead_frames=lookahead_frames)
        self.model_rate = model.config.sampling_rate
        self.output_rate = output_rate or self.model_rate
        self.resampler = None
        if self.output_rate != self.model_rate:
            import soxr
            self.resampler = soxr.ResampleStream(self.model_rate, self.output_rate, self.channels,
                                                 dtype="float32", quality="HQ")

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


class Session:
    def __init__(self, session_id: str, spec: SessionSpec, model: MusicGen, limits: Limits,
                 sink: Callable[[Event], None]):
        self.id = session_id
        self.spec = spec
        self.model = model
        self.limits = limits
        self.sink = sink
        self.params: SamplingParams = spec.params
        self.text = spec.text or ""
        self.prompt_revision = 0
        self.state: SequenceState | None = None
        self.audio: AudioOut | None = None
        self.frame_offset = 0  # session frame index of the current grid's frame 0
        self.frames_done = 0  # generated frames resolved so far (session numbering, prompt excluded)
        self.history = torch.zeros(model.config.decoder.num_codebooks, 0, dtype=torch.long)  # recent frames
        self.pending: list[torch.Tensor] = []  # resolved frames not yet sent to the codec
        self.pending_first = 0
        self.emitted_samples = 0
        self.acked_samples = 0
        self.sequence = 0
        self.paused = spec.start_paused
        self.finished = False
        self.stats = SessionStats()
        self.created = time.monotonic()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Encode the conditioning and any audio prompt, warm the codec with the prompt, send Started."""
        spec, config = self.spec, self.model.config
        prompt_codes = None
        if spec.audio_prompt is not None:
            prompt_codes = self.model.encode_audio(torch.from_numpy(spec.audio_prompt))
            self.history = prompt_codes.cpu()
        self.audio = AudioOut(self.model, spec.lookahead_frames, spec.output_rate)
        if prompt_codes is not None:  # the client has this audio: decode it only to warm the codec state
            warm = self.audio.push(prompt_codes)
            self._skip = prompt_codes.shape[1] * config.audio_encoder.hop_length * self.audio.output_rate \
                // config.sampling_rate - warm.shape[1]
        else:
            self._skip = 0
        self._start_sequence(self.text, prompt_codes)
        latency = algorithmic_latency(config.decoder, config.audio_encoder, spec.lookahead_frames)
        scale = self.audio.output_rate / config.sampling_rate
        self.sink(Started(
            session_id=self.id, sample_rate=self.audio.output_rate, channels=config.audio_channels,
            encoding=spec.encoding, frame_rate=config.frame_rate,
            samples_per_frame=config.audio_encoder.hop_length, latency_samples=round(latency.samples * scale),
            latency_delay_steps=latency.delay_steps, latency_codec_samples=latency.codec_lookahead_samples,
            context_frames=self.limits.window_frames, reprime_frames=self.limits.reprime_frames,
            prompt_frames=0 if prompt_codes is None else prompt_codes.shape[1], exact_decoding=latency.exact,
            lookahead_frames=latency.codec_lookahead_samples / config.audio_encoder.hop_length,
            paused=self.paused))

    def _start_sequence(self, text: str, prompt_codes: torch.Tensor | None) -> None:
        """A fresh decoder sequence continuing from prompt_codes (None: from nothing)."""
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[1]
        total = None
        if self.spec.total_frames is not None:
            remaining = self.spec.total_frames - self.frames_done
            if prompt_frames + remaining <= self.limits.window_frames:
                total = prompt_frames + remaining
        capacity = (total if total is not None else self.limits.window_frames) + 1 + \
            self.model.config.decoder.max_delay
        conditioning = self.model.encode_text([text])[0]
        self.state = self.model.start_sequence(conditioning, self.params, prompt_codes, total_frames=total,
                                               capacity=capacity)
        # the generator carries on across re-primes so a seeded session stays one reproducible stream
        if getattr(self, "_generator", None) is not None:
            self.state.generator = self._generator
        self._generator = self.state.generator
        self.frame_offset = self.frames_done - prompt_frames

    # -- scheduling ---------------------------------------------------------------------------------------

    def ready(self) -> bool:
        if self.finished or self.paused or self.state is None:
            return False
        if self.spec.max_lead_seconds is None:
            return True
        lead = self.emitted_samples - self.acked_samples
        return lead < self.spec.max_lead_seconds * self.audio.output_rate

    def after_step(self, completed_frame: int | None, step_seconds: float) -> None:
        self.stats.steps += 1
        self.stats.step_seconds += step_seconds
        grid = self.state.grid
        if completed_frame is not None and completed_frame >= grid.prompt_frames:
            self._resolved(grid.frame(completed_frame).clone())
        if self.state.finished:
            self.finish(FinishReason.COMPLETED)
        elif grid.next_column >= grid.capacity:
            self.reprime()

    def _resolved(self, frame: torch.Tensor) -> None:
        if not self.pending:
            self.pending_first = self.frames_done
        self.pending.append(frame)
        self.frames_done += 1
        self.history = torch.cat([self.history, frame[:, None]], dim=1)[:, -self.limits.window_frames:]
        if len(self.pending) >= self.spec.chunk_frames:
            self._emit(self.audio.push(torch.stack(self.pending, dim=1)))

    def _emit(self, pcm: np.ndarray) -> None:
        frames = self.pending
        first, count = self.pending_first, len(frames)
        codebooks = self.model.config.decoder.num_codebooks
        codes = torch.stack(frames, dim=1) if frames else torch.zeros(codebooks, 0, dtype=torch.long)
        self.pending = []
        self.pending_first = self.frames_done
        if self._skip > 0:  # the audio prompt's own samples: the client has them already
            cut = min(self._skip, pcm.shape[1])
            pcm, self._skip = pcm[:, cut:], self._skip - cut
        if pcm.shape[1] == 0 and count == 0:
            return
        chunk = AudioChunk(sequence=self.sequence, start_sample=self.emitted_samples, first_frame=first,
                           frame_count=count, pcm=pcm, codes=codes.numpy(), prompt=self.text,
                           prompt_revision=self.prompt_revision, params=self.params)
        self.sequence += 1
        self.emitted_samples += pcm.shape[1]
        self.stats.samples = self.emitted_samples
        self.stats.frames = self.frames_done
        self.sink(chunk)

    def reprime(self) -> None:
        """The context window is full: start a new sequence from the most recent frames, same conditioning.
        The codec state is untouched, so the audio runs on without a gap."""
        keep = self.history[:, -self.limits.reprime_frames:] if self.limits.reprime_frames else None
        self._start_sequence(self.text, keep)
        self.stats.reprimes += 1
        self.sink(Notice(NoticeKind.CONTEXT_REPRIMED, self.frames_done,
                         f"context window of {self.limits.window_frames} frames reached; continuing from the "
                         f"last {0 if keep is None else keep.shape[1]} frames"))

    # -- steering (applied between steps) ----------------------------------------------------------------

    def set_prompt(self, change: tuple[str | None, SamplingParams | None]) -> None:
        """New text and/or sampling from the next generated column; the self-attention cache is kept. Frames
        before the reported one were fully generated under the old prompt."""
        text, params = change
        if params is not None:
            if params.uses_guidance != self.params.uses_guidance:
                raise ValueError("sampling.guidance_scale: cannot switch guidance on or off mid-session")
            if params.seed is not None and params.seed != self.params.seed:
                self._generator.manual_seed(params.seed)
            self.params = params
            self.state.params = params
        if text is not None:
            self.text = text
        conditioning = self.model.encode_text([self.text])[0]
        self.state.cross = self.model.cross_attention(conditioning, self.params.uses_guidance)
        self.prompt_revision += 1
        grid = self.state.grid
        first_affected = max(grid.prompt_frames, grid.next_column - 1 - max(grid.delays))
        frame = self.frame_offset + first_affected
        self.sink(Notice(NoticeKind.PROMPT_APPLIED, frame, f"prompt revision {self.prompt_revision} applies "
                                                             f"from frame {frame}"))

    def append_audio(self, appended: tuple[np.ndarray, bool]) -> None:
        """Continue from this audio (channels, samples at the model's rate). replace_context: it alone becomes
        the context (an exact offline continuation of it); otherwise it extends the recent context."""
        audio, replace_context = appended
        codes = self.model.encode_audio(torch.from_numpy(audio)).cpu()
        context = codes if replace_context else torch.cat([self.history, codes], dim=1)
        keep = max(self.limits.reprime_frames, codes.shape[1])
        prompt = context[:, -min(keep, self.limits.window_frames - 1):]
        self.history = context[:, -self.limits.window_frames:]
        if self.pending:
            self._emit(self.audio.push(torch.stack(self.pending, dim=1)))
        self._start_sequence(self.text, prompt)
        self.sink(Notice(NoticeKind.AUDIO_APPENDED, self.frames_done,
                         f"continuing from {codes.shape[1]} frames of appended audio from frame {self.frames_done}"))

    def ack(self, samples_played: int) -> None:
        self.acked_samples = max(self.acked_samples, samples_played)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.sink(Notice(NoticeKind.PAUSED, self.frames_done, "paused"))

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.sink(Notice(NoticeKind.RESUMED, self.frames_done, "resumed"))

    def finish(self, reason: FinishReason, message: str = "") -> None:
        """Send what is left (the codec's tail for a clean end), then Finished. Idempotent."""
        if self.finished:
            return
        self.finished = True
        if reason in (FinishReason.COMPLETED, FinishReason.STOPPED, FinishReason.SERVER_SHUTDOWN):
            tail = self.audio.push(torch.stack(self.pending, dim=1)) if self.pending else None
            rest = self.audio.finish()
            pcm = rest if tail is None else np.concatenate([tail, rest], axis=1)
            self._emit(pcm)
        mean = 1000 * self.stats.step_seconds / max(self.stats.steps, 1)
        self.sink(Finished(reason, self.frames_done, self.emitted_samples, self.stats.steps, mean, message))
        self.release()

    def release(self) -> None:
        """Drop the big tensors at once (the KV cache dominates)."""
        self.finished = True
        self.state = None
        self.audio = None
        self.history = self.history[:, :0]
