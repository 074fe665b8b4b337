"""`musicgen-web`: a browser player for live MusicGen sessions, served on loopback.

    musicgen-web --server 127.0.0.1:50051 [--host 127.0.0.1] [--port 8080]

A small aiohttp gateway. It serves one page (files in client/web/static/, no CDN) and bridges each of the
page's WebSockets to at most one live session at a time through the blocking client library. The page plays
the audio in an AudioWorklet jitter buffer and acks the samples it played; the gateway passes every ack on, so
the server is paced exactly as by the native `Player`. Opening, iterating, steering and acking a session
block, so they run in worker threads: the event loop only moves messages. The message protocol is in
protos/README.md ("Browser player").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import struct
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

try:
    from aiohttp import WSCloseCode, WSMsgType, web
except ImportError as missing:  # the [client] (or [web]) extra
    raise ImportError('musicgen-web needs aiohttp: pip install "musicgen-live[web]"') from missing

from .errors import MusicGenError
from .events import AudioChunk, Event, Finished, Notice, Retracted, Started
from .program import add_server_arguments, configure_logging
from .session import LiveSession, MusicGenClient

log = logging.getLogger("musicgen.web")

STATIC_DIR = Path(__file__).resolve().parent / "web" / "static"
MAX_PROMPTS = 4
# Binary audio frame: start_sample int64, channels uint32, reserved uint32 (0), then float32 PCM interleaved,
# all little-endian. 16 bytes keeps the PCM 4-byte aligned for a Float32Array view.
AUDIO_HEADER = struct.Struct("<qII")

Prompts = tuple[tuple[str, float], ...]


# -- commands from the page: parsed and checked before anything acts on them ---------------------------------

class BadMessage(ValueError):
    """A page message the gateway cannot act on; the text goes back to the page as is."""


@dataclass(frozen=True)
class Start:
    prompts: Prompts
    lead_seconds: float  # 0: the server's default


@dataclass(frozen=True)
class SetPrompts:
    prompts: Prompts
    transition_seconds: float  # 0: at once
    rollback_seconds: float  # > 0: instant steering, landing this long after what was acked as played


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ack:
    samples_played: int


Command = Start | SetPrompts | Pause | Resume | Stop | Ack


def parse_command(text: str) -> Command:
    """One JSON text message from the page -> a Command; BadMessage says what is wrong with it."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadMessage(f"malformed JSON: {error}") from None
    if not isinstance(message, dict):
        raise BadMessage(f"expected a JSON object with a \"type\", got {type(message).__name__}")
    kind = message.get("type")
    if kind == "start":
        return Start(_prompts(message), _number(message, "lead_seconds", 0.0))
    if kind == "prompt":  # the server's ranges: a value outside them would end the session
        return SetPrompts(_prompts(message), _number(message, "transition_seconds", 0.0, most=600.0),
                          _number(message, "rollback_seconds", 0.0, most=10.0))
    if kind == "ack":
        played = message.get("samples_played")
        if isinstance(played, bool) or not isinstance(played, int) or played < 0:
            raise BadMessage(f"ack.samples_played must be an integer >= 0, got {played!r}")
        return Ack(played)
    if kind in SIMPLE_COMMANDS:
        return SIMPLE_COMMANDS[kind]()
    raise BadMessage(f"unknown message type {kind!r}; one of ack, pause, prompt, resume, start, stop")


SIMPLE_COMMANDS = {"pause": Pause, "resume": Resume, "stop": Stop}


