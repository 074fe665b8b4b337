"""Decoder step and live real-time factor on a shared CPU: each thread/wait setting in a fresh process (libgomp
reads its environment once, when torch loads it), idle and beside each load, in one run.

    python bench/bench_shared_cpu.py --model /tmp/mg-small [--quantize int8] [--steps 40] [--context 0 600]

Loads: idle; one busy core (a process spinning `while True: pass`); a synthetic DAW (wakes every 2.9 ms for
~1 ms of work, like a 128-sample audio callback at 44.1 kHz). Per setting, load and context (frames already in
the KV cache): the mean and p90 decoder step (`MusicGen.step`, batch 1 with guidance), and the engine's
running real-time factor over one unpaced session of `--live-seconds` (steps plus codec, server/headroom.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

PROBE = """
import sys
import musicgen_core  # first: the project's libgomp policy (musicgen_core/threads.py)
import time, torch
from musicgen_core import MusicGen
from musicgen_core.int8_kernel import loaded_int8_kernel
from musicgen_core.threads import thread_policy
from server.engine import Engine
from server.events import SessionSpec
path, quantize, steps, context, live_seconds, parallel = sys.argv[1], sys.argv[2] or None, *map(int, sys.argv[3:6]), sys.argv[6]
model = MusicGen.from_pretrained(path, quantize=quantize)
kernel = loaded_int8_kernel()
if kernel is not None and parallel == "openmp":
    kernel.set_parallel(torch.get_num_threads(), 20, True)
conditioning = model.encode_text(["warm lofi beat"])[0]
prompt = torch.randint(0, model.config.decoder.vocab_size, (model.config.decoder.num_codebooks, context)) if context else None
state = model.start_sequence(conditioning, model.default_sampling(greedy=True), prompt, total_frames=context + steps + 8)
for _ in range(5):
    model.step([state])
times = []
for _ in range(steps):
    started = time.perf_counter()
    model.step([state])
    times.append(time.perf_counter() - started)
times.sort()
engine = Engine(model)
engine.open_session(SessionSpec(text="warm lofi beat", params=model.default_sampling(),
                                total_frames=live_seconds * model.config.frame_rate, max_lead_seconds=None),
                    lambda event: None)
while engine.turn() or engine.sessions:
    pass
policy = thread_policy()
print(str(policy.get("kernel_parallel", "torch")).replace(" ", "-"), policy["gomp_spincount"], torch.get_num_threads(),
      f"{1000 * sum(times) / steps:.1f}", f"{1000 * times[int(0.9 * steps)]:.1f}",
      f"{engine.headroom.realtime_factor:.2f}")
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

SETTINGS = {  # name -> (environment for the probe, "" = unset; the kernel's parallel mode)
    "project policy (elastic pool)": ({}, "pool"),
    "before: OpenMP, libgomp default": ({"GOMP_SPINCOUNT": "300000"}, "openmp"),
    "1 thread": ({"OMP_NUM_THREADS": "1"}, "pool"),
}
LOADS = {"idle": None, "one busy core": BUSY, "synthetic DAW": DAW}


def probe_env(settings: dict) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, **settings}
    return {key: value for key, value in env.items() if value != ""}  # "" = unset


def run(args: argparse.Namespace, context: int, env: dict, parallel: str, load: str | None) -> list[str]:
    loader = subprocess.Popen([sys.executable, "-c", load]) if load else None
    try:
        time.sleep(0.5 if load else 0)
        out = subprocess.run([sys.executable, "-c", PROBE, args.model, args.quantize, str(args.steps), str(context),
                              str(args.live_seconds), parallel], capture_output=True, text=True,
                             env=probe_env(env), check=True)
        return out.stdout.strip().splitlines()[-1].split()
    finally:
        if loader is not None:
            loader.kill()
            loader.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/mg-small")
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", type=int, nargs="+", default=[0, 600])
    parser.add_argument("--live-seconds", type=int, default=4)
    args = parser.parse_args()
    print(f"{'setting':32s} {'load':14s} {'context':>7s} {'step ms':>8s} {'p90':>6s} {'x idle':>6s} {'live RTF':>8s}")
    for context in args.context:
        for name, (env, parallel) in SETTINGS.items():
            idle = None
            for load_name, load in LOADS.items():
                _, _, _, mean, p90, rtf = run(args, context, env, parallel, load)
                idle = idle or float(mean)
                print(f"{name:32s} {load_name:14s} {context:7d} {float(mean):8.1f} {float(p90):6.1f} "
                      f"{float(mean) / idle:6.2f} {float(rtf):8.2f}", flush=True)


if __name__ == "__main__":
    main()
