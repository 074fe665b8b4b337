"""Write a random-weight MusicGen checkpoint with a published model's shape, in the published layout.

    python bench/make_checkpoint.py --shape small --out /tmp/musicgen-small-random

Shapes follow facebook/musicgen-{small,medium,large} (decoder widths 1024/1536/2048, 24/48/48 layers, t5-base
text encoder, the 32 kHz EnCodec). The tokenizer is generated, so text prompts tokenize differently from the
real t5-base vocabulary; every tensor shape matches the published files.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from musicgen_core.demo import DEMO_CONFIG, write_random_checkpoint

DECODERS = {
    "small": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096),
    "medium": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, ffn_dim=6144),
    "large": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, ffn_dim=8192),
}


def published_config(shape: str, stereo: bool = False) -> dict:
    config = copy.deepcopy(DEMO_CONFIG)
    config["text_encoder"].update(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                                  feed_forward_proj="relu")
    config["audio_encoder"].update(hidden_size=128, num_filters=64, codebook_dim=128)
    config["decoder"].update(max_position_embeddings=2048, num_codebooks=8 if stereo else 4,
                             audio_channels=2 if stereo else 1, **DECODERS[shape])
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(DECODERS), default="small")
    parser.add_argument("--stereo", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="multiply the output heads (e.g. 8: peaked, trained-like next-token distributions)")
    args = parser.parse_args()
    started = time.perf_counter()
    write_random_checkpoint(args.out, published_config(args.shape, args.stereo), args.seed, fit_text_vocab=False,
                            logit_scale=args.logit_scale)
    print(f"wrote {args.out} ({args.shape}{' stereo' if args.stereo else ''}) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
