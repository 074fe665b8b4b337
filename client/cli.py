"""`musicgen-client`: play a MusicGen server's stream in real time, record it, and steer it live.

    musicgen-client play "warm lofi beat" --seconds 20 --out take.wav
    musicgen-client play "warm lofi beat" --seconds 5 --no-playback --out take.wav   # no audio device needed
    musicgen-client live "ambient pad"        # then type prompts; :pause :resume :feed FILE.wav :quit
    musicgen-client live --weights "ambient pad=0.7 | dark techno=0.3"   # then e.g. :weights ambient pad=0.2 | dark techno=0.8
    musicgen-client live "lofi" --tempo 90   # then e.g. :at next-bar dark techno, :at bar 16 :morph 4s ambient
    musicgen-client info | devices

Server: --server HOST:PORT (or $MUSICGEN_SERVER), --token (or $MUSICGEN_TOKEN), --tls-cert PEM for TLS.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import threading
import time
from pathlib import Path

from .audio_in import LiveInput, feed_wav
from .devices import AudioUnavailable
from .errors import MusicGenError
from .events import AudioChunk, Event, Finished, Notice, Retracted, Sampling, Started
from .program import add_server_arguments
from .requests import At, Tempo
from .session import LiveSession, MusicGenClient
from .wavfile import WavWriter, read_wav

PROG = "musicgen-client"


class Progress:
    """One status line on stderr: rewritten in place with \\r on a terminal, one line per second otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        elif force or now - self.last >= 1.0:
            self.stream.write(text + "\n")
        else:
            return
        self.last = now
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (a notice), without breaking the status line."""
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def describe(event: Notice, started: Started | None) -> str:
    rate = started.sample_rate if started else 0
    at = f" ({event.sample / rate:.2f} s)" if rate else ""
    what = event.kind.value.replace("_", " ")
    return f"notice: {what} at frame {event.frame}, sample {event.sample}{at}: {event.message}"


# -- argument parsing --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--tls-cert", type=Path, help="PEM root certificate: connect with TLS, trusting it")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
    parser.add_argument("--tls-server-name", help="name expected in the server's certificate")
    commands = parser.add_subparsers(dest="command", required=True)

    play = commands.add_parser("play", help="generate, play in real time and/or record to a WAV")
    play.add_argument("prompt", nargs="?", default="",
                      help="text description, e.g. 'warm lofi beat' (or --weights for several)")
    play.add_argument("--seconds", type=float, default=10.0, help="length (default 10)")
    _session_options(play)

    live = commands.add_parser("live", help="an endless session; each line typed on stdin becomes the prompt")
    live.add_argument("prompt", nargs="?", default="", help="the first prompt (default unconditional)")
    live.add_argument("--seconds", type=float, help="stop after this long (default: run until :quit)")
    live.add_argument("--input", dest="input_device", help="also continue from this input device's audio")
    live.add_argument("--input-every", type=float, default=4.0, help="seconds of live input per append")
    _session_options(live)

    commands.add_parser("info", help="print the served model and the server's limits")
    commands.add_parser("devices", help="list the audio devices PortAudio sees")
    return parser


def _session_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--weights", metavar="'TEXT=W | TEXT=W'", type=_weights_argument,
                         help="several prompts with weights instead of PROMPT, e.g. 'warm lofi=0.7 | dark techno=0.3'"
                              " (the server normalises the weights to sum 1)")
    command.add_argument("--tempo", type=float, help="session tempo in bpm, for :at bar / beat (beat one at 0)")
    command.add_argument("--beats-per-bar", type=int, default=4, help="beats in a bar with --tempo (default 4)")
    command.add_argument("--out", type=Path, help="write the stream to this 16-bit WAV")
    command.add_argument("--no-playback", action="store_true",
                         help="do not play (no audio device or PortAudio needed); use with --out")
    command.add_argument("--device", help="output device: index or name substring (see `devices`)")
    command.add_argument("--continue-from", type=Path, help="WAV to continue from (audio prompt)")
    command.add_argument("--sample-rate", type=int, default=0,
                         help="stream rate to ask for: the model's (default) or 44100/48000")
    command.add_argument("--encoding", choices=["float32", "int16"], default="float32", help="wire PCM encoding")
    group = command.add_argument_group("sampling")
    group.add_argument("--seed", type=int)
    group.add_argument("--greedy", action="store_true", default=None, help="argmax decoding (deterministic)")
    group.add_argument("--guidance-scale", type=float)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group = command.add_argument_group("streaming")
    group.add_argument("--chunk-frames", type=int, default=0, help="frames per chunk (default: server's)")
    group.add_argument("--lead", type=float, default=0.0, help="seconds the server may run ahead (default 2)")
    group.add_argument("--lookahead", type=int, help="decoder lookahead frames (default exact)")
    group.add_argument("--fill", type=float, default=0.2, help="seconds buffered before playback starts")
    group.add_argument("--latency", default="high", help="device latency: low, high or seconds")
    group.add_argument("--blocksize", type=int, default=0, help="device block size (default: the host's)")


def _weights_argument(spec: str) -> list[tuple[str, float]]:
    try:
        return parse_weights(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, greedy=args.greedy, seed=args.seed)


def _client(args: argparse.Namespace) -> MusicGenClient:
    return MusicGenClient(args.server, token=args.token, root_certificates=args.tls_cert, secure=args.tls,
                          tls_server_name=args.tls_server_name)


# -- commands ----------------------------------------------------------------------------------------------

def open_session(args: argparse.Namespace, client: MusicGenClient, seconds: float | None,
                 unpaced: bool) -> LiveSession:
    playback = not args.no_playback
    if playback:  # fail before the session opens when there is no way to play it
        from .devices import find_device
        find_device(_device(args.device))
    info = client.model_info() if (args.continue_from or (playback and not args.sample_rate)) else None
    sample_rate = args.sample_rate
    if playback and not sample_rate:
        from .devices import preferred_stream_rate
        sample_rate = preferred_stream_rate(_device(args.device), info.sample_rate, info.supported_output_sample_rates)
    audio_prompt = rate = None
    if args.continue_from:
        audio_prompt, rate = read_wav(args.continue_from)
        audio_prompt = audio_prompt[-int(info.max_audio_prompt_seconds * rate):]
    tempo = Tempo(args.tempo, args.beats_per_bar) if args.tempo else None
    return client.open_session(args.prompt, prompts=args.weights, tempo=tempo, sampling=_sampling(args), seconds=seconds,
                               sample_rate=sample_rate,
                               encoding=args.encoding, chunk_frames=args.chunk_frames, lookahead=args.lookahead,
                               max_lead_seconds=args.lead, unpaced=unpaced, audio_prompt=audio_prompt,
                               audio_prompt_rate=rate, client_name=PROG)


def _device(spec: str | None) -> int | str | None:
    return int(spec) if spec is not None and spec.strip().isdigit() else spec


class Consumer:
    """Takes a session's events on a thread: plays them (Player) or writes them to the WAV (no playback),
    reports notices, and keeps the progress line's numbers."""

    def __init__(self, session: LiveSession, args: argparse.Namespace, progress: Progress, paced_by_clock: bool):
        self.session = session
        self.progress = progress
        self.player = None
        self.writer = None
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.samples = 0
        self.revision = 0
        self.paced_by_clock = paced_by_clock
        if not args.no_playback:
            from .player import Player
            self.player = Player(session, device=_device(args.device), start_fill_seconds=args.fill,
                                 blocksize=args.blocksize, latency=_latency(args.latency), record_to=args.out,
                                 on_event=self.on_event)
        elif args.out:
            self.writer = WavWriter(args.out, session.sample_rate, session.channels)

    def on_event(self, event: Event) -> None:
        if isinstance(event, AudioChunk):
            self.samples = event.end_sample
            self.revision = event.prompt_revision
        elif isinstance(event, Notice):
            self.progress.message(describe(event, self.session.started))
        elif isinstance(event, Retracted):
            self.progress.message(f"retracted: from frame {event.frame}, sample {event.sample} (rolled back)")
        elif isinstance(event, Finished):
            self.progress.message(f"finished: {event.reason.value}, {event.total_samples} samples "
                                  f"({event.total_samples / self.session.sample_rate:.2f} s)"
                                  + (f": {event.message}" if event.message else ""))

    def start(self) -> None:
        if self.player is not None:
            self.player.start()
            threading.Thread(target=self._watch_player, daemon=True).start()
        else:
            threading.Thread(target=self._write, daemon=True).start()
            if self.paced_by_clock:
                threading.Thread(target=self._clock_acks, daemon=True).start()

    def _watch_player(self) -> None:
        try:
            self.player.wait()
        except BaseException as error:
            self.error = error
        self.done.set()

    def _write(self) -> None:
        try:
            for event in self.session:
                if isinstance(event, AudioChunk) and self.writer is not None:
                    self.writer.write(event.audio)
                elif isinstance(event, Retracted) and self.writer is not None:  # written again from there
                    self.writer.retract(event.sample - self.session.started.first_sample)
                self.on_event(event)
        except BaseException as error:
            self.error = error
        finally:
            if self.writer is not None:
                self.writer.close()
            self.done.set()

    def _clock_acks(self) -> None:
        """Without a device, acknowledge by the wall clock so a live session still runs in real time."""
        start = time.monotonic()
        while not self.done.wait(0.02):
            self.session.ack(int((time.monotonic() - start) * self.session.sample_rate))

    def status(self) -> str:
        rate = self.session.sample_rate
        if self.player is not None:
            stats = self.player.stats
            return (f"{stats.samples_played / rate:7.2f} s played  buffer {1000 * stats.buffered_seconds:5.0f} ms  "
                    f"underruns {stats.underruns}  prompt rev {self.revision}")
        return f"{self.samples / rate:7.2f} s received  prompt rev {self.revision}"

    def close(self) -> None:
        if self.player is not None:
            self.player.close()
        self.session.close()
        if self.writer is not None and self.done.wait(2):
            self.writer.close()


