"""One live session on the engine thread: a frame source, an audio out and a chunker along the frame's path.

    step result -> FrameSource.take -> completed frame -> AudioOut.add -> final PCM -> Chunker.chunks -> sink

Everything here runs on the engine's scheduler thread; the transport talks to a session only through the
engine's commands (engine.py), which call these methods between decoder steps.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from musicgen_core import MusicGen, SamplingParams, StepResult, TextConditioning, WeightedPrompts

from .audio_out import AudioOut
from .chunker import Chunker
from .events import (Event, Failure, Finished, FinishReason, Notice, NoticeKind, Retracted, SessionSpec,
                     SessionStats, Started)
from .frames import FrameSource, Limits, TextEncodings
from .headroom import RunningRate
from .timeline import At, Tempo, resolve

MAX_SCHEDULED = 64  # pending scheduled commands per session: more is RESOURCE_EXHAUSTED

__all__ = ["Limits", "Session", "TextEncodings"]


class Session:
    def __init__(self, session_id: str, spec: SessionSpec, model: MusicGen, limits: Limits,
                 sink: Callable[[Event], None], encode_text: Callable[[str], TextConditioning] | None = None):
        self.id = session_id
        self.spec = spec
        self.model = model
        self.limits = limits
        self.sink = sink
        self.source = FrameSource(model, limits, spec.weighted_prompts, spec.params, spec.total_frames,
                                  encode_text or (lambda text: model.encode_text([text])[0]))
        self.audio: AudioOut | None = None  # made by begin(), with the chunker
        self.chunker: Chunker | None = None
        self.paused = spec.start_paused
        self.finished = False
        self.stats = SessionStats()
        self.rate = RunningRate()  # running real-time factor, fed by the engine after each turn it steps in
        self.created = time.monotonic()
        self.tempo: Tempo | None = spec.tempo
        self.scheduled: list[tuple[int, int, Callable[[], None]]] = []  # (frame, arrival, action), sorted
        self._arrivals = 0

    @property
    def params(self) -> SamplingParams:
        return self.source.params

    @property
    def state(self):
        """The decoder sequence the engine steps."""
        return self.source.state

    # -- lifecycle ----------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Encode the conditioning and any audio prompt, warm the codec with the prompt, send Started."""
        spec, config = self.spec, self.model.config
        self.audio = AudioOut(self.model, spec.lookahead_frames, spec.output_rate, spec.chunk_frames)
        lead = spec.max_lead_seconds if spec.max_lead_seconds is not None else spec.delivery_lead_seconds
        self.chunker = Chunker(config.decoder.num_codebooks, config.audio_channels, self.audio.samples_per_frame,
                               self.audio.output_rate, spec.chunk_frames, lead, self.source.prompts, self.params)
        prompt_codes = None
        if spec.audio_prompt is not None:  # the client has this audio: decode it only to warm the codec state
            prompt_codes = self.source.encode_audio(spec.audio_prompt)
            self.chunker.add_pcm(self.audio.prime(prompt_codes))
        if spec.resume is not None:  # the codec warmed by the same frames, their audio dropped (the client has it)
            codes = torch.from_numpy(spec.resume.codes)
            self.chunker.continue_at(spec.resume.first_frame)
            self.chunker.add_pcm(self.audio.prime(codes))
            self.source.resume(codes, spec.resume.first_frame)
        else:
            self.source.start(prompt_codes)
        audio, latency, spf = self.audio, self.audio.latency, self.audio.samples_per_frame
        self.sink(Started(
            session_id=self.id, sample_rate=audio.output_rate, channels=config.audio_channels,
            encoding=spec.encoding, frame_rate=config.frame_rate, samples_per_frame=spf,
            latency_samples=(latency.delay_steps + audio.send_lag_frames) * spf,
            latency_resampler_samples=(audio.send_lag_frames - audio.held_frames) * spf,
            latency_codebook_delay_samples=latency.delay_steps * spf,
            latency_decoder_lookahead_samples=audio.held_frames * spf, context_frames=self.limits.context_frames,
            reprime_keep_frames=self.limits.reprime_keep_frames,
            prompt_frames=self.state.grid.prompt_frames if spec.resume is None else 0,
            exact_decoding=latency.exact, lookahead_frames=audio.held_frames, paused=self.paused,
            first_frame=spec.resume.first_frame if spec.resume is not None else 0))

    # -- scheduling ---------------------------------------------------------------------------------------

    def ready(self) -> bool:
        if self.finished or self.paused or self.state is None:
            return False
        return not self.chunker.over_lead()

    def stalled(self, now: float, timeout: float) -> bool:
        """Waited at its lead for `timeout` s with no ack (unpaced: no delivery): its client is gone without
        a cancel reaching us, or does not read or ack. A paused session never stalls."""
        if self.finished or self.chunker is None:
            return False
        return self.chunker.stalled(now, timeout, waiting=not self.paused)

    def stall(self, timeout: float) -> None:
        if self.spec.max_lead_seconds is None:
            message = f"the client read none of the audio sent for {timeout:g} s"  # names no request field
        else:
            message = (f"ack: no Ack for {timeout:g} s while the session waited at its lead; a paced client "
                       "must ack as it plays, or pause")
        self.finish(FinishReason.ERROR, message, Failure.STALLED)

    def after_step(self, result: StepResult, step_seconds: float, batch: int = 1) -> None:
        """One decoder step's result: the frame it completed goes on to the codec and out in chunks."""
        self.stats.steps += 1
        self.stats.step_seconds += step_seconds
        self.stats.max_step_seconds = max(self.stats.max_step_seconds, step_seconds)
        self.stats.batch_sessions += batch
        codes = self.source.take(result)
        if codes is not None:
            self.chunker.add_frame(codes)
            pcm = self.audio.add(codes)
            if pcm is not None:
                self.chunker.add_pcm(pcm)
                self._send()
        if self.source.finished:
            self.finish(FinishReason.COMPLETED)
        elif self.source.full:
            self.reprime()

    def _send(self, final: bool = False, force: bool = False) -> None:
        for chunk in self.chunker.chunks(final, force):
            self.sink(replace(chunk, realtime_factor=self.rate.realtime_factor))

    def reprime(self) -> None:
        """The context window is full: start again from the most recent frames. The codec state is untouched,
        so the audio runs on without a gap."""
        kept = self.source.reprime()
        self.stats.reprimes += 1
        self._notice(NoticeKind.CONTEXT_REPRIMED, self.source.frames_done,
                     f"context window of {self.limits.context_frames} frames reached; continuing from the "
                     f"last {kept} frames")

    # -- steering (applied between steps) ----------------------------------------------------------------

    def set_prompt(self, prompts: WeightedPrompts | None, params: SamplingParams | None,
                   transition_frames: int = 0) -> None:
        """New text and/or sampling from the next generated column (the weights moving over
        `transition_frames` frames when > 0). A chunk starts at the first frame with any code sampled under the
        change, labelled with the new revision."""
        first = self.source.set_prompt(prompts, params, transition_frames)
        revision = self.chunker.revise(first, self.source.prompts, self.params)
        self._send()
        message = f"prompt revision {revision.number} applies from frame {first}"
        if prompts is not None and transition_frames > 0:
            message += f", its weights moving over {transition_frames} frames to frame {self.source.transition.last}"
        self._notice(NoticeKind.PROMPT_APPLIED, first, message)

    # -- scheduled commands -------------------------------------------------------------------------------

    def when(self, at: At | None, action: Callable[[], None]) -> None:
        """Run `action` now (at None, or at the frame generation has reached) or when generation reaches the
        frame `at` names: every command lands between frames, at `FrameSource.frames_done` (a prompt change's
        first touched frame is that same frame). A frame already generated ends the session with
        FAILED_PRECONDITION naming the field (a command meant for a bar line must not land elsewhere)."""
        self._run_due()  # commands scheduled at the frame reached go first: they were sent first
        if at is None:
            action()
            return
        if self.finished:
            return
        earliest = self.source.frames_done
        try:
            frame = resolve(at, self.tempo, self.audio.samples_per_frame, self.audio.output_rate, earliest)
        except ValueError as error:
            self.finish(FinishReason.ERROR, str(error), Failure.REQUEST)
            return
        if frame < earliest:
            spf = self.audio.samples_per_frame
            self.finish(FinishReason.ERROR,
                        f"{at.field}: frame {frame} (sample {round(frame * spf)}) is already generated; the "
                        f"earliest it can land now is frame {earliest} (sample {round(earliest * spf)})",
                        Failure.TOO_LATE)
            return
        if frame == earliest:  # due now (a paused session too)
            action()
            return
        if len(self.scheduled) >= MAX_SCHEDULED:
            self.finish(FinishReason.ERROR, f"{at.field}: {MAX_SCHEDULED} commands are already scheduled",
                        Failure.TOO_MANY)
            return
        self._arrivals += 1
        bisect.insort(self.scheduled, (frame, self._arrivals, action), key=lambda item: item[:2])

    def frames_for_beats(self, beats: float, field: str) -> int | None:
        """Beats of the session tempo in whole frames; None (the session ended, naming `field`) without one."""
        if self.tempo is None:
            self.finish(FinishReason.ERROR, f"{field}: beats need a session tempo (StartSession.tempo or "
                                            "set_tempo)", Failure.REQUEST)
            return None
        return round(beats * 60.0 / self.tempo.bpm * self.model.config.frame_rate)

    def _run_due(self) -> None:
        while self.scheduled and not self.finished and self.scheduled[0][0] <= self.source.frames_done:
            self.scheduled.pop(0)[2]()

    def before_step(self) -> None:
        """Scheduled commands now due (in frame order, then as sent), then the weights of a transition in
        progress for the frame this step completes."""
        self._run_due()
        if self.finished or self.paused:
            return
        self.source.remember_step()
        step = self.source.before_step()
        if step is None:
            return
        self.chunker.mix_from(step.frame, step.mix)
        if step.ends_transition:
            self._notice(NoticeKind.TRANSITION_ENDED, step.frame,
                         f"transition of prompt revision {self.chunker.revision.number} complete at frame "
                         f"{step.frame}: {step.mix.label}")

    def append_audio(self, audio: np.ndarray, replace_context: bool = False) -> None:
        """Continue from this audio (channels, samples at the model's rate). replace_context: it alone becomes
        the context (an exact offline continuation of it); otherwise it extends the recent context."""
        codes = self.source.encode_audio(audio)
        frame = self.source.frames_done
        self.chunker.cut_at(frame)
        self.source.append(codes, replace_context)
        self._send()
        self._notice(NoticeKind.AUDIO_APPENDED, frame,
                     f"continuing from {codes.shape[1]} frames of appended audio from frame {frame}")

    def ack(self, samples_played: int) -> None:
        self.chunker.ack(samples_played)
        if self.audio is not None and not self.finished:
            self.audio.forget_before(samples_played // self.chunker.samples_per_frame)  # played: never rolled back
            self._send()  # chunks held back at the lead may go now

    # -- rollback -------------------------------------------------------------------------------------------

    def rollback_and(self, at: At | None, margin_frames: int, action: Callable[[], None]) -> None:
        """Instant steering: `action` lands at the first frame not yet played plus `margin_frames` (or at
        `at`, if later): generation rolls back to it when it was already generated, else it is scheduled."""
        if self.finished:
            return
        played = -(-self.chunker.acked_samples // self.chunker.samples_per_frame)  # ceil
        frame = played + margin_frames
        if at is not None:
            try:
                frame = max(frame, resolve(at, self.tempo, self.audio.samples_per_frame, self.audio.output_rate,
                                           frame))
            except ValueError as error:
                self.finish(FinishReason.ERROR, str(error), Failure.REQUEST)
                return
        self._run_due()
        if frame < self.source.frames_done:
            self.rollback(frame)
        if frame <= self.source.frames_done:
            action()
        else:
            self.when(At("frame", frame, "set_prompt.at"), action)

    def rollback(self, frame: int) -> int:
        """Generate again from `frame` (a frame already generated, not yet played): the decoder, the codec and
        the chunker go back to it and the audio sent from its first sample on is retracted (Retracted). A
        frame before the current sequence or the codec's oldest snapshot moves up to the earliest there is.
        -> the frame generation continues from (frames_done when nothing was rolled back)."""
        source = self.source
        earliest = max(source.earliest_rewind_frame, self.audio.earliest_rewind_frame or source.frames_done)
        frame = max(frame, earliest)
        if frame >= source.frames_done:
            return source.frames_done
        self.audio.rewind(frame, source.recent_codes)
        source.rewind(frame)
        self.chunker.rewind(frame)
        self.sink(Retracted(frame, frame * self.chunker.samples_per_frame))
        return frame

    def drain(self) -> None:
        if not self.finished:
            self._notice(NoticeKind.SERVER_DRAINING, self.source.frames_done,
                         "the server is shutting down: resume this session on another replica")

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.chunker.add_pcm(self.audio.drain())
            self._send(force=True)
            self._notice(NoticeKind.PAUSED, self.source.frames_done, "paused")

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._notice(NoticeKind.RESUMED, self.source.frames_done, "resumed")

    def _notice(self, kind: NoticeKind, frame: int, message: str) -> None:
        self.sink(Notice(kind, frame, message, self.chunker.revision.number))

    def finish(self, reason: FinishReason, message: str = "", failure: Failure | None = None) -> None:
        """Send what is left (the codec's tail, for a clean end), then Finished. Idempotent."""
        if self.finished:
            return
        if reason in (FinishReason.COMPLETED, FinishReason.STOPPED, FinishReason.SERVER_SHUTDOWN) and self.audio:
            self.chunker.add_pcm(self.audio.finish())
            self._send(final=True)
        if reason is FinishReason.ERROR and failure is None:
            failure = Failure.INTERNAL
        self.finished = True
        self._close_stats()
        mean = 1000 * self.stats.step_seconds / max(self.stats.steps, 1)
        self.sink(Finished(reason, self.stats.frames, self.stats.samples, self.stats.steps, mean, message,
                           self.stats, failure))
        self.release()

    def _close_stats(self) -> None:
        self.stats.wall_seconds = time.monotonic() - self.created
        if self.chunker is not None:
            first = self.spec.resume.first_frame if self.spec.resume is not None else 0  # counts, not positions
            self.stats.frames = self.chunker.frames_sent - first
            self.stats.samples = self.chunker.samples_sent - first * self.chunker.samples_per_frame
        if self.audio is not None:
            self.stats.decode_seconds = self.audio.decode_seconds

    def release(self) -> None:
        """Drop the big tensors at once (the KV cache dominates)."""
        if not self.finished:
            self._close_stats()
        self.finished = True
        self.source.release()
        self.audio = None
