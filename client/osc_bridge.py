"""`musicgen-osc`: live MusicGen sessions steered over OSC, for live coders (SuperCollider, TidalCycles, Sonic Pi,
Strudel) and DAWs.

    musicgen-osc --server 127.0.0.1:50051 [--osc-port 57130] [--reply-port N] [--device NAME | --no-playback]
                 [--link [--quantum 4]]

One session per OSC channel (`/musicgen/<channel>/...`), each played through its own `Player` (or, with
`--no-playback`, paced by the clock with nothing played). Replies go to the sender's address, or to
`--reply-port` on the sender's host. The address space is in protos/README.md ("OSC bridge"). A bad message
gets an `/musicgen/error` reply naming the address and the argument; the bridge keeps running.

With `--link` the bridge is an Ableton Link peer: every session takes Link's tempo, and its bar lines are kept
on Link's at the speaker (client/link_tempo.py), so `/musicgen/<channel>/at next_bar ...` lands on Link's next
bar line; `/landed` replies report how far from it the change was heard.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .audio_in import feed_wav
from .errors import MusicGenError
from .events import AudioChunk, Event, Finished, Notice, NoticeKind
from .link_tempo import Anchor, LinkClock, LinkUnavailable, anchor, bar_error_samples, moved
from .program import add_server_arguments, configure_logging
from .requests import At, Tempo
from .session import LiveSession, MusicGenClient

log = logging.getLogger("musicgen.osc")

PREFIX = "/musicgen"
DEFAULT_OSC_PORT = 57130
MAX_CHANNELS = 16
LINK_POLL_SECONDS = 0.05  # how often a Link tempo or phase change is looked for
ANCHOR_WAIT_SECONDS = 3.0  # a bar-scheduled command waits this long for playback to start (bar lines unknown)
SCHEDULABLE = ("prompt", "weights", "morph", "append", "pause", "stop")
MAX_SCHEDULED = 64  # the server's limit of commands waiting for their frame (it ends the session past it)


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
    anchor: Anchor | None = None  # the tempo last sent with --link
    tempo_lock: threading.Lock = field(default_factory=threading.Lock)
    landings: list[tuple[str, int]] = field(default_factory=list)  # (notice, sample) not yet heard (--link)
    scheduled: list[int] = field(default_factory=list)  # per command sent with `at`: the sample it has landed by

    @property
    def live(self) -> bool:
        return self.session is not None and self.session.finished is None


class ClockPlayer:
    """--no-playback: a virtual device that consumes the session at the wall clock's rate and acks it. Like a
    sound card's player it stops when it runs dry (counted as an underrun unless the session is paused) and goes
    on from where it was when audio comes again, so a stall never lets the server run unpaced afterwards."""

    ack_interval = 0.02

    def __init__(self, session: LiveSession, on_event):
        self.session, self.on_event = session, on_event
        self.samples_received = 0
        self.underruns = 0
        self._rate = session.started.sample_rate
        self._played = 0.0
        self._dry = False
        self._paused = bool(session.started.paused)
        self._last = time.monotonic()
        self._sample_zero_at = self._last  # when sample 0 would have been heard, on the current run of the clock
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._ack, daemon=True)]

    def start(self) -> "ClockPlayer":
        for thread in self._threads:
            thread.start()
        return self

    @property
    def samples_played(self) -> int:
        return int(self._advance())

    @property
    def buffered_seconds(self) -> float:
        return (self.samples_received - self._advance()) / self._rate

    def heard_at(self, sample: int) -> float | None:
        """Sample n is due when the clock, on its current run, gets to it (None before any audio arrived)."""
        self._advance()
        return self._sample_zero_at + sample / self._rate if self.samples_received else None

    def sample_heard_at(self, when: float) -> float | None:
        self._advance()
        return (when - self._sample_zero_at) * self._rate if self.samples_received else None

    def _advance(self) -> float:
        """Move the clock to now: it plays what has arrived and waits at the end of it."""
        with self._lock:
            now = time.monotonic()
            due = self._played + (now - self._last) * self._rate
            if due > self.samples_received:
                if not self._dry and not self._paused and self.samples_received > 0:
                    self.underruns += 1
                self._dry, due = True, float(self.samples_received)
            else:
                self._dry = False
            self._played, self._last = due, now
            self._sample_zero_at = now - due / self._rate
            return due

    def _read(self) -> None:
        for event in self.session:
            self._advance()  # the clock up to now, then the new audio
            if isinstance(event, AudioChunk):
                self.samples_received = event.end_sample
            elif isinstance(event, Notice) and event.kind in (NoticeKind.PAUSED, NoticeKind.RESUMED):
                self._paused = event.kind is NoticeKind.PAUSED
            self.on_event(event)
            if self._closing.is_set():
                break

    def _ack(self) -> None:
        """Acks as time passes, not only when audio arrives: a paced session waits at its lead for them."""
        while not self._closing.wait(self.ack_interval) and self.session.finished is None:
            self.session.ack(self.samples_played)

    def close(self) -> None:
        self._closing.set()
        self.session.close()


class OscBridge:
    """Holds the channels and turns OSC messages into session steering; replies over `reply` (a UDP socket)."""

    def __init__(self, client: MusicGenClient, *, playback: bool = True, device: str | None = None,
                 reply_port: int | None = None, position_interval: float = 0.5, lead_seconds: float = 0.0,
                 link: LinkClock | None = None):
        self.client = client
        self.link = link
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
            if command is OscBridge.at and self.link is not None:
                self.wait_for_playback(channel)  # outside the lock: other channels go on meanwhile
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
        if old is not None and old.player is not None:
            old.player.close()  # the last session's player (its stream) goes with it
        channel = Channel(number, self.reply_address(sender), device=old.device if old else self.default_device)
        tempo = Tempo(self.link.tempo, self.link.quantum) if self.link else None  # phase set once it plays
        session = self.client.open_session(prompt, max_lead_seconds=self.lead_seconds, client_name="musicgen-osc",
                                           tempo=tempo)
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

    def prompt(self, number: int, sender, args: list, at: At | None = None) -> None:
        text = _string(args, 0, "text")
        if len(args) > 1:
            raise OscError("2", "prompt takes one argument: the text")
        self.live_channel(number).session.set_prompt(text, at=at)

    def weights(self, number: int, sender, args: list, at: At | None = None) -> None:
        self.live_channel(number).session.set_prompt(prompts=_pairs(args, 0), at=at)

    def morph(self, number: int, sender, args: list, at: At | None = None) -> None:
        seconds = _number(args, 0, "seconds")
        if not 0 <= seconds <= 600:
            raise OscError("1", f"seconds must be in [0, 600], got {seconds:g}")
        if len(args) == 2:
            target = {"text": _string(args, 1, "text")}
        else:
            target = {"prompts": _pairs(args, 1)}
        self.live_channel(number).session.set_prompt(transition_seconds=seconds, at=at, **target)

    def append(self, number: int, sender, args: list, at: At | None = None) -> None:
        path = Path(_string(args, 0, "path"))
        if not path.is_file():
            raise OscError("1", f"no such file: {path}")
        channel = self.live_channel(number)
        try:
            feed_wav(channel.session, path, max_seconds=self.client.model_info().max_audio_prompt_seconds, at=at)
        except (OSError, ValueError) as error:
            raise OscError("1", f"cannot read {path}: {error}") from None

    def pause(self, number: int, sender, args: list, at: At | None = None) -> None:
        self.live_channel(number).session.pause(at)

    def resume(self, number: int, sender, args: list) -> None:
        self.live_channel(number).session.resume()

    def stop(self, number: int, sender, args: list, at: At | None = None) -> None:
        self.live_channel(number).session.stop(at)

    def at(self, number: int, sender, args: list) -> None:
        """`at <when> [value] <command> args...`: the command lands then (see protos/README.md)."""
        kind = _string(args, 0, "when")
        if kind not in ("sample", "frame", "bar", "beat", "next_bar", "next_beat"):
            raise OscError("1", f"when must be sample, frame, bar, beat, next_bar or next_beat, got {kind!r}")
        position = 1
        value = 0
        if kind in ("sample", "frame", "bar", "beat"):
            number_arg = _number(args, 1, kind)
            if number_arg < 0 or number_arg != int(number_arg):
                raise OscError("2", f"{kind} must be a whole number >= 0, got {number_arg:g}")
            value, position = int(number_arg), 2
        name = _string(args, position, "command")
        if name not in SCHEDULABLE:
            raise OscError(str(position + 1), f"{name!r} cannot be scheduled; one of {', '.join(SCHEDULABLE)}")
        when = At(kind, value)
        channel = self.live_channel(number)
        with channel.tempo_lock:
            if kind in ("bar", "beat", "next_bar", "next_beat"):
                self.bars_ready(channel)
            landed_by = self.check_schedulable(channel, when)
            try:
                COMMANDS[name](self, number, sender, args[position + 1:], at=when)
            except OscError as problem:  # number the command's arguments as they are in this message
                argument = str(int(problem.argument) + position + 1) if problem.argument.isdigit() else ""
                raise OscError(argument, str(problem)) from None
            channel.scheduled.append(landed_by)

    def tempo(self, number: int, sender, args: list) -> None:
        """`tempo <bpm> [beats per bar]`: the session's tempo (bar 0 at its first sample); with --link, a tempo
        proposed to the whole Link session, which every session then follows."""
        bpm = _number(args, 0, "bpm")
        if not 20 <= bpm <= 999:  # Link's own range
            raise OscError("1", f"bpm must be in [20, 999], got {bpm:g}")
        beats_per_bar = _number(args, 1, "beats per bar") if len(args) > 1 else None
        if beats_per_bar is not None:
            if beats_per_bar != int(beats_per_bar) or not 1 <= beats_per_bar <= 64:
                raise OscError("2", f"beats per bar must be a whole number 1-64, got {beats_per_bar:g}")
            beats_per_bar = int(beats_per_bar)
        if len(args) > 2:
            raise OscError("3", "tempo takes at most two arguments: bpm, beats per bar")
        channel = self.live_channel(number)
        if self.link is not None:
            if beats_per_bar not in (None, self.link.quantum):
                raise OscError("2", f"with --link a bar is the quantum, {self.link.quantum} beats")
            self.link.set_tempo(bpm)
            with channel.tempo_lock:
                self.follow_link(channel)
            return
        channel.session.set_tempo(bpm, beats_per_bar or 4)
        self.send(channel.reply_to, f"{PREFIX}/{number}/tempo", bpm, beats_per_bar or 4, 0)

    # -- bars and beats ---------------------------------------------------------------------------------------

    def bars_ready(self, channel: Channel) -> None:
        """Bars need a tempo; with --link, bar lines known on Link's (playback started) and just re-anchored."""
        if self.link is None:
            if channel.session.tempo is None:
                raise OscError("1", f"bars and beats need a tempo: send {PREFIX}/{channel.number}/tempo first "
                                    "(or run the bridge with --link)")
            return
        if not self.follow_link(channel, force=True):
            raise OscError("1", "with --link, bars are known once playback starts; it has not")

    def wait_for_playback(self, number: int) -> None:
        """--link: a bar-scheduled command sent right after start waits (up to ANCHOR_WAIT_SECONDS) for the
        channel's playback to begin, when the bar lines at the speaker become known."""
        deadline = time.monotonic() + ANCHOR_WAIT_SECONDS
        while time.monotonic() < deadline:
            channel = self.channels.get(number)
            player = channel.player if channel is not None and channel.live else None
            if player is None or player.sample_heard_at(time.monotonic()) is not None:
                return
            time.sleep(LINK_POLL_SECONDS)

    def check_schedulable(self, channel: Channel, when: At) -> int:
        """What the server would end the session for, refused here: a fixed time it may already have generated,
        or more than MAX_SCHEDULED commands waiting. Returns the output sample by which the command has surely
        landed (for the count of those waiting)."""
        session, started = channel.session, channel.session.started
        sample = (when.value * started.samples_per_frame if when.kind == "frame"
                  else when.sample_at(session.tempo, started.sample_rate))
        horizon = session.earliest_schedulable_sample()
        if sample is not None and sample < horizon:
            raise OscError("2", f"sample {round(sample)} may already be generated (the earliest safe now is "
                                f"{horizon}); too late")
        received = session.samples_received
        channel.scheduled = [until for until in channel.scheduled if until > received]
        if len(channel.scheduled) >= MAX_SCHEDULED:
            raise OscError("", f"{MAX_SCHEDULED} scheduled commands are still waiting on channel "
                               f"{channel.number}; wait for one to land")
        if sample is None:  # next bar / beat: the first one after what the server has generated when it arrives
            tempo = session.tempo
            unit = tempo.beats_per_bar if when.kind == "next_bar" else 1
            sample = horizon + unit * 60.0 * started.sample_rate / tempo.bpm
        return math.ceil(sample) + started.latency_samples + started.chunk_samples

    def follow_link(self, channel: Channel, force: bool = False) -> bool:
        """Send the session Link's tempo and bar phase at the speaker when they changed (or always, `force`);
        False while the bar lines are unknown (not playing yet). Caller holds channel.tempo_lock."""
        started = channel.session.started
        rate = started.sample_rate
        new = anchor(self.link, channel.player, rate, started.samples_per_frame, channel.anchor)
        if new is None:
            return False
        if force or moved(channel.anchor, new, rate):
            channel.session.set_tempo(new.bpm, new.beats_per_bar, new.beat_one_sample)
            if channel.anchor is None or channel.anchor.bpm != new.bpm:
                self.send(channel.reply_to, f"{PREFIX}/{channel.number}/tempo", new.bpm, new.beats_per_bar,
                          new.beat_one_sample)
            channel.anchor = new
        return True

    def report_landings(self, channel: Channel) -> None:
        """--link: once a change's first sample has been heard, how far from Link's bar (and beat) it was."""
        played = channel.player.samples_played
        for landing in [item for item in channel.landings if item[1] < played
                        or (item[0] == NoticeKind.PAUSED.value and item[1] <= played)]:
            channel.landings.remove(landing)
            what, sample = landing
            if what == NoticeKind.PAUSED.value:  # playback stops at it: when the sample before it ends
                before = channel.player.heard_at(sample - 1)
                heard = None if before is None else before + 1.0 / channel.session.started.sample_rate
            else:
                heard = channel.player.heard_at(sample)
            if heard is None or channel.anchor is None:
                continue
            rate, bpm = channel.session.started.sample_rate, channel.anchor.bpm
            self.send(channel.reply_to, f"{PREFIX}/{channel.number}/landed", what, sample,
                      self.link.link_micros(heard), float(self.link.beat_at(heard)),
                      float(bar_error_samples(self.link, heard, bpm, rate, self.link.quantum)),
                      float(bar_error_samples(self.link, heard, bpm, rate, 1)))

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
            if self.link is not None and event.kind in (NoticeKind.PROMPT_APPLIED, NoticeKind.PAUSED,
                                                        NoticeKind.AUDIO_APPENDED, NoticeKind.TRANSITION_ENDED):
                channel.landings.append((event.kind.value, event.sample))
            if event.kind is NoticeKind.PROMPT_APPLIED:
                self.send(channel.reply_to, f"{base}/applied", event.prompt_revision, event.frame, event.sample)
            elif event.kind is NoticeKind.TRANSITION_ENDED:
                self.send(channel.reply_to, f"{base}/transition_ended", event.frame, event.sample)
            elif event.kind in (NoticeKind.PAUSED, NoticeKind.RESUMED, NoticeKind.AUDIO_APPENDED):
                self.send(channel.reply_to, f"{base}/{event.kind.value}", event.frame, event.sample)
        elif isinstance(event, Finished):
            self.send(channel.reply_to, f"{base}/finished", event.reason.value, event.total_samples, event.message)

    def report_position(self, channel: Channel) -> None:
        """Every position_interval while the session lives: samples played, buffered seconds, underruns; with
        --link, every LINK_POLL_SECONDS: Link's tempo and phase followed, landings reported."""
        tick = min(self.position_interval, LINK_POLL_SECONDS) if self.link is not None else self.position_interval
        next_position = time.monotonic() + self.position_interval
        while not self.closing.wait(tick) and channel.live:
            if self.link is not None:
                with channel.tempo_lock:
                    self.follow_link(channel)
                self.report_landings(channel)
            if time.monotonic() < next_position:
                continue
            next_position += self.position_interval
            self.report_position_once(channel)

    def report_position_once(self, channel: Channel) -> None:
        base = f"{PREFIX}/{channel.number}"
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
        if self.link is not None:
            self.link.close()


