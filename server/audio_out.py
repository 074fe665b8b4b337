"""A session's audio out: resolved frames in, final PCM at the output rate out (streaming EnCodec decoder plus a
streaming resampler). It owns every count of what the codec has seen and held back. Engine thread only."""

from __future__ import annotations

import math
import time
import weakref

import numpy as np
import torch

from musicgen_core import MusicGen
from musicgen_core.streaming_codec import (StreamLatency, algorithmic_latency, decode_step, final_output_count,
                                           flush, init_decoder_state, split_channels)

_LAG_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # codec -> {format: lags}


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
        tail = self._without_prompt(self._resample(flush(self.model.codec, self.decoder), last=True))
        return np.concatenate([head, tail], axis=1)

    @torch.inference_mode()
    def _decode(self, frames: torch.Tensor) -> np.ndarray:
        codes = split_channels(frames.to(self.model.device), self.channels)
        return self._without_prompt(self._resample(decode_step(self.model.codec, self.decoder, codes), last=False))

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