def _latency(value: str) -> str | float:
    try:
        return float(value)
    except ValueError:
        return value


def _finish(consumer: Consumer, session: LiveSession, progress: Progress, grace: float = 10.0) -> None:
    """Stop the session and wait for its Finished (so the WAV holds everything sent)."""
    session.stop()
    deadline = time.monotonic() + grace
    while session.finished is None and not consumer.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)


def cmd_play(args: argparse.Namespace) -> int:
    client = _client(args)
    session = open_session(args, client, args.seconds, unpaced=args.no_playback)
    progress = Progress()
    consumer = Consumer(session, args, progress, paced_by_clock=False)
    interrupted = False
    try:
        consumer.start()
        while not consumer.done.wait(0.1 if progress.tty else 0.25):
            progress.update(consumer.status())
        progress.update(consumer.status(), force=True)
    except KeyboardInterrupt:
        interrupted = True
        _finish(consumer, session, progress)
    finally:
        consumer.close()
        if progress.tty:
            progress.message("")
    if consumer.error is not None:
        raise consumer.error
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 130 if interrupted else 0


LIVE_HELP = ("type a prompt and press Enter to steer; commands: :pause  :resume  :feed FILE.wav  "
             ":prompt TEXT  :weights TEXT=W | TEXT=W  :morph 8s|400f TEXT or TEXT=W | ...  :tempo BPM [BEATS]  "
             ":at bar N|beat N|next-bar|next-beat|frame N|12.5s COMMAND  :now TEXT or TEXT=W | ...  :quit")