COMMANDS = {"start": OscBridge.start, "prompt": OscBridge.prompt, "weights": OscBridge.weights,
            "morph": OscBridge.morph, "append": OscBridge.append, "pause": OscBridge.pause,
            "resume": OscBridge.resume, "stop": OscBridge.stop, "device": OscBridge.device, "at": OscBridge.at,
            "tempo": OscBridge.tempo}


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
    add_server_arguments(parser)
    parser.add_argument("--osc-host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--osc-port", type=int, default=DEFAULT_OSC_PORT)
    parser.add_argument("--reply-port", type=int, help="send replies to this port of the sender's host "
                                                       "(default: the sender's own address)")
    parser.add_argument("--device", help="output device for new channels: index or name substring")
    parser.add_argument("--no-playback", action="store_true", help="play nothing; pace sessions by the clock")
    parser.add_argument("--lead", type=float, default=0.0, help="seconds the server may run ahead (default 2)")
    parser.add_argument("--position-interval", type=float, default=0.5, help="seconds between /position replies")
    parser.add_argument("--link", action="store_true", help="join the Ableton Link session: sessions take its "
                                                                "tempo and bar lines (needs LinkPython-extern)")
    parser.add_argument("--quantum", type=int, default=4, help="--link: beats to a bar (Link's quantum; default 4)")
    parser.add_argument("--link-bpm", type=float, default=120.0,
                        help="--link: the tempo to offer while no other peer has one (default 120)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        import pythonosc  # noqa: F401
    except ImportError:
        print("musicgen-osc: needs python-osc: pip install python-osc (or the project's [client] extra)",
              file=sys.stderr)
        return 2
    if not 1 <= args.quantum <= 64:
        print(f"musicgen-osc: --quantum must be 1-64, got {args.quantum}", file=sys.stderr)
        return 2
    link = None
    if args.link:
        try:
            link = LinkClock(args.link_bpm, args.quantum)
        except LinkUnavailable as error:
            print(f"musicgen-osc: {error}", file=sys.stderr)
            return 2
    client = MusicGenClient(args.server, token=args.token)
    bridge = OscBridge(client, playback=not args.no_playback, device=args.device, reply_port=args.reply_port,
                       position_interval=args.position_interval, lead_seconds=args.lead, link=link)
    server = OscServer((args.osc_host, args.osc_port), bridge)
    log.info("event=listening osc=%s:%d server=%s link=%s", args.osc_host, server.server_address[1], args.server,
             f"{link.tempo:g}bpm/{link.quantum}" if link else "off")
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