def _number(message: dict, name: str, default: float, most: float = math.inf) -> float:
    value = message.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= most:
        bound = f"in [0, {most:g}]" if math.isfinite(most) else ">= 0"
        raise BadMessage(f"{message['type']}.{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _prompts(message: dict) -> Prompts:
    """`prompts`: 1-4 {"text": str, "weight": number >= 0}, texts distinct, one weight > 0."""
    entries = message.get("prompts")
    where = f"{message['type']}.prompts"
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_PROMPTS:
        raise BadMessage(f"{where} must be a list of 1 to {MAX_PROMPTS} {{text, weight}} objects, got {entries!r}")
    pairs = []
    for index, entry in enumerate(entries):
        text = entry.get("text") if isinstance(entry, dict) else None
        weight = entry.get("weight", 1.0) if isinstance(entry, dict) else None
        if not isinstance(text, str):
            raise BadMessage(f"{where}[{index}].text must be a string, got {text!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise BadMessage(f"{where}[{index}].weight must be a finite number >= 0, got {weight!r}")
        if text in (seen for seen, _ in pairs):
            raise BadMessage(f"{where}[{index}].text {text!r} appears twice")
        pairs.append((text, float(weight)))
    if not any(weight > 0 for _, weight in pairs):
        raise BadMessage(f"{where}: at least one weight must be > 0")
    return tuple(pairs)


# -- events to the page ---------------------------------------------------------------------------------------

def event_message(event: Event) -> dict:
    """The JSON message for one session event (an AudioChunk's audio follows as a binary frame)."""
    if isinstance(event, AudioChunk):
        return {"type": "chunk", "start_sample": event.start_sample, "end_sample": event.end_sample,
                "realtime_factor": event.realtime_factor, "prompt_revision": event.prompt_revision,
                "prompts": [list(pair) for pair in event.prompts] or [[event.prompt, 1.0]]}
    if isinstance(event, Started):
        return {"type": "started", "session_id": event.session_id, "sample_rate": event.sample_rate,
                "channels": event.channels, "first_sample": event.first_sample,
                "max_lead_seconds": event.max_lead_seconds, "chunk_samples": event.chunk_samples,
                "latency_samples": event.latency_samples,
                "prompts": [list(pair) for pair in event.prompts] or [[event.prompt, 1.0]]}
    if isinstance(event, Notice):
        return {"type": "notice", "kind": event.kind.value, "frame": event.frame, "sample": event.sample,
                "prompt_revision": event.prompt_revision, "message": event.message}
    if isinstance(event, Retracted):
        return {"type": "retracted", "frame": event.frame, "sample": event.sample}
    if isinstance(event, Finished):
        return {"type": "finished", "reason": event.reason.value, "total_samples": event.total_samples,
                "message": event.message}
    raise TypeError(f"not a session event: {event!r}")


def audio_frame(chunk: AudioChunk) -> bytes:
    """The binary frame of a chunk's audio (layout: AUDIO_HEADER, then float32 interleaved)."""
    header = AUDIO_HEADER.pack(chunk.start_sample, chunk.audio.shape[1], 0)
    return header + chunk.audio.astype("<f4", copy=False).tobytes()


# -- one page ---------------------------------------------------------------------------------------------------

class PageConnection:
    """One WebSocket and at most one live session at a time: page commands in, session events out."""

    def __init__(self, socket: web.WebSocketResponse, client: MusicGenClient):
        self.socket = socket
        self.client = client
        self.session: LiveSession | None = None
        self.pump: asyncio.Task | None = None
        # Reading events blocks until the server sends (up to the lead): its own thread, so that sessions
        # waiting there never use up the shared pool that their acks need to run in.
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="musicgen-web-events")
        self.acks = 0  # acks passed on, for the page's figures and the log

    @property
    def live(self) -> bool:
        return self.pump is not None and not self.pump.done()

    async def run(self) -> None:
        """Serve the page until its WebSocket closes; the session goes with it."""
        await self.send_hello()
        try:
            async for message in self.socket:
                if message.type == WSMsgType.TEXT:
                    await self.handle(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self.send_error("binary messages are not accepted; send JSON text")
        finally:
            await self.close_session()

    async def send_hello(self) -> None:
        try:
            info = await asyncio.to_thread(self.client.model_info)
        except MusicGenError as error:
            await self.send_error(f"server {self.client.target}: {type(error).__name__}: {error} "
                                  "(reload the page to retry)")
            return
        await self.send_json({"type": "hello", "model": info.model_name, "sample_rate": info.sample_rate,
                              "channels": info.channels, "max_prompts": min(info.max_prompts, MAX_PROMPTS),
                              "default_lead_seconds": info.default_max_lead_seconds,
                              "max_lead_seconds": info.max_lead_seconds, "server": self.client.target})

    async def handle(self, text: str) -> None:
        try:
            await self.execute(parse_command(text))
        except BadMessage as problem:
            await self.send_error(str(problem))
        except (MusicGenError, ValueError) as problem:  # refused by the server, or by the client library
            await self.send_error(f"{type(problem).__name__}: {problem}")
        except Exception as problem:  # a bug must not take the page's connection down
            log.exception("handling %r", text[:200])
            await self.send_error(f"internal error: {type(problem).__name__}: {problem}")

    async def execute(self, command: Command) -> None:
        if isinstance(command, Start):
            await self.start(command)
            return
        if not self.live:
            if isinstance(command, Ack):
                return  # an ack may cross the session's Finished on the way: harmless
            raise BadMessage("no session is playing; send start first")
        session = self.session
        if isinstance(command, Ack):
            self.acks += 1
            await asyncio.to_thread(session.ack, command.samples_played)
        elif isinstance(command, SetPrompts):
            text, prompts = _text_or_prompts(command.prompts)
            await asyncio.to_thread(session.set_prompt, text, prompts=prompts,
                                    transition_seconds=command.transition_seconds or None,
                                    rollback_seconds=command.rollback_seconds or None)
        elif isinstance(command, Pause):
            await asyncio.to_thread(session.pause)
        elif isinstance(command, Resume):
            await asyncio.to_thread(session.resume)
        elif isinstance(command, Stop):
            await asyncio.to_thread(session.stop)

    async def start(self, command: Start) -> None:
        if self.live:
            raise BadMessage("a session is already playing; send stop first")
        text, prompts = _text_or_prompts(command.prompts)
        fields = {"prompts": prompts} if prompts is not None else {}
        self.session = await asyncio.to_thread(self.client.open_session, text or "", client_name="musicgen-web",
                                               max_lead_seconds=command.lead_seconds, **fields)
        self.acks = 0
        log.info("session=%s event=started prompts=%s", self.session.started.session_id, command.prompts)
        self.pump = asyncio.create_task(self.pump_events(self.session))

    async def pump_events(self, session: LiveSession) -> None:
        """Forward the session's events (Started first, Finished last) until it ends or the page goes."""
        events = iter(session)
        loop = asyncio.get_running_loop()
        try:
            while (event := await loop.run_in_executor(self.reader, next, events, None)) is not None:
                message = event_message(event)
                if isinstance(event, AudioChunk):
                    message.update(samples_acked=session.samples_acked, acks=self.acks)
                await self.send_json(message)
                if isinstance(event, AudioChunk) and not self.socket.closed:
                    await self.socket.send_bytes(audio_frame(event))
        except MusicGenError as error:  # the stream broke: the page hears why, and that the session is over
            log.info("session=%s event=error %s", session.started.session_id, error)
            await self.send_error(f"server: {type(error).__name__}: {error}")
            await self.send_json({"type": "finished", "reason": "error", "total_samples": session.samples_received,
                                  "message": str(error)})
        except ConnectionError:  # the page went while we were sending; run() closes the session
            pass
        finally:
            log.info("session=%s event=ended acks=%d samples_acked=%d", session.started.session_id, self.acks,
                     session.samples_acked)

    async def close_session(self) -> None:
        if self.session is not None:  # always (idempotent): a pump that ended on a send error left it open
            await asyncio.to_thread(self.session.close)
        if self.pump is not None:
            await self.pump
        self.reader.shutdown(wait=False)

    async def send_json(self, message: dict) -> None:
        if not self.socket.closed:
            await self.socket.send_str(json.dumps(message))

    async def send_error(self, text: str) -> None:
        log.info("page error: %s", text)
        await self.send_json({"type": "error", "message": text})


def _text_or_prompts(prompts: Prompts) -> tuple[str | None, Prompts | None]:
    """One text goes as a plain prompt; several as weighted prompts."""
    return (prompts[0][0], None) if len(prompts) == 1 else (None, prompts)


# -- the web application -------------------------------------------------------------------------------------

def build_app(client: MusicGenClient) -> web.Application:
    """The page at /, its files under /static/, and the WebSocket at /ws."""
    open_sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        _check_origin(request)
        socket = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 20)
        await socket.prepare(request)
        open_sockets.add(socket)
        await PageConnection(socket, client).run()
        return socket

    async def close_sockets(app: web.Application) -> None:
        """On shutdown, close the pages' sockets first: each takes its session with it at once."""
        for socket in list(open_sockets):
            await socket.close(code=WSCloseCode.GOING_AWAY, message=b"musicgen-web is shutting down")

    app = web.Application()
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static/", STATIC_DIR)
    return app


def _check_origin(request: web.Request) -> None:
    """Only this gateway's own page may open a session: a page from any other site the user visits could
    otherwise reach ws://127.0.0.1 (WebSockets are not bound by the same-origin policy). The Host must name
    this gateway's address or a loopback name too: a site that rebinds its own name to 127.0.0.1 would send
    matching Origin and Host headers."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(text=f"WebSocket from origin {origin} refused; open http://{request.host}/")
    host = urlsplit(f"//{request.host}").hostname or ""
    served = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if host not in ("localhost", "127.0.0.1", "::1") and (served is None or host != served[0]):
        raise web.HTTPForbidden(text=f"WebSocket for host {request.host} refused: open the page by this "
                                     "gateway's address or localhost")


async def serve(client: MusicGenClient, host: str, port: int) -> None:
    """Listen until SIGTERM or SIGINT; prints the address line once listening."""
    runner = web.AppRunner(build_app(client), shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    log.info("event=listening http=%s:%d server=%s", bound_host, bound_port, client.target)
    print(f"musicgen-web: listening on http://{bound_host}:{bound_port}/", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()  # closes the WebSockets, and so their sessions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicgen-web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve the page on (default loopback; AudioWorklet needs a secure "
                             "context: loopback or https)")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    client = MusicGenClient(args.server, token=args.token)
    try:
        asyncio.run(serve(client, args.host, args.port))
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