MAX_PROMPTS = 4  # ModelInfo.max_prompts of this version's servers
NOW_MARGIN_SECONDS = 0.15  # :now lands this long after the last acked sample: the device's buffer and the trip

_WEIGHTED = re.compile(r"\s*([^=|,]+?)\s*=\s*([^\s|,]+)\s*[|,]?")


def parse_weights(spec: str) -> list[tuple[str, float]]:
    """'warm lofi=0.7 | dark techno=0.3' (or 'a=0.7 b=0.3', or commas) -> [(text, weight), ...]. Texts may not
    contain '=', '|' or ','. Weights are checked here as the server would (finite, >= 0, one > 0), so a typo in
    a live session is a message, not the end of the session; the server normalises them."""
    pairs, position = [], 0
    for match in _WEIGHTED.finditer(spec):
        if match.start() != position:
            break
        try:
            pairs.append((match.group(1), float(match.group(2))))
        except ValueError:
            raise ValueError(f"weights: {match.group(2)!r} is not a number (in {match.group(0).strip()!r})") from None
        position = match.end()
    if not pairs or spec[position:].strip():
        raise ValueError(f"weights: expected TEXT=WEIGHT pairs, e.g. 'warm lofi=0.7 | dark techno=0.3', got {spec!r}")
    if len(pairs) > MAX_PROMPTS:
        raise ValueError(f"weights: at most {MAX_PROMPTS} prompts (the server's limit), got {len(pairs)}")
    for index, (text, weight) in enumerate(pairs):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weights: {text!r} has weight {weight:g}; weights are finite and >= 0")
        if text in (earlier for earlier, _ in pairs[:index]):
            raise ValueError(f"weights: {text!r} appears twice; give it one weight")
    if not any(weight > 0 for _, weight in pairs):
        raise ValueError("weights: at least one weight must be > 0")
    return pairs


