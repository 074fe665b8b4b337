"""A real musicgen server on a loopback port, run on its own event-loop thread, for blocking test clients."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import grpc
import numpy as np

from musicgen.v1 import musicgen_pb2 as pb
from musicgen.v1 import musicgen_pb2_grpc as pb_grpc
from musicgen_core import MusicGen
from server.engine import Engine, EngineConfig
from server.main import RunningServer, ServerOptions, start_server


class ServerThread:
    def __init__(self, model: MusicGen, engine_config: EngineConfig = EngineConfig(),
                 options: ServerOptions | None = None, warm_up: bool = False):
        self.model = model
        self.warm_up = warm_up
        self.engine = Engine(model, engine_config)
        self.options = options or ServerOptions(port=0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: RunningServer | None = None

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        started = start_server(self.engine, self.options, warm_up=self.warm_up)
        self.running = asyncio.run_coroutine_threadsafe(started, self.loop).result(60)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> pb_grpc.MusicGenStub:
        return pb_grpc.MusicGenStub(self.channel())

    def raw_session(self):
        """The Session RPC taking raw bytes as requests (no client-side serialization), for bytes that do not
        parse; events are parsed as usual."""
        return self.channel().stream_stream("/musicgen.v1.MusicGen/Session", request_serializer=lambda data: data,
                                            response_deserializer=pb.SessionEvent.FromString)

    def raw_generate(self):
        """The Generate RPC taking its request as raw bytes."""
        return self.channel().unary_stream("/musicgen.v1.MusicGen/Generate", request_serializer=lambda data: data,
                                           response_deserializer=pb.SessionEvent.FromString)

    def stop(self, grace: float = 5.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(60)
            self.running = None

    def __exit__(self, *exc) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Collected:
    events: list
    pcm: np.ndarray  # (channels, samples) float32
    codes: np.ndarray  # (codebooks, frames)

    def of(self, kind: str) -> list:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("event") == kind]


def collect(events, channels: int = 1, codebooks: int = 4, encoding: str = "<f4") -> Collected:
    """Drain a stream of SessionEvents into PCM, codes and the events themselves."""
    seen, pcm, codes = [], [], []
    for event in events:
        seen.append(event)
        if event.WhichOneof("event") == "audio":
            data = np.frombuffer(event.audio.pcm, dtype=encoding)
            pcm.append(data.reshape(-1, channels).T.astype(np.float32) / (32767.0 if encoding == "<i2" else 1.0))
            codes.extend(event.audio.codes)
    joined = np.concatenate(pcm, axis=1) if pcm else np.zeros((channels, 0), np.float32)
    return Collected(seen, joined, np.array(codes, dtype=np.int64).reshape(-1, codebooks).T)


class RequestQueue:
    """A request iterator the test feeds while the call runs (a blocking bidi stream)."""

    _END = object()

    def __init__(self, first: pb.SessionRequest | None = None):
        import queue
        self.queue: "queue.Queue" = queue.Queue()
        if first is not None:
            self.queue.put(first)

    def send(self, request: pb.SessionRequest) -> None:
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(self._END)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            yield item


def start_request(prompt: str = "", **fields) -> pb.SessionRequest:
    return pb.SessionRequest(start=pb.StartSession(prompt=prompt, **fields))
