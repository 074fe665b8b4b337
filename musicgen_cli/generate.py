"""`musicgen-generate`: text (and optionally audio) in, a WAV file (and optionally the codes) out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import musicgen_core  # noqa: F401  first: it sets libgomp's policy before torch loads libgomp (threads.py)
import numpy as np
import torch

from musicgen_core import CheckpointError, MusicGen, PromptTooLongError
from musicgen_core.quantize import QUANTIZATIONS
from musicgen_core.threads import set_threads, thread_policy

from . import wav

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {**DTYPES, "int8": torch.int8}  # int8: with --quantize int8 / int4 (our kernel's decoder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicgen-generate", description=__doc__)
    parser.add_argument("--model", default="demo",
                        help="checkpoint directory, hub id in the local HF cache, or 'demo' (random weights)")
    parser.add_argument("--prompt", default="", help="text prompt; empty for unconditional")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, help="seconds of new audio (default 5)")
    length.add_argument("--frames", type=int, help="new frames (50 per second for the 32 kHz models)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--audio-prompt", type=Path, help="WAV to continue from (resampled if needed)")
    parser.add_argument("--out", type=Path, required=True, help="output WAV, 16-bit PCM")
    parser.add_argument("--codes-out", type=Path, help="new frames as int64 .npy, shape (codebooks, frames)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES),
                        help="self-attention cache dtype (default: the weights' dtype; with --quantize int8/int4, int8:"
                             " a scale per head vector, half of bf16's bytes; with int8-fbgemm, bfloat16 on a bf16 CPU)")
    parser.add_argument("--quantize", choices=list(QUANTIZATIONS),
                        help="quantized decoder weights (CPU): int8 reads ~4x less per step (our kernel, AVX-512 "
                             "VNNI or AVX2, else fbgemm); int4 (= int4-g64) / int4-g32 / int4-g128 ~7x less (our "
                             "int4 kernel, AVX2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            set_threads(args.threads)
        return _run(args)
    except (CheckpointError, PromptTooLongError, ValueError, FileNotFoundError) as error:
        print(f"musicgen-generate: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    wall_start = time.perf_counter()
    model = MusicGen.from_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype],
                                     quantize=args.quantize,
                                     kv_dtype=KV_DTYPES[args.kv_dtype] if args.kv_dtype else None)
    load_seconds = time.perf_counter() - wall_start
    if args.model == "demo":
        print("musicgen-generate: using the built-in demo model (random weights): the output is noise",
              file=sys.stderr)
    params = model.default_sampling(guidance_scale=args.guidance_scale, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                    greedy=True if args.greedy else None)
    audio_prompt = None
    if args.audio_prompt is not None:
        audio_prompt = wav.read_for_model(args.audio_prompt, model.config.sampling_rate,
                                          model.config.audio_channels)
    duration = args.duration if args.frames is None and args.duration is not None else None
    frames = args.frames if args.frames is not None else (None if duration is not None else 5 * model.config.frame_rate)
    output = model.generate(args.prompt or None, frames=frames, duration=duration,
                            audio_prompt=audio_prompt, params=params)
    wav.write(args.out, output.audio[0].numpy(), model.config.sampling_rate)
    if args.codes_out is not None:
        np.save(args.codes_out, output.codes[0].numpy().astype(np.int64))
    wall = time.perf_counter() - wall_start
    new_frames = output.codes.shape[-1]
    stats = {
        "frames": new_frames, "steps": output.steps,
        "ms_per_step": f"{1000 * output.decode_seconds / max(output.steps, 1):.2f}",
        "load_s": f"{load_seconds:.2f}", "wall_s": f"{wall:.2f}",
        "rtf": f"{(new_frames / model.config.frame_rate) / max(output.decode_seconds, 1e-9):.3f}",
        "out": args.out,
        **{key: str(value).replace(" ", "-") for key, value in thread_policy().items()},
    }
    print(" ".join(f"{key}={value}" for key, value in stats.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
