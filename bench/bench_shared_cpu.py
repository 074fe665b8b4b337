"""Decoder step time on a shared CPU: each thread/wait setting in a fresh process (libgomp reads its environment
once, at load), idle and beside each load, in one run.

    python bench/bench_shared_cpu.py --model /tmp/mg-small [--quantize int8] [--steps 40]

Loads: idle; one busy core (a process spinning `while True: pass`); a synthetic DAW (wakes every 2.9 ms for
~1 ms of work, like a 128-sample audio callback at 44.1 kHz).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

PROBE = """
import os, sys, time, torch
from musicgen_core import MusicGen
def wait_policy():
    spin = os.environ.get("GOMP_SPINCOUNT")
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    return policy if spin is None else f"{policy},spin={spin}"
model = MusicGen.from_pretrained(sys.argv[1], quantize=sys.argv[2] or None)
conditioning = model.encode_text(["warm lofi beat"])[0]
state = model.start_sequence(conditioning, model.default_sampling(greedy=True), total_frames=int(sys.argv[3]) + 8)
for _ in range(5):
    model.step([state])
started = time.perf_counter()
for _ in range(int(sys.argv[3])):
    model.step([state])
print(wait_policy(), torch.get_num_threads(), 1000 * (time.perf_counter() - started) / int(sys.argv[3]))
"""

BUSY = "while True: pass"
DAW = """
import time
period, work = 128 / 44100, 0.001
next_wake = time.perf_counter()
while True:
    next_wake += period
    end = time.perf_counter() + work
    while time.perf_counter() < end:
        pass
    time.sleep(max(0.0, next_wake - time.perf_counter()))
"""

SETTINGS = {  # name -> environment for the probe ("" = unset)
    "libgomp default": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
    "spin 100k": {"GOMP_SPINCOUNT": "100000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}


def probe_env(settings: dict) -> dict:
    env = {**os.environ, **settings}
    return {key: value for key, value in env.items() if value != ""}  # "" = unset


def run(model: str, quantize: str, steps: int, env: dict, load: str | None) -> str:
    loader = subprocess.Popen([sys.executable, "-c", load]) if load else None
    try:
        time.sleep(0.5 if load else 0)
        out = subprocess.run([sys.executable, "-c", PROBE, model, quantize, str(steps)], capture_output=True,
                             text=True, env=probe_env(env), check=True)
        return out.stdout.strip().splitlines()[-1]
    finally:
        if loader is not None:
            loader.kill()
            loader.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/mg-small")
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    for name, env in SETTINGS.items():
        for load_name, load in (("idle", None), ("one busy core", BUSY), ("synthetic DAW", DAW)):
            policy, threads, ms = run(args.model, args.quantize, args.steps, env, load).split()
            print(f"{name:32s} {load_name:14s} policy={policy:8s} threads={threads} ms_per_step={float(ms):7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
