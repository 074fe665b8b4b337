"""A session's audio out: resolved frames in, final PCM at the output rate out (streaming EnCodec decoder plus a
streaming resampler). It owns every count of what the codec has seen and held back. Engine thread only."""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from musicgen_core import MusicGen
from musicgen_core.streaming_codec import (DecoderState, StreamLatency, algorithmic_latency, decode_step,
                                           final_output_count, flush, init_decoder_state, split_channels)

_LAG_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # codec -> {format: lags}
RESAMPLER_WARM_UP_SAMPLES = 3200  # model-rate audio a fresh resampler reads before a rollback's first sample


@dataclass
class CodecSnapshot:
    """The codec after `frames_in` generated frames (taken after each decode): what a rollback restores."""

    frames_in: int
    decoder: DecoderState
    model_samples: int  # model-rate samples the codec had emitted (the audio prompt's included)
    out_samples: int  # output samples emitted (the audio prompt's excluded)


class AudioOut:
    """Frames go to the codec in groups of `chunk_frames` (one call per frame costs 2-3x more per frame: each
    call re-reads the codec's weights); the first group also carries the frames the output path must see past
    a chunk before its audio is final, so every later group makes exactly one chunk final. soxr's stream
    removes its own delay, so output sample n is input time n / output_rate."""

    def __init__(self, model: MusicGen, lookahead_frames: float | None, output_rate: int, chunk_frames: int):
        self.model = model
        config = model.config
        self.channels = config.audio_channels
        self.chunk_frames = chunk_frames
        self.decoder = init_decoder_state(model.codec, batch=self.channels, lookahead_frames=lookahead_frames)
        self.latency = algorithmic_latency(config.decoder, config.audio_encoder, lookahead_frames)
        self.model_rate = config.sampling_rate
        self.output_rate = output_rate or self.model_rate
        self.samples_per_frame = config.audio_encoder.hop_length * self.output_rate // self.model_rate
        self.resampler = self._new_resampler()
        self.pending: list[torch.Tensor] = []  # resolved frames not yet given to the codec
        self.frames_in = 0  # generated frames given to the codec (an audio prompt's not counted)
        self.prompt_frames = 0
        self.skip_samples = 0  # audio-prompt samples still to come out of the codec: the client has them
        self.decode_seconds = 0.0  # time decoding generated frames (the prompt's warm-up and the tail not counted)
        self.lag_frames, self.send_lag_frames = self.output_lag_frames(self.latency, chunk_frames)
        # rollback: output samples emitted (generated audio only), the first one to keep after a rollback,
        # snapshots of the codec, and the recent model-rate audio a fresh resampler warms up on
        self.out_samples = 0
        self.discard_until = 0
        self.snapshots: list[CodecSnapshot] = []
        self.model_audio = np.zeros((self.channels, 0), dtype=np.float32)
        self.model_audio_start = 0  # model-sample index of model_audio[:, 0]

    @property
    def held_frames(self) -> int:
        """The codec's own lookahead in whole frames (chunks are whole frames)."""
        return math.ceil(self.latency.codec_lookahead_samples / self.latency.hop_length)

    def prime(self, prompt_codes: torch.Tensor) -> np.ndarray:
        """Warm the codec with an audio prompt's frames; their audio is decoded and dropped (-> what is left of
        it, nothing in practice: the codec holds back more than a frame)."""
        self.prompt_frames = prompt_codes.shape[1]
        self.skip_samples = self.prompt_frames * self.samples_per_frame
        self.lag_frames, self.send_lag_frames = self.output_lag_frames(self.latency, self.chunk_frames,
                                                                       self.prompt_frames)
        return self._decode(prompt_codes)

    def add(self, frame: torch.Tensor) -> np.ndarray | None:
        """One resolved frame (codebooks,). Returns the newly final PCM when this frame completed a group."""
        self.pending.append(frame)
        if len(self.pending) < self.chunk_frames + max(0, self.lag_frames - self.frames_in):
            return None
        return self.drain()

    def drain(self) -> np.ndarray:
        """Decode every pending frame now (a pause or the end cuts the group short)."""
        if not self.pending:
            return np.zeros((self.channels, 0), dtype=np.float32)
        count, frames = len(self.pending), torch.stack(self.pending, dim=1)
        self.pending = []
        self.frames_in += count
        started = time.perf_counter()
        pcm = self._decode(frames)
        self.decode_seconds += time.perf_counter() - started
        return pcm

    @torch.inference_mode()
    def finish(self) -> np.ndarray:
        """The end of the stream: pending frames, then the codec's held-back tail."""
        head = self.drain()
        tail = self._emit(self._without_prompt(self._resample(flush(self.model.codec, self.decoder), last=True)))
        return np.concatenate([head, tail], axis=1)

    @torch.inference_mode()
    def _decode(self, frames: torch.Tensor) -> np.ndarray:
        codes = split_channels(frames.to(self.model.device), self.channels)
        model_rate = decode_step(self.model.codec, self.decoder, codes)
        self._keep_model_audio(model_rate)
        pcm = self._emit(self._without_prompt(self._resample(model_rate, last=False)))
        if not self.skip_samples and not self.pending:
            self.snapshots.append(CodecSnapshot(self.frames_in, self.decoder.clone(), self.decoder.emitted_samples,
                                                self.out_samples))
        return pcm

    def _emit(self, pcm: np.ndarray) -> np.ndarray:
        """Count the output; after a rollback, drop what comes before its first sample (the client keeps it)."""
        start = self.out_samples
        self.out_samples += pcm.shape[1]
        if start < self.discard_until:
            pcm = pcm[:, min(pcm.shape[1], self.discard_until - start):]
        return pcm

    def _keep_model_audio(self, model_rate: torch.Tensor) -> None:
        if self.resampler is None:
            return
        audio = model_rate[:, 0].float().cpu().numpy()
        self.model_audio = np.concatenate([self.model_audio, audio], axis=1)

    # -- rollback -------------------------------------------------------------------------------------------

    @property
    def earliest_rewind_frame(self) -> int | None:
        return self.snapshots[0].frames_in if self.snapshots else None

    def forget_before(self, frame: int) -> None:
        """Frames before `frame` will never be rolled back to (they were played): keep the last snapshot at or
        before it and the audio a resampler would warm up on from there."""
        keep = max([i for i, s in enumerate(self.snapshots) if s.frames_in <= frame], default=0)
        del self.snapshots[:keep]
        if self.snapshots and self.resampler is not None:
            first = max(self.model_audio_start, self.snapshots[0].model_samples - 2 * RESAMPLER_WARM_UP_SAMPLES)
            self.model_audio = self.model_audio[:, first - self.model_audio_start:]
            self.model_audio_start = first

    @torch.inference_mode()
    def rewind(self, frame: int, codes_from: "callable") -> None:
        """Back to the codec after `frame` generated frames, output from frame x samples_per_frame on: the
        latest snapshot at or before it, then the frames in between decoded again (codes_from(start, stop)
        gives them; their audio, already sent, is dropped). A resampler starts afresh a little before the
        snapshot's audio, so its output past the warm-up matches the continuous stream's to float rounding."""
        snapshot = max((s for s in self.snapshots if s.frames_in <= frame), key=lambda s: s.frames_in)
        self.snapshots = [s for s in self.snapshots if s.frames_in <= snapshot.frames_in]
        self.decoder = snapshot.decoder.clone()
        self.frames_in, self.pending = snapshot.frames_in, []
        self.out_samples = snapshot.out_samples
        self.discard_until = frame * self.samples_per_frame
        if self.resampler is not None:
            self.resampler = self._new_resampler()
            skip_model = self.prompt_frames * self.latency.hop_length  # the audio prompt's own samples
            hop = self.latency.hop_length
            wanted = max(snapshot.model_samples - RESAMPLER_WARM_UP_SAMPLES, self.model_audio_start, skip_model)
            start = skip_model + math.ceil((wanted - skip_model) / hop) * hop  # a frame edge: whole output samples
            warm = self.model_audio[:, start - self.model_audio_start: snapshot.model_samples - self.model_audio_start]
            self.model_audio = self.model_audio[:, : snapshot.model_samples - self.model_audio_start]
            produced = self.resampler.resample_chunk(np.ascontiguousarray(warm.T), last=False).shape[0]
            self.out_samples = (start - skip_model) // hop * self.samples_per_frame + produced
        if frame > self.frames_in:
            self.frames_in = frame
            self._decode(codes_from(snapshot.frames_in, frame))

    def _without_prompt(self, pcm: np.ndarray) -> np.ndarray:
        if self.skip_samples:
            cut = min(self.skip_samples, pcm.shape[1])
            pcm, self.skip_samples = pcm[:, cut:], self.skip_samples - cut
        return pcm

    def _resample(self, pcm: torch.Tensor, last: bool) -> np.ndarray:
        audio = pcm[:, 0].float().cpu().numpy()  # (channels, samples): the codec batch holds the channels
        if self.resampler is None:
            return audio
        out = self.resampler.resample_chunk(np.ascontiguousarray(audio.T), last=last)
        return np.ascontiguousarray(out.T, dtype=np.float32)

    def _new_resampler(self):
        if self.output_rate == self.model_rate:
            return None
        import soxr
        return soxr.ResampleStream(self.model_rate, self.output_rate, self.channels, dtype="float32",
                                   quality="HQ")

    # -- the output path's lag, measured ---------------------------------------------------------------------

    def output_lag_frames(self, latency: StreamLatency, chunk_frames: int, prefix_frames: int = 0,
                          pushes: int = 64) -> tuple[int, int]:
        """-> (path lag, send lag) in whole frames, measured by running the session's push pattern through the
        codec's sample arithmetic and a fresh resampler of the same kind (soxr's hold depends on the block's
        phase: 170 to 1270 samples at 44.1 kHz; its delay() reads 0 until it has seen input).

        path lag: the most frames, right after a push, given to the codec but not final at the output.
        The first push carries chunk_frames + that many, so each push makes one whole chunk final.
        send lag: with that first push, the most frames given to the codec but not yet sendable in whole
        chunks; with the codebook delay, this is the latency the session reports. prefix_frames: an audio
        prompt given to the codec first (its audio is never sent). Memoized per codec: ~10-20 ms to compute."""
        key = (self.output_rate, self.channels, latency, chunk_frames, prefix_frames, pushes)
        memo = _LAG_MEMO.setdefault(self.model.codec, {})
        if key not in memo:
            path = self._lags(latency, prefix_frames, chunk_frames, self.held_frames, pushes)[0]
            memo[key] = path, self._lags(latency, prefix_frames, chunk_frames, path, pushes)[1]
        return memo[key]

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
