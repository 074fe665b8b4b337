"""Fidelity of the fast paths against fp32, measured on the same codes.

    python bench/bench_fidelity.py --model /tmp/mg-small --frames 100

1. fp32 generates `frames` greedy frames (guidance 3) for a few prompts.
2. Each fast path (bfloat16 weights through the C++ step or torch's bfloat16 layers, int8 weights, int4 weights per group size, bf16 / int8 KV caches) is
   teacher-forced on exactly those codes; per decoder step and
   codebook we compare its guided next-token distribution with fp32's: top-1 agreement and KL(fp32 || fast).
3. Each fast path also generates greedily on its own; the SNR of its decoded audio against fp32's audio says
   how far free-running generation drifts (tokens diverge once one differs, so this is a pessimistic figure).
"""

from __future__ import annotations

import argparse
import math

import torch

from musicgen_core import MusicGen
from musicgen_core.sampling import guided_logits

PROMPTS = ["warm lofi beat with soft piano", "dark techno with a heavy kick", "ambient pad with strings"]


def teacher_forced_guided_logits(model: MusicGen, text: str, codes: torch.Tensor) -> torch.Tensor:
    """Guided logits (steps, codebooks, vocab) while feeding the given frames' columns one step at a time."""
    params = model.default_sampling(greedy=True, guidance_scale=3.0)
    frames = codes.shape[1]
    state = model.start_sequence(model.encode_text([text])[0], params, total_frames=frames)
    grid = state.grid
    from musicgen_core.delay import build_delayed
    grid.tokens[:] = build_delayed(codes, grid.delays, model.config.decoder.pad_token_id, grid.capacity, frames)
    out = []
    with torch.inference_mode():
        for column in range(grid.capacity - 1):
            logits = model.decoder([grid.tokens[:, column: column + 1]], [state.cache], [state.cross])[0]
            out.append(guided_logits(logits[:, :, -1], params))
    return torch.stack(out)


def compare(reference: torch.Tensor, fast: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || fast)) over steps and codebooks."""
    agree = (reference.argmax(-1) == fast.argmax(-1)).float().mean().item()
    log_p, log_q = reference.log_softmax(-1), fast.float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return agree, kl


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (reference - other).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", nargs="+", help="only these paths (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = MusicGen.from_pretrained(args.model)
    params = reference.default_sampling(greedy=True, guidance_scale=3.0)
    generated = reference.generate(PROMPTS, frames=args.frames, params=params)
    ref_logits = [teacher_forced_guided_logits(reference, t, generated.codes[i]) for i, t in enumerate(PROMPTS)]
    # bfloat16: the C++ step (float32 activations, bfloat16 weights); bfloat16-torch: torch's bfloat16 layers
    paths = {"bfloat16": dict(dtype=torch.bfloat16), "bfloat16-torch": dict(dtype=torch.bfloat16, torch_layers=True),
             "kv-bf16": dict(kv_dtype=torch.bfloat16),
             "int8": dict(quantize="int8", kv_dtype=torch.float32), "int8+kv-bf16": dict(quantize="int8"),
             "int8+kv-int8": dict(quantize="int8", kv_dtype=torch.int8),
             "int8-fbgemm": dict(quantize="int8-fbgemm", kv_dtype=torch.float32),
             **{f"int4-g{g}": dict(quantize=f"int4-g{g}", kv_dtype=torch.float32) for g in (32, 64, 128)},
             "int4+kv-bf16": dict(quantize="int4", kv_dtype=torch.bfloat16),
             "int4+kv-int8": dict(quantize="int4", kv_dtype=torch.int8)}
    if args.paths:
        unknown = set(args.paths) - set(paths)
        if unknown:
            parser.error(f"unknown paths {sorted(unknown)}; known: {sorted(paths)}")
        paths = {name: paths[name] for name in args.paths}
    print(f"{'path':13s} {'top-1 agreement':>16s} {'KL (nats)':>10s} {'free-running SNR (dB)':>22s}")
    for name, options in paths.items():
        options = dict(options)
        torch_layers = options.pop("torch_layers", False)
        fast = MusicGen.from_pretrained(args.model, **options)
        if torch_layers:
            fast.decoder.layer_steps = fast.decoder.float_kernel = None
        agree, kl = zip(*[compare(ref_logits[i], teacher_forced_guided_logits(fast, t, generated.codes[i]))
                          for i, t in enumerate(PROMPTS)])
        free = fast.generate(PROMPTS, frames=args.frames, params=params)
        snr = sum(snr_db(generated.audio[i], free.audio[i]) for i in range(len(PROMPTS))) / len(PROMPTS)
        print(f"{name:13s} {100 * sum(agree) / len(agree):15.2f}% {sum(kl) / len(kl):10.4f} {snr:22.1f}")


if __name__ == "__main__":
    main()
