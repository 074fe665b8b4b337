"""Decoder speed, side by side with transformers, on one checkpoint (make one with bench/make_checkpoint.py).

    python bench/bench_generate.py --model /tmp/mg-small --steps 40 --rounds 3 --threads 2
    python bench/bench_generate.py --model /tmp/mg-small --quantize int8 --sessions 1,2,4,8 --no-transformers
    python bench/bench_generate.py --model /tmp/mg-small --paths float32,bfloat16,int8,int4 [--context 0]
    python bench/bench_generate.py --model /tmp/mg-small --quantize int4 --engine-parts 60

With --paths: per path the step, its floor and their ratio, alternating the paths block by block in one
process. The floor is the time to read, once, every byte the step reads (the weights of every linear but the
cross-attention keys/values, which are computed once per prompt, plus the KV cache at --context frames),
with the kernel's `stream_read`: the elastic pool, the kernels' prefetching. transformers' `generate` (float32)
is timed in the same loop unless --no-transformers.

Per round it times our decoder steps and transformers' `generate` on the same prompt and number of steps,
alternating. Reported: median ms per decoder step (CFG on, batch 1), real-time factor (20 ms per step at 50
frames/s), time to the first audio sample through the server's streaming path, peak RSS of each side (measured
in a fresh subprocess), the sweep over concurrent sessions through the batched step, and KV-cache bytes per
session-second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import musicgen_core  # noqa: F401  (first: the libgomp policy is set before torch loads it)
import torch

from server.engine import call_in_fresh_thread as fresh

PROMPT = "warm lofi beat with soft piano"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_ours(args):
    from musicgen_core import MusicGen
    return MusicGen.from_pretrained(args.model, dtype=DTYPES[args.dtype], quantize=args.quantize,
                                    kv_dtype=DTYPES[args.kv_dtype] if args.kv_dtype else None)


def our_step_times(model, steps: int, sessions: int = 1, context_frames: int = 0) -> list[float]:
    """Seconds per batched step of `sessions` sequences (prefill excluded), after `context_frames` frames of
    (random) audio-prompt context: attention reads the whole cache, so a step costs more later in a session."""
    params = model.default_sampling(greedy=True, guidance_scale=3.0)
    conditioning = model.encode_text([PROMPT])[0]
    codebooks = model.config.decoder.num_codebooks
    context = torch.randint(0, model.config.decoder.vocab_size, (codebooks, context_frames),
                            generator=torch.Generator().manual_seed(0)) if context_frames else None
    states = [model.start_sequence(conditioning, params, context, total_frames=context_frames + steps + 8)
              for _ in range(sessions)]
    model.step(states)  # prefill column 0 (and the context)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.step(states)
        times.append(time.perf_counter() - started)
    return times


def transformers_step_times(oracle, tokenizer, steps: int) -> list[float]:
    """Seconds between consecutive decoder steps inside transformers' generate (a logits-processor clock)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    inputs = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        oracle.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=steps + 1,
                        logits_processor=LogitsProcessorList([Clock()]))
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def time_to_first_audio(model, frames: int = 500, sessions: int = 3) -> list[float]:
    """Seconds from opening a session (10 s, chunk of 1 frame, unpaced) to its first AudioChunk, through the
    server's engine, for `sessions` sessions one after another on one engine, each with a new prompt text (the
    engine remembers text encodings), then one more that repeats the last text. The first is a cold start
    (first use of each kernel), the middle ones what a running server gives a new prompt, the last a known one."""
    from server.engine import Engine, EngineConfig
    from server.events import AudioChunk, SessionSpec

    engine = Engine(model, EngineConfig(max_sessions=1))
    engine.start()
    times = []
    for index in list(range(sessions)) + [sessions - 1]:
        spec = SessionSpec(text=f"{PROMPT} {index}", params=model.default_sampling(greedy=True),
                           total_frames=frames, chunk_frames=1, max_lead_seconds=None)
        first = threading.Event()
        sink = lambda event, first=first: first.set() if isinstance(event, AudioChunk) else None  # noqa: E731
        started = time.perf_counter()
        handle = engine.open_session(spec, sink)
        first.wait(120)
        times.append(time.perf_counter() - started)
        handle.close()
        while engine.active_sessions:
            time.sleep(0.001)
    engine.shutdown(5)
    return times


