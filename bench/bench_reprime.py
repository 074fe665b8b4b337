"""A re-prime beside a running session: the gaps between one session's chunks while the other re-primes, with
the next sequence prepared while the current one plays (the engine's way) and without (its prompt read in
one go at the switch, as before, or a chunk per turn), alternating in one process.

    python bench/bench_reprime.py --model /tmp/mg-small --quantize int4 [--window 1500 --keep 600]

Two unpaced sessions through the engine, driven turn by turn; the second starts `--offset` turns after the
first, so their re-primes fall apart. Per run: the median and the largest time between two consecutive chunks
of a session (a chunk is `chunk_frames` frames), the largest single turn, and the time of the turn that
re-primed; each session runs past two re-primes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import musicgen_core  # noqa: F401  (first: the project's thread policy)
import torch

from musicgen_core import MusicGen
from server.engine import Engine, EngineConfig
from server.events import AudioChunk, Notice, NoticeKind, SessionSpec
from server.frames import FrameSource


def run(model: MusicGen, config: EngineConfig, frames: int, offset: int) -> dict[str, float]:
    engine = Engine(model, config)
    chunk_times: list[list[float]] = [[], []]
    reprime_turns: list[float] = []
    turn_seconds: list[float] = []

    def sink(index: int):
        def receive(event) -> None:
            if isinstance(event, AudioChunk):
                chunk_times[index].append(time.perf_counter())
            elif isinstance(event, Notice) and event.kind == NoticeKind.CONTEXT_REPRIMED:
                reprime_turns.append(len(turn_seconds))
        return receive

    def spec() -> SessionSpec:
        return SessionSpec(text="warm lofi beat", params=model.default_sampling(), total_frames=frames,
                           max_lead_seconds=None)

    engine.open_session(spec(), sink(0))
    turn = 0
    while engine.sessions or turn == 0:
        if turn == offset:
            engine.open_session(spec(), sink(1))
        started = time.perf_counter()
        engine.turn()
        turn_seconds.append(time.perf_counter() - started)
        turn += 1
    gaps = [b - a for times in chunk_times for a, b in zip(times[1:], times[2:])]  # from the second chunk on
    return {"median_gap_ms": 1000 * statistics.median(gaps), "max_gap_ms": 1000 * max(gaps),
            "median_turn_ms": 1000 * statistics.median(turn_seconds), "max_turn_ms": 1000 * max(turn_seconds),
            # the turn that re-primed and the next, whose step reads the new sequence's prompt
            "reprime_turn_ms": 1000 * max(max(turn_seconds[t: t + 2]) for t in reprime_turns),
            "reprimes": len(reprime_turns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--window", type=int, default=1500, help="context frames")
    parser.add_argument("--keep", type=int, default=600, help="frames kept at a re-prime")
    parser.add_argument("--offset", type=int, default=None, help="turns between the two starts (default window/3)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=["prepared", "chunked", "one-go"],
                        default=["prepared", "chunked", "one-go"])
    args = parser.parse_args()
    model = MusicGen.from_pretrained(args.model, quantize=args.quantize)
    frames = args.window + 2 * (args.window - args.keep) + 20  # two re-primes each
    offset = args.window // 3 if args.offset is None else args.offset
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.quantize}, "
          f"window {args.window}, keep {args.keep}, {frames} frames per session, second session after {offset} turns")
    plain_next_columns = FrameSource.next_columns
    variants = {"prepared": (True, EngineConfig.prefill_chunk_columns),  # the engine's way
                "chunked": (False, EngineConfig.prefill_chunk_columns),  # at the switch, a chunk per turn
                "one-go": (False, 1 << 20)}  # at the switch, in one go: as before
    for _ in range(args.rounds):
        for name, (prepare, chunk) in variants.items():
            if name not in args.variants:
                continue
            FrameSource.next_columns = plain_next_columns if prepare else (lambda self, most: None)
            config = EngineConfig(context_frames=args.window, reprime_keep_frames=args.keep,
                                  prefill_chunk_columns=chunk)
            figures = run(model, config, frames, offset)
            print(f"{name:9s} " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in figures.items()), flush=True)
    FrameSource.next_columns = plain_next_columns


if __name__ == "__main__":
    main()