def cmd_live(args: argparse.Namespace) -> int:
    client = _client(args)
    session = open_session(args, client, args.seconds, unpaced=False)
    progress = Progress()
    consumer = Consumer(session, args, progress, paced_by_clock=args.no_playback)
    live_input = None
    info = None
    progress.message(f"session {session.started.session_id} at {session.sample_rate} Hz; {LIVE_HELP}")
    try:
        consumer.start()
        if args.input_device is not None:
            live_input = LiveInput(session, device=_device(args.input_device), every_seconds=args.input_every).start()
        lines = _stdin_lines()
        while not consumer.done.is_set():
            try:
                line = lines.get(timeout=0.1 if progress.tty else 1.0)
            except Exception:  # queue.Empty: refresh the status line
                progress.update(consumer.status())
                continue
            if line is None or line.strip() in (":quit", ":q", ":exit", ":stop"):
                break
            info = _command(line.strip(), session, client, info, progress)
        _finish(consumer, session, progress)
    except KeyboardInterrupt:
        _finish(consumer, session, progress)
    finally:
        if live_input is not None:
            live_input.stop()
        consumer.close()
    if consumer.error is not None:
        raise consumer.error
    return 0


def _stdin_lines():
    """stdin lines on a queue (None at EOF), read by a daemon thread so the main thread can refresh status."""
    import queue
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _command(line: str, session: LiveSession, client: MusicGenClient, info, progress: Progress,
             at: At | None = None):
    """One live line; `at` (from `:at WHEN ...`) schedules the command it names."""
    when = "" if at is None else f" (at {at.kind.replace('_', ' ')}{'' if at.kind.startswith('next') else ' ' + str(at.value)})"
    if not line:
        return info
    if line.startswith(":at "):
        try:
            at, rest = _at(line[len(":at "):], session.sample_rate)
        except ValueError as error:
            progress.message(str(error))
            return info
        if at.kind in ("bar", "beat", "next_bar", "next_beat") and session.tempo is None:
            progress.message("at: bars and beats need a tempo (--tempo BPM, or :tempo BPM)")
            return info
        if not (rest in (":pause", ":p", ":stop") or rest.startswith((":prompt ", ":weights ", ":morph "))
                or not rest.startswith(":")):
            progress.message(f"at: {rest.split()[0]!r} cannot be scheduled (prompts, :weights, :morph, :pause, "
                             ":stop can)")
            return info
        started = session.started
        sample = (at.value * started.samples_per_frame if at.kind == "frame"
                  else at.sample_at(session.tempo, session.sample_rate))
        horizon = session.earliest_schedulable_sample()
        if sample is not None and sample < horizon:  # the server would end the session
            progress.message(f"at: sample {round(sample)} may already be generated (the earliest safe now is "
                             f"{horizon}); too late")
            return info
        return _command(rest, session, client, info, progress, at)
    if line in (":pause", ":p"):
        session.pause(at)
    elif line in (":resume", ":r"):
        session.resume()
    elif line == ":stop" and at is not None:
        session.stop(at)
        progress.message(f"stop sent{when}")
    elif line.startswith(":tempo "):
        try:
            bpm, *beats = (float(v) for v in line[len(":tempo "):].split())
            if not 1 <= bpm <= 1000 or len(beats) > 1 or (beats and not 1 <= beats[0] <= 64):
                raise ValueError
        except ValueError:
            progress.message("tempo: expected ':tempo BPM [BEATS_PER_BAR]', BPM in [1, 1000], beats 1-64")
        else:
            session.set_tempo(bpm, int(beats[0]) if beats else 4)
            progress.message(f"tempo sent: {bpm:g} bpm")
    elif line.startswith(":feed "):
        info = info or client.model_info()
        path = Path(line[len(":feed "):].strip())
        try:
            sent = feed_wav(session, path, max_seconds=info.max_audio_prompt_seconds)
            progress.message(f"fed {path} ({sent} samples)")
        except (OSError, ValueError) as error:
            progress.message(f"cannot feed {path}: {error}")
    elif line.startswith(":now "):  # instant: rolls back what was sent but not yet played
        rest = line[len(":now "):].strip()
        try:
            target = parse_weights(rest) if "=" in rest else rest
        except ValueError as error:
            progress.message(str(error))
            return info
        text, prompts = (None, target) if isinstance(target, list) else (target, None)
        session.set_prompt(text, prompts=prompts, rollback_seconds=NOW_MARGIN_SECONDS)
        progress.message(f"prompt sent now: {rest!r}")
    elif line.startswith(":prompt "):
        session.set_prompt(line[len(":prompt "):], at=at)
        progress.message(f"prompt sent: {line[len(':prompt '):]!r}{when}")
    elif line.startswith(":weights "):
        try:
            pairs = parse_weights(line[len(":weights "):])
        except ValueError as error:
            progress.message(str(error))
        else:
            session.set_prompt(prompts=pairs, at=at)
            progress.message("prompts sent: " + " | ".join(f"{text}={weight:g}" for text, weight in pairs) + when)
    elif line.startswith(":morph "):
        try:
            length, target = _morph(line[len(":morph "):])
            if "transition_beats" in length and session.tempo is None:
                raise ValueError("morph: beats need a tempo (--tempo BPM, or :tempo BPM)")
        except ValueError as error:
            progress.message(str(error))
        else:
            text, prompts = (None, target) if isinstance(target, list) else (target, None)
            session.set_prompt(text, prompts=prompts, at=at, **length)
            progress.message(f"morph sent: {line[len(':morph '):]}{when}")
    elif line in (":help", ":h", "?"):
        progress.message(LIVE_HELP)
    elif line.startswith(":"):
        progress.message(f"unknown command {line!r}; {LIVE_HELP}")
    else:
        session.set_prompt(line, at=at)
        progress.message(f"prompt sent: {line!r}{when}")
    return info


