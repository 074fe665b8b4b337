"""Client library of the live MusicGen server. Needs only the musicgen.v1 protocol, grpcio and numpy; playback
and capture also need sounddevice (PortAudio) and soxr, imported only when a device is actually opened.

Blocking `MusicGenClient`, asyncio `AsyncMusicGenClient`; `Player` plays a session in real time and
acknowledges what the device consumed; `feed_wav` / `LiveInput` send audio for the session to continue from.
"""

from .aio import AsyncGeneration, AsyncLiveSession, AsyncMusicGenClient
from .audio_in import LiveInput, feed_wav
from .devices import AudioUnavailable, find_device, preferred_stream_rate
from .errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, MusicGenError,
                     ResourceExhausted, ServerError, Unauthenticated, Unavailable)
from .events import (AudioChunk, Encoding, Event, FinishReason, Finished, ModelInfo, Notice, NoticeKind, Retracted,
                     Sampling, SessionStats, Started)
from .player import OutputLatency, Player, PlayerStats
from .requests import At, StartOptions, Tempo
from .ring import RingBuffer
from .session import Generation, LiveSession, MusicGenClient
from .wavfile import WavWriter, read_wav

__all__ = [
    "MusicGenClient", "AsyncMusicGenClient", "LiveSession", "AsyncLiveSession", "Generation", "AsyncGeneration",
    "Started", "AudioChunk", "Notice", "Retracted", "Finished", "Event", "ModelInfo", "Sampling", "SessionStats", "Encoding",
    "NoticeKind", "FinishReason", "StartOptions", "At", "Tempo",
    "MusicGenError", "InvalidArgument", "FailedPrecondition", "ResourceExhausted", "Unauthenticated", "Unavailable",
    "DeadlineExceeded", "Cancelled", "ServerError",
    "Player", "PlayerStats", "OutputLatency", "RingBuffer", "AudioUnavailable", "find_device",
    "preferred_stream_rate", "feed_wav", "LiveInput", "WavWriter", "read_wav",
]
