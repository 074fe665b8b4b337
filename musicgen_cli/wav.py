"""16-bit PCM WAV read/write with the standard library (no audio dependencies in the core)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch


def write(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """audio: (channels, samples) float in [-1, 1] -> 16-bit PCM (round(x * 32767), clipped; read back / 32767), interleaved."""
    audio = np.atleast_2d(np.asarray(audio, dtype=np.float32))
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(audio.shape[0])
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.T.tobytes())


def read(path: str | Path) -> tuple[np.ndarray, int]:
    """-> (channels, samples) float32 in [-1, 1], sample rate. 8/16/24/32-bit integer PCM."""
    with wave.open(str(path), "rb") as handle:
        channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
        raw = handle.readframes(handle.getnframes())
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32767.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = (bytes3[:, 0].astype(np.int32) | (bytes3[:, 1].astype(np.int32) << 8)
                | (bytes3[:, 2].astype(np.int32) << 16))
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        data = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        data = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    return data.reshape(-1, channels).T.copy(), rate


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """(channels, samples) resampled with soxr's high-quality filter."""
    if source_rate == target_rate:
        return audio
    import soxr
    return np.ascontiguousarray(soxr.resample(audio.T, source_rate, target_rate, quality="HQ").T, dtype=np.float32)


def read_for_model(path: str | Path, sample_rate: int, channels: int) -> torch.Tensor:
    """A WAV as (channels, samples) at the model's rate: mono is duplicated for stereo models, stereo is
    averaged for mono ones."""
    audio, rate = read(path)
    if audio.shape[1] == 0:
        raise ValueError(f"{path}: no samples")
    audio = resample(audio, rate, sample_rate)
    if audio.shape[0] != channels:
        audio = np.repeat(audio.mean(axis=0, keepdims=True), channels, axis=0)
    return torch.from_numpy(np.ascontiguousarray(audio))