def engine_realtime(model, sessions: int, seconds: float = 10.0) -> float:
    """Per-session real-time factor of `sessions` concurrent unpaced sessions through the server's engine
    (batched decoder steps + each session's streaming codec): audio seconds per session / wall seconds."""
    from server.engine import Engine, EngineConfig
    from server.events import Finished, SessionSpec

    engine = Engine(model, EngineConfig(max_sessions=sessions))
    engine.start()
    done = threading.Semaphore(0)
    sink = lambda event: done.release() if isinstance(event, Finished) else None  # noqa: E731
    frames = round(seconds * model.config.frame_rate)
    started = time.perf_counter()
    for index in range(sessions):
        spec = SessionSpec(text=f"{PROMPT} {index}", params=model.default_sampling(seed=index),
                           total_frames=frames, chunk_frames=5, max_lead_seconds=None)
        engine.open_session(spec, sink)
    for _ in range(sessions):
        done.acquire(timeout=600)
    wall = time.perf_counter() - started
    engine.shutdown(5)
    return seconds / wall


def engine_parts(model, seconds: float) -> dict:
    """One unpaced session through the engine at its default window, its turns taken apart: the decoder steps
    alone, the steps that also carry a column of the re-prime's prepared sequence (`FrameSource.next_columns`),
    and the streaming codec per frame. What bounds a session that is not live, part by part."""
    from server import audio_out

    parts = {"step": [], "step with a prepared column": [], "codec": []}
    frames_decoded = 0
    plain_step = model.step

    def timed_step(states, max_prefill_columns=None, prefills=()):
        started = time.perf_counter()
        result = plain_step(states, max_prefill_columns, prefills)
        parts["step with a prepared column" if prefills else "step"].append(time.perf_counter() - started)
        return result

    plain_decode = audio_out.AudioOut._decode

    def timed_decode(self, frames):
        nonlocal frames_decoded
        started = time.perf_counter()
        result = plain_decode(self, frames)
        parts["codec"].append(time.perf_counter() - started)
        frames_decoded += frames.shape[1]
        return result

    model.step, audio_out.AudioOut._decode = timed_step, timed_decode
    try:
        rtf = engine_realtime(model, 1, seconds)
    finally:
        del model.step
        audio_out.AudioOut._decode = plain_decode
    result = {"engine_rtf": round(rtf, 3)}
    for name in ("step", "step with a prepared column"):
        times = parts[name]
        result[name] = {"count": len(times), "mean_ms": round(1000 * statistics.mean(times), 2) if times else None,
                        "total_s": round(sum(times), 2)}
    result["codec"] = {"calls": len(parts["codec"]), "ms_per_frame": round(1000 * sum(parts["codec"]) /
                       max(1, frames_decoded), 2), "total_s": round(sum(parts["codec"]), 2)}
    return result


PATHS = {"float32": {}, "bfloat16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"},
         "int4": {"quantize": "int4"}, "int4-g32": {"quantize": "int4-g32"}, "int4-g128": {"quantize": "int4-g128"},
         "int8-fbgemm": {"quantize": "int8-fbgemm"}}


def bytes_read_per_step(model, context: int) -> list[torch.Tensor]:
    """What a one-column step reads: every linear's weights (packed weights and scales when quantized) but the
    cross-attention key/value projections (run once per prompt), and a buffer the size of the self-attention
    cache at `context` frames (contiguous, as stream_read needs)."""
    read = []
    for name, module in model.decoder.named_modules():
        if name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj")):
            continue
        if hasattr(module, "packed"):  # our int8 / int4 layers
            read += [t for t in (module.packed, module.scale, module.rowsum) if t.numel()]
        elif isinstance(module, torch.nn.Linear):
            read.append(module.weight)
    if context:
        per_frame = model.decoder.allocate_cache(rows=2, capacity=1).nbytes
        read.append(torch.empty(context * per_frame, dtype=torch.uint8).random_())
    return [t.contiguous() for t in read]


