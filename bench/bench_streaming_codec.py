"""Streaming EnCodec decode cost and accuracy (musicgen-small codec shape, random weights; not a test).

Per-frame cost for streams of 1, 10 and 30 s of:
  (a) one offline decode of the whole clip (`Encodec.decode`), divided by its frames;
  (b) the streaming decoder fed one frame at a time (exact mode), flush included;
  (c) the naive approach: re-decode the whole prefix every frame. Measured in full up to --naive-full-frames;
      beyond, prefixes of --naive-points lengths are timed, a + b * length is fitted and summed over all lengths
      (marked "extrapolated").
Then the SNR against offline, and the cost, of low-latency settings (lookahead 0..3 frames) and exact mode,
and the exact-mode cost when each step gets several frames (weights are read once per step, not per frame).

    PYTHONPATH=. python bench/bench_streaming_codec.py --threads 2
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from musicgen_core.config import EncodecConfig
from musicgen_core.encodec import Encodec
from musicgen_core.streaming_codec import decode_step, decoder_lookahead_samples, flush, init_decoder_state


def build_codec(seed: int) -> Encodec:
    config = EncodecConfig()  # the musicgen-small codec: 32 kHz, ratios 8,5,4,4, 64 filters, 128-d, 4 x 2048
    torch.manual_seed(seed)
    codec = Encodec(config).eval()
    for layer in codec.quantizer.layers:  # a zero codebook would make the decoder ignore the codes
        layer.codebook.embed.data.normal_()
    return codec


def offline_seconds(codec: Encodec, codes: torch.Tensor, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        codec.decode(codes)
        best = min(best, time.perf_counter() - started)
    return best


def stream(codec: Encodec, codes: torch.Tensor, lookahead: float | None,
           frames_per_step: int = 1) -> tuple[torch.Tensor, list[float]]:
    """Frame by frame (or n at a time); returns the audio and each step's seconds (the last is the flush)."""
    state = init_decoder_state(codec, lookahead_frames=lookahead)
    pieces, times = [], []
    for index in range(0, codes.shape[-1], frames_per_step):
        started = time.perf_counter()
        pieces.append(decode_step(codec, state, codes[..., index: index + frames_per_step]))
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    pieces.append(flush(codec, state))
    times.append(time.perf_counter() - started)
    return torch.cat(pieces, dim=-1), times


def naive_seconds(codec: Encodec, codes: torch.Tensor, full_frames: int, points: int) -> tuple[float, bool]:
    """Total seconds to re-decode every prefix 1..n; (total, extrapolated)."""
    frames = codes.shape[-1]
    if frames <= full_frames:
        started = time.perf_counter()
        for length in range(1, frames + 1):
            codec.decode(codes[..., :length])
        return time.perf_counter() - started, False
    lengths = sorted({max(1, round(frames * (k + 1) / points)) for k in range(points)})
    seconds = [offline_seconds(codec, codes[..., :length], 1) for length in lengths]
    mean_x, mean_y = statistics.fmean(lengths), statistics.fmean(seconds)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(lengths, seconds))
             / sum((x - mean_x) ** 2 for x in lengths))
    intercept = mean_y - slope * mean_x
    return frames * intercept + slope * frames * (frames + 1) / 2, True


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    error = (estimate - reference).pow(2).sum().item()
    return math.inf if error == 0 else 10 * math.log10(reference.pow(2).sum().item() / error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, nargs="+", default=[1, 10, 30])
    parser.add_argument("--naive-full-frames", type=int, default=50, help="measure the naive approach in full "
                        "up to this many frames; extrapolate beyond")
    parser.add_argument("--naive-points", type=int, default=8, help="prefix lengths timed for the extrapolation")
    parser.add_argument("--snr-seconds", type=float, default=10)
    parser.add_argument("--frames-per-step", type=int, nargs="+", default=[1, 2, 5, 10],
                        help="exact-mode cost when each decode_step gets this many frames (--snr-seconds stream)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    codec = build_codec(args.seed)
    rate, hop = codec.config.sampling_rate, codec.config.hop_length
    frame_ms = 1000 * hop / rate
    generator = torch.Generator().manual_seed(args.seed)
    print(f"torch {torch.__version__}, {args.threads} threads, {cpu_name()}; "
          f"codec: musicgen-small shape, random weights; frame = {hop} samples = {frame_ms:.0f} ms; "
          f"exact lookahead {decoder_lookahead_samples(codec.config)} samples")
    codec.decode(torch.randint(0, 2048, (1, 4, 20), generator=generator))  # warm-up
    stream(codec, torch.randint(0, 2048, (1, 4, 20), generator=generator), None)

    print("\n| stream | frames | (a) offline, whole clip | (b) streaming, frame by frame | step p50 / max "
          "| (c) re-decode prefix every frame | max abs diff (b) vs (a) |")
    print("|---|---|---|---|---|---|---|")
    for seconds in args.seconds:
        frames = round(seconds * rate / hop)
        codes = torch.randint(0, 2048, (1, 4, frames), generator=generator)
        offline = offline_seconds(codec, codes, 2 if frames > 1000 else 3)
        reference = codec.decode(codes)
        audio, times = stream(codec, codes, None)
        naive, extrapolated = naive_seconds(codec, codes, args.naive_full_frames, args.naive_points)
        steps = times[:-1]
        print(f"| {seconds:g} s | {frames} | {1000 * offline / frames:.2f} ms/frame "
              f"| {1000 * sum(times) / frames:.2f} ms/frame | {1000 * statistics.median(steps):.2f} / "
              f"{1000 * max(steps):.2f} ms | {1000 * naive / frames:.1f} ms/frame"
              f"{' (extrapolated)' if extrapolated else ''} | {(audio - reference).abs().max().item():.1e} |")

    frames = round(args.snr_seconds * rate / hop)
    codes = torch.randint(0, 2048, (1, 4, frames), generator=generator)
    reference = codec.decode(codes)
    print(f"\n| decoder mode ({args.snr_seconds:g} s stream, frame by frame) | audio held back | SNR vs offline "
          "| cost |")
    print("|---|---|---|---|")
    for lookahead in (0, 1, 2, 3, None):
        audio, times = stream(codec, codes, lookahead)
        held = decoder_lookahead_samples(codec.config) if lookahead is None else lookahead * hop
        name = "exact (default)" if lookahead is None else f"lookahead_frames={lookahead}"
        print(f"| {name} | {held} samples ({1000 * held / rate:.1f} ms) | {snr_db(reference, audio):.1f} dB "
              f"| {1000 * sum(times) / frames:.2f} ms/frame |")

    print(f"\n| frames per decode_step (exact, {args.snr_seconds:g} s stream) | cost | offline, same clip |")
    print("|---|---|---|")
    offline = offline_seconds(codec, codes, 2)
    for per_step in args.frames_per_step:
        _, times = stream(codec, codes, None, per_step)
        print(f"| {per_step} | {1000 * sum(times) / frames:.2f} ms/frame | {1000 * offline / frames:.2f} ms/frame |")


if __name__ == "__main__":
    main()