def _at(spec: str, sample_rate: int) -> tuple[At, str]:
    """'bar 8 TEXT' / 'beat 3 :pause' / 'next-bar :weights ...' / 'frame 400 ...' / '12.5s ...' -> (At, the
    command)."""
    words = spec.split(maxsplit=2)
    try:
        if words[0] in ("next-bar", "next-beat"):
            at = At.next_bar() if words[0] == "next-bar" else At.next_beat()
            rest = spec.split(maxsplit=1)[1]
        elif words[0] in ("bar", "beat", "frame", "sample"):
            value = int(words[1])
            if value < 0:
                raise ValueError
            at, rest = At(words[0], value), words[2]
        elif words[0].endswith("s"):
            seconds = float(words[0][:-1])
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError
            at, rest = At.sample(round(seconds * sample_rate)), spec.split(maxsplit=1)[1]
        else:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"at: expected ':at bar N | beat N | next-bar | next-beat | frame N | 12.5s COMMAND', "
                         f"got {spec!r}") from None
    return at, rest.strip()


def _morph(spec: str) -> tuple[dict, str | list[tuple[str, float]]]:
    """'8s dark techno' / '400f a=1 | b=1' / '16b ...' -> ({transition_seconds, _frames or _beats}, text or
    weights)."""
    length, _, target = spec.strip().partition(" ")
    unit = {"s": "transition_seconds", "f": "transition_frames", "b": "transition_beats"}.get(length[-1:])
    try:
        value = float(length[:-1]) if unit else None
    except ValueError:
        value = None
    limit = {"transition_seconds": 600, "transition_beats": 1024}.get(unit, 30000)  # the server's bounds
    if value is None or not math.isfinite(value) or not 0 <= value <= limit or not target.strip():
        raise ValueError(f"morph: expected ':morph 8s TEXT', ':morph 400f TEXT=W | TEXT=W' or ':morph 16b TEXT' "
                         f"(beats of the tempo), got {spec!r}")
    amount = {unit: int(value) if unit == "transition_frames" else value}
    return amount, parse_weights(target) if "=" in target else target.strip()


def cmd_info(args: argparse.Namespace) -> int:
    info = _client(args).model_info()
    for name, value in info.__dict__.items():
        print(f"{name}: {value}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from .devices import sounddevice
    print(sounddevice().query_devices())
    return 0


COMMANDS = {"play": cmd_play, "live": cmd_live, "info": cmd_info, "devices": cmd_devices}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "weights", None) and args.prompt:
        parser.error("give a PROMPT or --weights, not both")
    if getattr(args, "no_playback", False) and not args.out:
        print(f"{PROG}: warning: --no-playback without --out: the audio goes nowhere", file=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except AudioUnavailable as error:
        print(f"{PROG}: audio output unavailable: {error}", file=sys.stderr)
        return 2
    except MusicGenError as error:
        print(f"{PROG}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
