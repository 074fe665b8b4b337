"""`musicgen-osc`: live MusicGen sessions steered over OSC, for live coders (SuperCollider, TidalCycles, Sonic Pi,
Strudel) and DAWs.

    musicgen-osc --server 127.0.0.1:50051 [--osc-port 57130] [--reply-port N] [--device NAME | --no-playback]

One session per OSC channel (`/musicgen/<channel>/...`), each played through its own `Player` (or, with
`--no-playback`, paced by the clock with nothing played). Replies go to the sender's address, or to
`--reply-port` on the sender's host. The address space is in protos/README.md ("OSC bridge"). A bad message
gets an `/musicgen/error` reply naming the address and the argument; the bridge keeps running.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .audio_in import feed_wav
from .connection import DEFAULT_TARGET
from .errors import MusicGenError
from .events import AudioChunk, Event, Finished, Notice, NoticeKind
from .session import LiveSession, MusicGenClient

log = logging.getLogger("musicgen.osc")

PREFIX = "/musicgen"
DEFAULT_OSC_PORT = 57130
MAX_CHANNELS = 16


class OscError(ValueError):
    """A message the bridge cannot act on: `argument` names the offending one (or "" for the message)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


@dataclass
class Channel:
    number: int
    reply_to: tuple[str, int]
    device: str | None = None
    session: LiveSession | None = None
    player: object | None = None  # client.player.Player, or a ClockPlayer with --no-playback
    underruns_reported: int = 0
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.session is not None and self.session.finished is None


class ClockPlayer:
    """--no-playback: reads the session and acks by the wall clock, as a device would consume it."""

    def __init__(self, session: LiveSession, on_event):
        self.session, self.on_event = session, on_event
        self.samples_received = 0
        self.underruns = 0
        self._started = time.monotonic()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "ClockPlayer":
        self._thread.start()
        return self

    @property
    def samples_played(self) -> int:
        rate = self.session.started.sample_rate
        return min(self.samples_received, round((time.monotonic() - self._started) * rate))

    @property
    def buffered_seconds(self) -> float:
        return (self.samples_received - self.samples_played) / self.session.started.sample_rate

    def _run(self) -> None:
        for event in self.session:
            if isinstance(event, AudioChunk):
                self.samples_received = event.end_sample
            self.on_event(event)
            self.session.ack(self.samples_played)
            if self._closing.is_set():
                break

    def close(self) -> None:
        self._closing.set()
        self.session.close()


