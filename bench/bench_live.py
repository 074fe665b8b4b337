"""A real-time proof: `musicgen-server` in its own process, one session played by the client's `Player` (the
player `musicgen-client play` uses) into an audio device that consumes at real time, and what a listener heard.

    python bench/bench_live.py --model /tmp/mg-small --quantize int4 [--seconds 60] [--steer-at 20] [--rollback 0.15]
        [--kv-dtype int8] [--context-frames 500 --reprime-keep-frames 100] [--chunk-frames 10] [--sink pulse]

The device is a PulseAudio null sink in a private daemon started here (packages pulseaudio, libasound2-plugins:
PortAudio -> ALSA `pulse` -> the sink, which consumes at its own clock), or with `--sink clocked` the FIFO-backed
ALSA device of tests/audio_devices.py, read at real time by this process. A silent stream keeps the sink awake
through the run (a sink that wakes for a stream stalls it ~1.6 s first), as other audio would on a real machine.

Reported (JSON):
- achieved_realtime_factor: audio played over the wall it took the device to play it (first to last sample
  the device took); 1.0 unless underruns stretched the playback. underruns and the seconds of silence they
  inserted.
- server_realtime_factor: the server's own running figure at the end (steps and codec against the audio they
  made, server/headroom.py), its mean step and codec time per frame: how much slack there was.
- time_to_first_chunk_ms (start sent -> first audio chunk) and time_to_first_play_ms (-> the device taking it).
- min_buffer_s: the least audio the player held once playing, while more was to come (how close it came to an
  underrun), and
  largest_chunk_gap_ms after the first seconds of playback (the lead fills at start as fast as the server can).
- reprimes (CONTEXT_REPRIMED notices) and steering: a `set_prompt` at --steer-at seconds played -> the device
  playing the first sample generated under it (the PROMPT_APPLIED notice's sample).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_pulse_null_sink(directory: Path) -> subprocess.Popen:
    """A private PulseAudio daemon with one null sink; this process's PortAudio reaches it through ALSA `pulse`."""
    if shutil.which("pulseaudio") is None:
        raise SystemExit("bench_live: pulseaudio not found (apt-get install pulseaudio libasound2-plugins), "
                         "or use --sink clocked")
    env = {**os.environ, "HOME": str(directory), "XDG_RUNTIME_DIR": str(directory)}
    daemon = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
         "--load=module-null-sink sink_name=nullsink rate=48000 channels=2",
         "--load=module-native-protocol-unix"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket_path = directory / "pulse" / "native"
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench_live: pulseaudio did not start")
        time.sleep(0.05)
    os.environ["PULSE_SERVER"] = f"unix:{socket_path}"
    return daemon


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "server.main", "--model", args.model, "--port", str(port)]
    for flag in ("quantize", "kv_dtype", "context_frames", "reprime_keep_frames"):
        value = getattr(args, flag)
        if value:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    return subprocess.Popen(command, cwd=ROOT, stderr=open(args.server_log, "w"))