def floor_table(args) -> None:
    """--paths: each path's step (median over blocks of --steps), its floor and their ratio; the paths and the
    floors alternate block by block."""
    from musicgen_core.cpu import cpu_flags
    from musicgen_core.int8_kernel import load_int8_kernel
    from musicgen_core import MusicGen

    kernel = load_int8_kernel()
    if kernel is None:
        raise SystemExit("the floor is read with the kernel's stream_read, which is unavailable here")
    names = args.paths.split(",")
    unknown = [name for name in names if name not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {sorted(PATHS)}")
    models = {name: fresh(lambda name=name: MusicGen.from_pretrained(args.model, **PATHS[name])) for name in names}
    reads = {name: bytes_read_per_step(model, args.context) for name, model in models.items()}
    theirs = None if args.no_transformers else fresh(load_transformers, args)
    steps = {name: [] for name in names}
    floors = {name: [] for name in names}
    transformers_ms = []

    def floor_ms(tensors) -> float:
        started = time.perf_counter()
        kernel.stream_read(tensors)
        return 1000 * (time.perf_counter() - started)

    for _ in range(args.rounds):
        for name, model in models.items():
            times = fresh(our_step_times, model, args.steps, context_frames=args.context)
            steps[name].append(1000 * statistics.median(times))
            floors[name].append(statistics.median(fresh(lambda t=reads[name]: [floor_ms(t) for _ in range(5)])))
        if theirs is not None:
            transformers_ms.append(1000 * statistics.median(fresh(transformers_step_times, *theirs, args.steps)))
    flags = cpu_flags()
    isa = "avx512-vnni" if "avx512_vnni" in flags else "avx2" if "avx2" in flags else "none"
    print(f"{args.model}, context {args.context} frames, {args.threads} threads, kernel {isa}, "
          f"{args.rounds} rounds of {args.steps} steps (medians)")
    print(f"{'path':12s} {'MB read':>8s} {'step ms':>8s} {'floor ms':>8s} {'ratio':>6s}")
    for name in names:
        megabytes = sum(t.numel() * t.element_size() for t in reads[name]) / 1e6
        step, floor = statistics.median(steps[name]), statistics.median(floors[name])
        print(f"{name:12s} {megabytes:8.0f} {step:8.1f} {floor:8.1f} {step / floor:6.2f}")
    if transformers_ms:
        print(f"{'transformers generate, float32':30s} {statistics.median(transformers_ms):8.1f} ms per step")


def peak_rss_mib(args, side: str) -> tuple[float, float]:
    """Peak and final RSS (MiB) of a fresh process that loads one side and runs a few steps. Both count the
    checkpoint's memory-mapped pages that the process has touched (clean, reclaimable file pages)."""
    code = (
        "import sys, resource, torch; sys.argv = sys.argv[:1] + {argv!r}; sys.path.insert(0, 'bench');"
        "import bench_generate as b; a = b.parse(); torch.set_num_threads(a.threads);"
        "m = b.load_ours(a) if {side!r} == 'ours' else b.load_transformers(a);"
        "b.our_step_times(m, 5) if {side!r} == 'ours' else b.transformers_step_times(*m, 5);"
        "print(*[l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmHWM', 'VmRSS'))])"
    ).format(argv=sys.argv[1:], side=side)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report the parent's peak.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, steady = (int(value) / 1024 for value in out.stdout.strip().splitlines()[-1].split())
    return peak, steady


def load_transformers(args):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    oracle = MusicgenForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    return oracle, AutoTokenizer.from_pretrained(args.model)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--quantize", choices=["int8", "int8-fbgemm", "int4", "int4-g32", "int4-g128"], default=None)
    parser.add_argument("--paths", default="",
                        help=f"comma-separated paths for the step / floor table instead: {', '.join(PATHS)}")
    parser.add_argument("--context", type=int, default=0, help="--paths: frames of context in the KV cache")
    parser.add_argument("--kv-dtype", choices=sorted(DTYPES), default=None,
                        help="self-attention cache dtype (default: the weights';"
                             " bfloat16 with --quantize on a bf16 CPU)")
    parser.add_argument("--sessions", default="1,2,4,8", help="comma-separated session counts for the sweep")
    parser.add_argument("--engine-sessions", type=int, default=0,
                        help="also run this many concurrent 10 s sessions through the server's engine")
    parser.add_argument("--engine-parts", type=float, default=0, metavar="SECONDS",
                        help="instead: one unpaced session of this many seconds through the engine (default window "
                             "and re-primes), its decoder steps, steps carrying a prepared column, and codec apart")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--at-seconds", default="",
                        help="comma-separated session positions (s) at which to time steps too, e.g. 10,28")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    if args.paths:
        floor_table(args)
        return
    if args.engine_parts:
        model = fresh(load_ours, args)
        print(json.dumps(fresh(engine_parts, model, args.engine_parts), indent=1))
        return
    # Every measurement runs on a thread that ends (call_in_fresh_thread): an OpenMP pool left on this thread
    # would slow the engine's own thread, as in a server that loaded its model on a living thread.
    ours = fresh(load_ours, args)
    theirs = None if args.no_transformers else fresh(load_transformers, args)
    our_times, their_times = [], []
    for _ in range(args.rounds):  # alternate so both see the same machine state
        our_times += fresh(our_step_times, ours, args.steps)
        if theirs is not None:
            their_times += fresh(transformers_step_times, *theirs, args.steps)
    ours_ms = 1000 * statistics.median(our_times)
    result = {"model": args.model, "dtype": args.dtype, "quantize": args.quantize, "kv_dtype": args.kv_dtype,
              "threads": args.threads, "ours_ms_per_step": round(ours_ms, 2), "ours_rtf": round(20.0 / ours_ms, 3)}
    for seconds in [float(s) for s in args.at_seconds.split(",") if s]:
        frames = round(seconds * ours.config.frame_rate)
        late = 1000 * statistics.median(fresh(our_step_times, ours, max(10, args.steps // 2), context_frames=frames))
        result[f"ours_ms_per_step_at_{seconds:g}s"] = round(late, 2)
    if theirs is not None:
        their_ms = 1000 * statistics.median(their_times)
        result.update(transformers_ms_per_step=round(their_ms, 2), transformers_rtf=round(20.0 / their_ms, 3),
                      speedup=round(their_ms / ours_ms, 2))
    first_audio = fresh(time_to_first_audio, ours, sessions=6)
    result["time_to_first_audio_ms_cold"] = round(1000 * first_audio[0], 1)
    result["time_to_first_audio_ms"] = round(1000 * statistics.median(first_audio[1:-1]), 1)
    result["time_to_first_audio_ms_known_prompt"] = round(1000 * first_audio[-1], 1)
    sweep = {}
    for count in [int(c) for c in args.sessions.split(",") if c]:
        ms = 1000 * statistics.median(fresh(our_step_times, ours, max(10, args.steps // 2), sessions=count))
        sweep[count] = {"ms_per_step": round(ms, 2), "frames_per_s": round(1000 * count / ms, 1),
                        "per_session_rtf": round(20.0 / ms, 3)}
    result["sessions"] = sweep
    if args.engine_sessions:
        result["engine_sessions"] = args.engine_sessions
        result["engine_per_session_rtf"] = round(fresh(engine_realtime, ours, args.engine_sessions), 3)
    cache = ours.decoder.allocate_cache(rows=2, capacity=50)
    result["kv_bytes_per_session_second"] = cache.nbytes
    if not args.no_rss:
        peak, steady = peak_rss_mib(args, "ours")
        result.update(peak_rss_mib_ours=round(peak), steady_rss_mib_ours=round(steady))
        if theirs is not None:
            peak, steady = peak_rss_mib(args, "transformers")
            result.update(peak_rss_mib_transformers=round(peak), steady_rss_mib_transformers=round(steady))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key != "sessions":
            print(f"{key:36s} {value}")
    print("sessions  ms/step  frames/s  per-session RTF")
    for count, row in sweep.items():
        print(f"{count:8d}  {row['ms_per_step']:7.1f}  {row['frames_per_s']:8.1f}  {row['per_session_rtf']:6.3f}")


if __name__ == "__main__":
    main()