class OscBridge:
    """Holds the channels and turns OSC messages into session steering; replies over `reply` (a UDP socket)."""

    def __init__(self, client: MusicGenClient, *, playback: bool = True, device: str | None = None,
                 reply_port: int | None = None, position_interval: float = 0.5, lead_seconds: float = 0.0):
        self.client = client
        self.playback = playback
        self.default_device = device
        self.reply_port = reply_port
        self.position_interval = position_interval
        self.lead_seconds = lead_seconds
        self.channels: dict[int, Channel] = {}
        self.lock = threading.Lock()
        self.reply = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.closing = threading.Event()

    # -- replies --------------------------------------------------------------------------------------------

    def send(self, to: tuple[str, int], address: str, *args) -> None:
        from pythonosc.osc_message_builder import OscMessageBuilder

        builder = OscMessageBuilder(address=address)
        for arg in args:
            builder.add_arg(arg)
        try:
            self.reply.sendto(builder.build().dgram, to)
        except OSError as error:  # a reply that cannot go out must not stop the bridge
            log.warning("reply to %s failed: %s", to, error)

    def reply_address(self, sender: tuple[str, int]) -> tuple[str, int]:
        return (sender[0], self.reply_port) if self.reply_port else sender

    def error(self, sender: tuple[str, int], address: str, argument: str, message: str) -> None:
        log.info("osc error address=%s argument=%s: %s", address, argument, message)
        self.send(self.reply_address(sender), f"{PREFIX}/error", address, argument, message)

    # -- dispatch -------------------------------------------------------------------------------------------

    def handle(self, sender: tuple[str, int], address: str, args: list) -> None:
        """One OSC message: `/musicgen/<channel>/<command> args...`."""
        try:
            parts = address.split("/")
            if len(parts) != 4 or "/" + parts[1] != PREFIX:
                raise OscError("", f"unknown address; expected {PREFIX}/<channel>/<command>")
            channel = _channel_number(parts[2])
            command = COMMANDS.get(parts[3])
            if command is None:
                raise OscError("", f"unknown command {parts[3]!r}; one of {', '.join(sorted(COMMANDS))}")
            with self.lock:
                command(self, channel, sender, list(args))
        except OscError as problem:
            self.error(sender, address, problem.argument, str(problem))
        except MusicGenError as problem:  # the server refused (e.g. at its session limit)
            self.error(sender, address, "", f"{type(problem).__name__}: {problem}")
        except Exception as problem:  # a bug must not take the bridge down
            log.exception("handling %s", address)
            self.error(sender, address, "", f"internal error: {type(problem).__name__}: {problem}")

    def live_channel(self, number: int) -> Channel:
        channel = self.channels.get(number)
        if channel is None or not channel.live:
            raise OscError("", f"channel {number} has no live session; send {PREFIX}/{number}/start first")
        return channel

    # -- commands -------------------------------------------------------------------------------------------

    def start(self, number: int, sender, args: list) -> None:
        prompt = _string(args, 0, "prompt", optional=True) or ""
        if len(args) > 1:
            raise OscError("2", "start takes one argument: the prompt")
        old = self.channels.get(number)
        if old is not None and old.live:
            raise OscError("", f"channel {number} is already playing; send {PREFIX}/{number}/stop first")
        channel = Channel(number, self.reply_address(sender), device=old.device if old else self.default_device)
        session = self.client.open_session(prompt, max_lead_seconds=self.lead_seconds, client_name="musicgen-osc")
        channel.session = session
        on_event = lambda event: self.on_event(channel, event)  # noqa: E731
        if self.playback:
            from .player import Player
            channel.player = Player(session, device=_device(channel.device), on_event=on_event).start()
        else:
            channel.player = ClockPlayer(session, on_event).start()
        self.channels[number] = channel
        started = session.started
        self.send(channel.reply_to, f"{PREFIX}/{number}/started", started.session_id, started.sample_rate)
        reporter = threading.Thread(target=self.report_position, args=(channel,), daemon=True)
        reporter.start()
        channel.threads.append(reporter)

    def prompt(self, number: int, sender, args: list) -> None:
        text = _string(args, 0, "text")
        if len(args) > 1:
            raise OscError("2", "prompt takes one argument: the text")
        self.live_channel(number).session.set_prompt(text)

    def weights(self, number: int, sender, args: list) -> None:
        self.live_channel(number).session.set_prompt(prompts=_pairs(args, 0))

    def morph(self, number: int, sender, args: list) -> None:
        seconds = _number(args, 0, "seconds")
        if not 0 <= seconds <= 600:
            raise OscError("1", f"seconds must be in [0, 600], got {seconds:g}")
        if len(args) == 2:
            target = {"text": _string(args, 1, "text")}
        else:
            target = {"prompts": _pairs(args, 1)}
        self.live_channel(number).session.set_prompt(transition_seconds=seconds, **target)

    def append(self, number: int, sender, args: list) -> None:
        path = Path(_string(args, 0, "path"))
        if not path.is_file():
            raise OscError("1", f"no such file: {path}")
        channel = self.live_channel(number)
        try:
            feed_wav(channel.session, path, max_seconds=self.client.model_info().max_audio_prompt_seconds)
        except (OSError, ValueError) as error:
            raise OscError("1", f"cannot read {path}: {error}") from None

    def pause(self, number: int, sender, args: list) -> None:
        self.live_channel(number).session.pause()

    def resume(self, number: int, sender, args: list) -> None:
        self.live_channel(number).session.resume()

    def stop(self, number: int, sender, args: list) -> None:
        self.live_channel(number).session.stop()

    def device(self, number: int, sender, args: list) -> None:
        name = _string(args, 0, "device")
        channel = self.channels.get(number)
        if channel is not None and channel.live:
            raise OscError("", f"channel {number} is playing: set its device before start")
        self.channels[number] = Channel(number, self.reply_address(sender), device=name or None)

    # -- events back to the sender --------------------------------------------------------------------------

    def on_event(self, channel: Channel, event: Event) -> None:
        """Called on the channel's player thread for every session event."""
        base = f"{PREFIX}/{channel.number}"
        if isinstance(event, Notice):
            if event.kind is NoticeKind.PROMPT_APPLIED:
                self.send(channel.reply_to, f"{base}/applied", event.prompt_revision, event.frame, event.sample)
            elif event.kind is NoticeKind.TRANSITION_ENDED:
                self.send(channel.reply_to, f"{base}/transition_ended", event.frame, event.sample)
            elif event.kind in (NoticeKind.PAUSED, NoticeKind.RESUMED, NoticeKind.AUDIO_APPENDED):
                self.send(channel.reply_to, f"{base}/{event.kind.value}", event.frame, event.sample)
        elif isinstance(event, Finished):
            self.send(channel.reply_to, f"{base}/finished", event.reason.value, event.total_samples, event.message)

    def report_position(self, channel: Channel) -> None:
        """Every position_interval while the session lives: samples played, buffered seconds, underruns."""
        base = f"{PREFIX}/{channel.number}"
        while not self.closing.wait(self.position_interval) and channel.live:
            player = channel.player
            buffered = getattr(player, "buffered_seconds", None)
            if buffered is None:
                buffered = player.stats.buffered_seconds
            underruns = player.underruns
            self.send(channel.reply_to, f"{base}/position", int(player.samples_played), float(buffered), underruns)
            if underruns > channel.underruns_reported:
                channel.underruns_reported = underruns
                self.send(channel.reply_to, f"{base}/underruns", underruns)

    def close(self) -> None:
        self.closing.set()
        for channel in list(self.channels.values()):
            if channel.player is not None:
                channel.player.close()
        self.reply.close()


