"""WAV files without audio dependencies: a streaming 16-bit writer and a reader for integer and float PCM."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16 (x 32767, rounded, clipped): the server's own int16 encoding."""
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")


class WavWriter:
    """Appends (samples, channels) float audio to a 16-bit PCM WAV; the header is final after close().
    `retract(samples)` cuts the file back to its first `samples` (a session's retracted audio)."""

    _HEADER_BYTES = 44

    def __init__(self, path: str | Path, sample_rate: int, channels: int):
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.samples_written = 0
        self._file = open(self.path, "wb+")
        self._write_header()

    def _write_header(self) -> None:
        data = self.samples_written * 2 * self.channels
        self._file.seek(0)
        self._file.write(b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt " +
                         struct.pack("<IHHIIHH", 16, _PCM, self.channels, self.sample_rate,
                                     self.sample_rate * 2 * self.channels, 2 * self.channels, 16) +
                         b"data" + struct.pack("<I", data))

    def write(self, audio: np.ndarray) -> None:
        if audio.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channel(s), got {audio.shape[1]}")
        self._file.seek(self._HEADER_BYTES + self.samples_written * 2 * self.channels)
        self._file.write(to_int16(audio).tobytes())
        self.samples_written += audio.shape[0]

    def retract(self, samples: int) -> None:
        """Keep only the first `samples` written (what follows is written again)."""
        self.samples_written = min(self.samples_written, max(0, samples))
        self._file.truncate(self._HEADER_BYTES + self.samples_written * 2 * self.channels)

    def close(self) -> None:
        if self._file is not None:
            self._write_header()
            self._file.close()
            self._file = None

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """-> ((samples, channels) float32 in [-1, 1], sample rate). 8/16/24/32-bit integer or 32/64-bit float."""
    data = Path(path).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file")
    fmt = pcm = None
    offset = 12
    while offset + 8 <= len(data):
        tag, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        body = data[offset + 8:offset + 8 + size]
        if tag == b"fmt ":
            fmt = body
        elif tag == b"data":
            pcm = body
        offset += 8 + size + (size & 1)
    if fmt is None or pcm is None:
        raise ValueError(f"{path}: no fmt or data chunk")
    format_tag, channels, rate = struct.unpack("<HHI", fmt[:8])
    bits = struct.unpack("<H", fmt[14:16])[0]
    if format_tag == _EXTENSIBLE and len(fmt) >= 26:
        format_tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the format tag
    width = bits // 8
    pcm = pcm[:len(pcm) - len(pcm) % (width * channels)]
    if format_tag == _FLOAT and width in (4, 8):
        audio = np.frombuffer(pcm, dtype=f"<f{width}").astype(np.float32)
    elif format_tag == _PCM and width == 1:
        audio = (np.frombuffer(pcm, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif format_tag == _PCM and width == 2:
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0
    elif format_tag == _PCM and width == 3:
        b = np.frombuffer(pcm, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        audio = (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)).astype(np.float32)
    elif format_tag == _PCM and width == 4:
        audio = (np.frombuffer(pcm, dtype="<i4") / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported WAV format {format_tag} with {bits} bits")
    return audio.reshape(-1, channels), rate
