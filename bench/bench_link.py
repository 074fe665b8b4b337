"""How close to Ableton Link's bar lines `musicgen-osc --link` lands "next bar" changes, in output samples.

    python bench/bench_link.py [--model demo] [--changes 12] [--sink pulse|clocked|none] [--tempos 137,93,120]

Starts `musicgen-server`, `musicgen-osc --link` (playing into a PulseAudio null sink, the clocked ALSA device
of tests/audio_devices.py, or with `--sink none` paced by the clock alone) and, in this process, a second Link
peer that sets the tempo. Sends `/musicgen/0/at next_bar prompt ...` `--changes` times, cycling through the
tempos, and for each `/landed` reply reports the landing error: how far from the nearest Link bar line the
first sample under the new prompt was heard, as the bridge measured it (the player's DAC times) and as this
peer sees the Link timeline at that moment. A change can only land between frames (640 samples at 32 kHz), so
the target is |error| <= one frame.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_live import free_port, start_pulse_null_sink, wait_for_server  # noqa: E402


class Replies:
    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]

    def wait_for(self, address: str, timeout: float = 30.0) -> list:
        from pythonosc.osc_message import OscMessage
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = OscMessage(self.socket.recv(65536))
            except socket.timeout:
                continue
            if message.address == "/musicgen/error":
                raise SystemExit(f"bench_link: the bridge answered an error: {message.params}")
            if message.address == address:
                return list(message.params)
        raise SystemExit(f"bench_link: no {address} reply in {timeout} s")


def send(port: int, address: str, *args) -> None:
    from pythonosc.udp_client import SimpleUDPClient
    SimpleUDPClient("127.0.0.1", port).send_message(address, list(args))


def run(args: argparse.Namespace, server_port: int, env: dict) -> dict:
    import link

    from client.session import MusicGenClient
    peer = link.Link(args.tempos[0])
    peer.enabled = True
    replies = Replies()
    bridge = subprocess.Popen([sys.executable, "-m", "client.osc_bridge", "--server", f"127.0.0.1:{server_port}",
                               "--osc-port", "0", "--reply-port", str(replies.port), "--link", "--lead", "2"]
                              + {"none": ["--no-playback"], "pulse": ["--device", "pulse"]}.get(args.sink, []),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        osc_port = int(bridge.stdout.readline().rsplit(":", 1)[1])
        with MusicGenClient(f"127.0.0.1:{server_port}") as client:
            wait_for_server(client, args.server_process, args.server_log)
        send(osc_port, "/musicgen/0/start", "warm lofi beat")
        replies.wait_for("/musicgen/0/started")
        rate = 32000
        rows = []
        for index in range(args.changes):
            bpm = args.tempos[index % len(args.tempos)]
            state = peer.captureSessionState()
            if abs(state.tempo() - bpm) > 1e-3:
                state.setTempo(bpm, peer.clock().micros())
                peer.commitSessionState(state)
                while abs(replies.wait_for("/musicgen/0/tempo")[0] - bpm) > 1e-3:
                    pass
            send(osc_port, "/musicgen/0/at", "next_bar", "prompt", f"change {index}")
            _, _, micros, _, bridge_error, _ = replies.wait_for("/musicgen/0/landed")
            state = peer.captureSessionState()
            beat = state.beatAtTime(micros, 4)
            peer_error = (beat - round(beat / 4) * 4) * 60.0 * rate / state.tempo()
            rows.append({"bpm": round(state.tempo(), 3), "bridge_error_samples": round(bridge_error, 1),
                         "peer_error_samples": round(peer_error, 1)})
        send(osc_port, "/musicgen/0/stop")
    finally:
        bridge.terminate()
        bridge.wait(10)
        peer.enabled = False
    errors = [abs(row["peer_error_samples"]) for row in rows]
    return {"sink": args.sink, "changes": rows, "frame_samples": 640,
            "peer_abs_error_samples": {"median": statistics.median(errors), "max": max(errors)},
            "within_one_frame": sum(error <= 640 for error in errors), "of": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--changes", type=int, default=12)
    parser.add_argument("--tempos", default="137,93,120", help="comma-separated bpm the peer cycles through")
    parser.add_argument("--sink", choices=("pulse", "clocked", "none"), default="pulse")
    args = parser.parse_args()
    args.tempos = [float(value) for value in args.tempos.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-link-") as directory:
        directory = Path(directory)
        args.server_log = str(directory / "server.log")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        helper = None
        if args.sink == "pulse":
            helper = start_pulse_null_sink(directory)
            env["PULSE_SERVER"] = os.environ["PULSE_SERVER"]
        elif args.sink == "clocked":
            sys.path.insert(0, str(ROOT / "tests"))
            from audio_devices import ClockedAlsaDevice
            helper = ClockedAlsaDevice(directory / "alsa", 32000, 1)
            env.update(helper.env(), PYTHONPATH=str(ROOT))
        port = free_port()
        args.server_process = subprocess.Popen([sys.executable, "-m", "server.main", "--model", args.model,
                                                "--port", str(port)], cwd=ROOT, stderr=open(args.server_log, "w"))
        try:
            print(json.dumps(run(args, port, env), indent=1))
        finally:
            args.server_process.terminate()
            args.server_process.wait(30)
            if isinstance(helper, subprocess.Popen):
                helper.terminate()
                helper.wait(10)
            elif helper is not None:
                helper.stop()


if __name__ == "__main__":
    main()