COMMANDS = {"start": OscBridge.start, "prompt": OscBridge.prompt, "weights": OscBridge.weights,
            "morph": OscBridge.morph, "append": OscBridge.append, "pause": OscBridge.pause,
            "resume": OscBridge.resume, "stop": OscBridge.stop, "device": OscBridge.device}


# -- argument checks (OSC arguments are numbered from 1 in replies) -------------------------------------------

def _channel_number(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < MAX_CHANNELS:
        raise OscError("", f"channel must be 0-{MAX_CHANNELS - 1}, got {text!r}")
    return int(text)


def _string(args: list, index: int, name: str, optional: bool = False) -> str | None:
    if index >= len(args):
        if optional:
            return None
        raise OscError(str(index + 1), f"missing argument {index + 1} ({name}, a string)")
    if not isinstance(args[index], str):
        raise OscError(str(index + 1), f"argument {index + 1} ({name}) must be a string, got "
                                       f"{type(args[index]).__name__}")
    return args[index]


def _number(args: list, index: int, name: str) -> float:
    if index >= len(args):
        raise OscError(str(index + 1), f"missing argument {index + 1} ({name}, a number)")
    value = args[index]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OscError(str(index + 1), f"argument {index + 1} ({name}) must be a finite number, got {value!r}")
    return float(value)


def _pairs(args: list, start: int) -> list[tuple[str, float]]:
    """text, weight, text, weight, ... from args[start:] (weights finite and >= 0, one > 0, texts distinct)."""
    rest = args[start:]
    if not rest:
        raise OscError(str(start + 1), "expected text, weight pairs (text weight text weight ...)")
    if len(rest) % 2:
        raise OscError(str(start + len(rest) + 1), f"missing argument {start + len(rest) + 1}: the last text's weight")
    pairs = []
    for offset in range(0, len(rest), 2):
        text = _string(args, start + offset, "text")
        weight = _number(args, start + offset + 1, "weight")
        if weight < 0:
            raise OscError(str(start + offset + 2), f"weight must be >= 0, got {weight:g}")
        if text in (t for t, _ in pairs):
            raise OscError(str(start + offset + 1), f"{text!r} appears twice")
        pairs.append((text, weight))
    if len(pairs) > 4:
        raise OscError(str(start + 1), f"at most 4 prompts, got {len(pairs)}")
    if not any(weight > 0 for _, weight in pairs):
        raise OscError(str(start + 2), "at least one weight must be > 0")
    return pairs


def _device(name: str | None) -> int | str | None:
    return int(name) if name is not None and name.strip().isdigit() else name


# -- the UDP server -----------------------------------------------------------------------------------------

class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        from pythonosc.osc_packet import OscPacket, ParseError

        data, bridge = self.request[0], self.server.bridge
        try:
            messages = [timed.message for timed in OscPacket(data).messages]
        except ParseError as error:
            bridge.error(self.client_address, "", "", f"malformed OSC packet ({len(data)} bytes): {error}")
            return
        for message in messages:
            bridge.handle(self.client_address, message.address, list(message.params))


class OscServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], bridge: OscBridge):
        super().__init__(address, _Handler)
        self.bridge = bridge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicgen-osc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("MUSICGEN_SERVER", DEFAULT_TARGET),
                        help=f"HOST:PORT of the MusicGen server (default $MUSICGEN_SERVER or {DEFAULT_TARGET})")
    parser.add_argument("--token", default=os.environ.get("MUSICGEN_TOKEN"), help="bearer token")
    parser.add_argument("--osc-host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--osc-port", type=int, default=DEFAULT_OSC_PORT)
    parser.add_argument("--reply-port", type=int, help="send replies to this port of the sender's host "
                                                       "(default: the sender's own address)")
    parser.add_argument("--device", help="output device for new channels: index or name substring")
    parser.add_argument("--no-playback", action="store_true", help="play nothing; pace sessions by the clock")
    parser.add_argument("--lead", type=float, default=0.0, help="seconds the server may run ahead (default 2)")
    parser.add_argument("--position-interval", type=float, default=0.5, help="seconds between /position replies")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        import pythonosc  # noqa: F401
    except ImportError:
        print("musicgen-osc: needs python-osc: pip install python-osc (or the project's [client] extra)",
              file=sys.stderr)
        return 2
    client = MusicGenClient(args.server, token=args.token)
    bridge = OscBridge(client, playback=not args.no_playback, device=args.device, reply_port=args.reply_port,
                       position_interval=args.position_interval, lead_seconds=args.lead)
    server = OscServer((args.osc_host, args.osc_port), bridge)
    log.info("event=listening osc=%s:%d server=%s", args.osc_host, server.server_address[1], args.server)
    print(f"musicgen-osc: listening on {args.osc_host}:{server.server_address[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        bridge.close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