def wait_for_server(client, server: subprocess.Popen, log: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.model_info()
        except Exception:  # noqa: BLE001 - not listening yet
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_live: the server did not come up (see {log})")
            time.sleep(0.5)


def keep_device_awake(device: str | None):
    """A silent stream on the device for the whole run, as on a machine where other audio is playing: a
    PulseAudio null sink that wakes for a new stream stalls it ~1.6 s first (measured here), which would be
    counted as the session's time to first play."""
    import sounddevice

    stream = sounddevice.OutputStream(samplerate=32000, channels=1, device=device, dtype="float32",
                                      callback=lambda out, frames, when, status: out.fill(0))
    stream.start()
    time.sleep(2.0)  # past the stall
    return stream


class Timeline:
    """Chunk and notice arrivals (the player's network thread) and the player's state over time (a poller)."""

    def __init__(self):
        self.chunks: list[tuple[float, int]] = []  # (arrival, start_sample)
        self.notices: list[tuple[float, str, int]] = []  # (arrival, kind, sample)
        self.finished = None
        self.trace: list[tuple[float, int, float]] = []  # (time, samples played, seconds buffered)

    def on_event(self, event) -> None:
        from client.events import AudioChunk, Finished, Notice
        now = time.monotonic()
        if isinstance(event, AudioChunk):
            self.chunks.append((now, event.start_sample))
        elif isinstance(event, Notice):
            self.notices.append((now, event.kind.value, event.sample))
        elif isinstance(event, Finished):
            self.finished = event

    def applied_sample(self) -> int | None:
        return next((sample for _, kind, sample in self.notices if kind == "prompt_applied"), None)


def steer(player, session, timeline: Timeline, at_sample: int, prompt: str, result: dict,
          rollback: float | None = None) -> None:
    """At `at_sample` played: set a new prompt (with a rollback margin: instant steering), then time until the
    device plays the first sample generated under it (the PROMPT_APPLIED notice's sample, plus the device's own
    latency)."""
    while player.samples_played < at_sample:
        if timeline.finished is not None:
            return
        time.sleep(0.002)
    sent = time.monotonic()
    session.set_prompt(prompt, rollback_seconds=rollback)
    while timeline.applied_sample() is None:
        if timeline.finished is not None:
            return
        time.sleep(0.002)
    applied = timeline.applied_sample()
    while player.samples_played < applied:
        if timeline.finished is not None and player.wait(0):
            return
        time.sleep(0.002)
    latency = player.device_latency
    result.update(sent_at_played_s=round(at_sample / session.sample_rate, 3), applied_sample=applied,
                  response_s=round(time.monotonic() - sent + latency, 3))


def play(args: argparse.Namespace, port: int, device: str | None) -> dict:
    from client.player import Player
    from client.session import MusicGenClient

    client = MusicGenClient(f"127.0.0.1:{port}")
    info = wait_for_server(client, args.server_process, args.server_log)
    client.generate("warm up", seconds=1.0, unpaced=True).audio()  # first-session costs out of the figures
    awake = keep_device_awake(device) if args.sink == "pulse" else None
    timeline = Timeline()
    opened = time.monotonic()
    session = client.open_session(args.prompt, seconds=args.seconds, max_lead_seconds=args.lead,
                                  chunk_frames=args.chunk_frames, sampling={"seed": args.seed})
    player = Player(session, device=device, on_event=timeline.on_event, latency=args.latency)
    steering: dict = {}
    player.start()
    steerer = threading.Thread(target=steer, daemon=True, args=(
        player, session, timeline, int(args.steer_at * session.sample_rate), args.steer_prompt, steering,
        args.rollback))
    steerer.start()
    while not player.wait(0.005):
        stats = player.stats
        timeline.trace.append((time.monotonic(), stats.samples_played, stats.buffered_seconds))
    ended = time.monotonic()
    player.close()
    steerer.join(5)
    if awake is not None:
        awake.close()
    stats, rate = player.stats, session.sample_rate
    playing = [(t, n, b) for t, n, b in timeline.trace if n > 0]
    first_play = playing[0][0] if playing else ended
    # the device took the last sample when the count stopped growing
    last_play = next((t for t, n, _ in reversed(timeline.trace) if n < stats.samples_played), ended)
    settled = first_play + args.settle
    arrivals = [t for t, _ in timeline.chunks if t >= settled]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    finished = timeline.finished
    return {
        "model": info.model_name, "quantize": args.quantize, "kv_dtype": args.kv_dtype,
        "context_frames": args.context_frames, "reprime_keep_frames": args.reprime_keep_frames,
        "chunk_frames": args.chunk_frames, "sink": args.sink, "seconds": args.seconds, "lead_s": args.lead,
        "achieved_realtime_factor": round(stats.samples_played / rate / max(1e-9, last_play - first_play), 3),
        "underruns": stats.underruns, "silence_inserted_s": round(stats.underrun_frames / stats.device_rate, 3),
        "server_realtime_factor": round(finished.stats.realtime_factor, 3) if finished else None,
        "server_mean_step_ms": round(finished.stats.mean_step_ms, 2) if finished else None,
        "server_codec_ms_per_frame": round(finished.stats.mean_decode_ms_per_frame, 2) if finished else None,
        "time_to_first_chunk_ms": round(1000 * (timeline.chunks[0][0] - opened), 1) if timeline.chunks else None,
        "time_to_first_play_ms": round(1000 * (first_play - opened), 1),
        # while audio was still to come: at the end the buffer drains by design
        "min_buffer_s": round(min((b for t, n, b in playing if t >= settled and
                                   n < stats.samples_played - args.lead * rate), default=0.0), 3),
        "largest_chunk_gap_ms": round(1000 * max(gaps), 1) if gaps else None,
        "median_chunk_gap_ms": round(1000 * sorted(gaps)[len(gaps) // 2], 1) if gaps else None,
        "reprimes": sum(kind == "context_reprimed" for _, kind, _ in timeline.notices),
        "steering": {**steering, "rollback_margin_s": args.rollback,
                     "retracted_late_frames": player.retracted_late_frames},
        "audio_seconds": round(stats.samples_played / rate, 3),
        "device_rate": stats.device_rate, "device_latency_s": round(player.device_latency, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--kv-dtype", default=None, help="the server's --kv-dtype (int8: half of bf16's bytes)")
    parser.add_argument("--context-frames", type=int, default=None, help="the server's window (default 30 s)")
    parser.add_argument("--reprime-keep-frames", type=int, default=None)
    parser.add_argument("--chunk-frames", type=int, default=0, help="frames per chunk (0: the server's 5)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--lead", type=float, default=2.0)
    parser.add_argument("--latency", default="high", help="device latency hint: low, high or seconds")
    parser.add_argument("--prompt", default="warm lofi beat")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steer-at", type=float, default=20.0, help="seconds of played audio at which to steer")
    parser.add_argument("--steer-prompt", default="bright piano arpeggios")
    parser.add_argument("--rollback", type=float, help="steer with a rollback of this margin in seconds (instant "
                                                       "steering) instead of after the audio already sent")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of playback before gaps are counted")
    parser.add_argument("--sink", choices=("pulse", "clocked"), default="pulse")
    parser.add_argument("--server-log", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-live-") as directory:
        directory = Path(directory)
        args.server_log = args.server_log or str(directory / "server.log")
        if args.sink == "pulse":
            helper, device = start_pulse_null_sink(directory), "pulse"
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from audio_devices import ClockedAlsaDevice
            helper, device = ClockedAlsaDevice(directory / "alsa", 32000, 1), None
            os.environ.update(HOME=str(helper.directory), XDG_CONFIG_HOME=str(helper.directory))
        port = free_port()
        args.server_process = start_server(args, port)
        try:
            result = play(args, port, device)
            log = Path(args.server_log).read_text()
            result["server_below_realtime_lines"] = log.count("event=below_realtime")
            print(json.dumps(result, indent=1))
        finally:
            args.server_process.terminate()
            args.server_process.wait(30)
            if isinstance(helper, subprocess.Popen):
                helper.terminate()
                helper.wait(10)
            else:
                helper.stop()


if __name__ == "__main__":
    main()
