"""Sessions that survive their server: several replicas behind one channel (gRPC's own round_robin with health
checks), and a live session that resumes on a healthy replica from its codes when its stream breaks or its
server drains.

    client = MusicGenClient.replicas(["10.0.0.1:50051", "10.0.0.2:50051"])   # or "dns:///musicgen:50051"
    session = client.open_session("warm lofi beat", failover=True)
    Player(session).play()   # plays through a switch from its jitter buffer

The session asks for every chunk's codes (`return_codes`), keeps the last context window of them, and on a
break opens a new session with `StartSession.resume` at the first sample it has not received, with the prompt,
sampling and tempo in effect. Its events go on with contiguous sample numbers; a `Switched` event reports each
switch. Retries back off up to `failover_seconds`, after which the break's error is raised.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from musicgen.v1 import musicgen_pb2 as pb

from . import requests as rq
from .errors import MusicGenError
from .events import AudioChunk, Finished, FinishReason, Notice, NoticeKind, Retracted, Started

# Round-robin over every address the target resolves to, each health-checked (grpc.health.v1): a replica that
# reports NOT_SERVING (draining) or does not answer gets no new calls.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}})
BREAKS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def replica_target(addresses: list[str] | str) -> str:
    """["h1:p1", "h2:p2"] -> one gRPC target over all of them ("ipv4:h1:p1,h2:p2"); a single name (e.g.
    "dns:///musicgen:50051", resolving to several addresses) is used as it is."""
    if isinstance(addresses, str):
        return addresses
    return "ipv4:" + ",".join(addresses)


@dataclass(frozen=True)
class Switched:
    """The session moved to another replica: audio continues at `sample`; `seconds` from the break to the new
    session's start; `reason` the break (a status code name, or "server_draining")."""

    sample: int
    seconds: float
    reason: str


class FailoverSession:
    """A LiveSession that resumes elsewhere when its stream breaks. Steering, acks and iteration as for a
    LiveSession; the current one is `live`."""

    def __init__(self, client, start: pb.StartSession, failover_seconds: float = 10.0):
        self._client = client
        self._start = pb.StartSession()
        self._start.CopyFrom(start)
        self._start.return_codes = True
        self.failover_seconds = failover_seconds
        self._lock = threading.Lock()
        self.live = client._open(self._start)
        self.started: Started = self.live.started
        self._codes: list[np.ndarray] = []  # (frames, codebooks) per chunk, the last window kept
        self._code_frames = 0
        self._codes_end = 0  # the frame after the last one kept
        self.switches: list[Switched] = []

    # -- what a Player and a steering thread use ------------------------------------------------------------

    def __getattr__(self, name):
        return getattr(self.live, name)

    @property
    def samples_received(self) -> int:
        return self.live.samples_received

    def set_prompt(self, text: str | None = None, **fields) -> None:
        """As LiveSession.set_prompt; the text or prompts and sampling are also kept for a resumed session."""
        with self._lock:
            if text is not None:
                del self._start.prompts[:]
                self._start.prompt = text
            if fields.get("prompts") is not None:
                self._start.prompt = ""
                del self._start.prompts[:]
                self._start.prompts.extend(rq.weighted_prompts(fields["prompts"]))
            for name in ("guidance_scale", "temperature", "top_k", "top_p", "greedy", "seed"):
                if fields.get(name) is not None:
                    setattr(self._start.sampling, name, fields[name])
            self.live.set_prompt(text, **fields)

    def set_tempo(self, bpm: float, beats_per_bar: int = 4, beat_one_sample: int = 0) -> None:
        with self._lock:
            self._start.tempo.CopyFrom(rq.Tempo(bpm, beats_per_bar, beat_one_sample).to_pb())
            self.live.set_tempo(bpm, beats_per_bar, beat_one_sample)

    def ack(self, samples_played: int) -> None:
        self.live.ack(samples_played)

    def close(self) -> None:
        self.live.close()

    def __enter__(self) -> "FailoverSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- events ---------------------------------------------------------------------------------------------

    def __iter__(self):
        stream = iter(self.live)
        while True:
            try:
                event = next(stream)
            except StopIteration:
                return
            except MusicGenError as error:
                if not self._breaks(error):
                    raise
                stream = self._switch(error.code.name if getattr(error, "code", None) else type(error).__name__)
                yield self.switches[-1]
                continue
            if isinstance(event, Started) and event is not self.started:
                continue  # a resumed session's own Started: the stream goes on as before
            if isinstance(event, Finished) and event.reason is FinishReason.SERVER_SHUTDOWN:
                stream = self._switch("server_shutdown")  # its server went away before we moved: move now
                yield self.switches[-1]
                continue
            if isinstance(event, AudioChunk):
                self._keep(event)
            elif isinstance(event, Retracted):
                self._drop_from(event.frame)
            yield event
            if isinstance(event, Notice) and event.kind is NoticeKind.SERVER_DRAINING:
                stream = self._switch("server_draining")
                yield self.switches[-1]
            if isinstance(event, Finished):
                return

    def _breaks(self, error: MusicGenError) -> bool:
        code = getattr(error, "code", None)
        return not self.live.closed and (code in BREAKS or code is None)

    def _switch(self, reason: str):
        """A new session on a healthy replica from the codes received, with backoff up to failover_seconds."""
        broke = time.monotonic()
        old = self.live
        delay = 0.05
        while True:
            with self._lock:
                start = pb.StartSession()
                start.CopyFrom(self._start)
                sample = old.samples_received
                codes = self._window()
                if codes is not None:
                    start.resume.codes.extend(codes.reshape(-1).tolist())
                    start.resume.at_sample = sample
                if self._start.WhichOneof("duration") in ("duration_frames", "duration_seconds"):
                    spf = self.started.samples_per_frame
                    total = self.started.duration_frames
                    start.duration_frames = max(1, total - round(sample / spf))
                try:
                    new = self._client._open(start)
                except MusicGenError as error:
                    if time.monotonic() - broke + delay > self.failover_seconds:
                        raise MusicGenError(f"no replica took the session within {self.failover_seconds:g} s "
                                            f"({reason}; last: {error})") from error
                    time.sleep(delay)
                    delay = min(1.0, delay * 2)
                    continue
                old.close()
                self.live = new
                self.live.samples_acked = old.samples_acked
                switched = Switched(sample, round(time.monotonic() - broke, 3), reason)
                self.switches.append(switched)
                return iter(new)

    def _keep(self, chunk: AudioChunk) -> None:
        if chunk.codes is None:
            return
        self._codes.append(chunk.codes)
        self._code_frames += chunk.codes.shape[0]
        self._codes_end = chunk.first_frame + chunk.frame_count
        window = self.started.context_frames
        while self._codes and self._code_frames - self._codes[0].shape[0] >= window:
            self._code_frames -= self._codes.pop(0).shape[0]

    def _drop_from(self, frame: int) -> None:
        drop = max(0, self._codes_end - frame)
        self._codes_end = min(self._codes_end, frame)
        while drop and self._codes:
            last = self._codes[-1]
            if last.shape[0] <= drop:
                drop -= last.shape[0]
                self._code_frames -= last.shape[0]
                self._codes.pop()
            else:
                self._codes[-1] = last[: last.shape[0] - drop]
                self._code_frames -= drop
                drop = 0

    def _window(self) -> np.ndarray | None:
        """(frames, codebooks) of the last context window received, or None before any."""
        if not self._codes:
            return None
        codes = np.concatenate(self._codes)
        return codes[-self.started.context_frames:]
