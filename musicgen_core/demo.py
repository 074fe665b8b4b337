"""The built-in demo model: a small random-weight MusicGen written in the published checkpoint layout.

Nothing is downloaded and no weights are committed: the tokenizer is a sentencepiece model trained here on a
generated corpus, the weights come from a fixed seed. It makes noise, not music, but exercises every code path
(tokenizer, text encoder, decoder, 32 kHz EnCodec structure) at a size two CPU cores run faster than real time.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file

from .config import MusicGenConfig
from .loading import KEY_PREFIXES
from .modules import MusicGenModules

DEMO_VERSION = 1

DEMO_CONFIG = {
    "model_type": "musicgen",
    "architectures": ["MusicgenForConditionalGeneration"],
    "text_encoder": {"model_type": "t5", "vocab_size": 0, "d_model": 64, "d_kv": 16, "d_ff": 128,
                     "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 32,
                     "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
                     "feed_forward_proj": "relu"},
    "audio_encoder": {"model_type": "encodec", "sampling_rate": 32000, "audio_channels": 1, "hidden_size": 32,
                      "num_filters": 8, "num_residual_layers": 1, "upsampling_ratios": [8, 5, 4, 4],
                      "norm_type": "weight_norm", "kernel_size": 7, "last_kernel_size": 7,
                      "residual_kernel_size": 3, "dilation_growth_rate": 2, "use_causal_conv": False,
                      "pad_mode": "reflect", "compress": 2, "num_lstm_layers": 2, "trim_right_ratio": 1.0,
                      "codebook_size": 2048, "codebook_dim": 32, "target_bandwidths": [2.2],
                      "use_conv_shortcut": False, "normalize": False, "chunk_length_s": None, "overlap": None},
    "decoder": {"model_type": "musicgen_decoder", "vocab_size": 2048, "hidden_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 512, "num_codebooks": 4,
                "audio_channels": 1, "max_position_embeddings": 1024, "activation_function": "gelu",
                "scale_embedding": False, "pad_token_id": 2048, "bos_token_id": 2048,
                "decoder_start_token_id": 2048},
}

DEMO_GENERATION_CONFIG = {"do_sample": True, "guidance_scale": 3.0, "max_length": 1500,
                          "pad_token_id": 2048, "bos_token_id": 2048, "decoder_start_token_id": 2048}

_WORDS = ("warm lofi beat ambient pad techno kick bass drums piano guitar synth strings jazz chill upbeat "
          "dark bright slow fast dreamy heavy soft loud groove rhythm melody chords hip hop house rock pop "
          "orchestral cinematic retro 80s 90s electronic acoustic funky mellow epic minimal dub reggae latin "
          "violin cello flute trumpet saxophone organ vinyl crackle tape reverb delay distorted clean").split()


def train_demo_tokenizer(path: Path, vocab_size: int = 400) -> None:
    """Train a small unigram sentencepiece model with T5's special ids (pad 0, </s> 1, <unk> 2)."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    path.write_bytes(model.getvalue())


def to_checkpoint_key(name: str) -> str:
    for source, target in sorted(KEY_PREFIXES, key=lambda pair: -len(pair[1])):
        if name.startswith(target):
            return source + name[len(target):]
    raise KeyError(name)


def write_demo_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write config.json, generation_config.json, model.safetensors and spiece.model into `directory`."""
    return write_random_checkpoint(directory, DEMO_CONFIG, seed)


def write_random_checkpoint(directory: Path, config: dict, seed: int = 0, fit_text_vocab: bool = True,
                            logit_scale: float = 1.0) -> Path:
    """A random-weight checkpoint of any MusicGen shape in the published layout. With fit_text_vocab the
    text encoder's vocabulary is sized to the generated tokenizer (plus T5's 100 sentinels). logit_scale
    multiplies the output heads: random logits are nearly flat (std ~0.6), so top-1 comparisons between
    numeric paths flip on near-ties; sharper heads give peaked distributions more like a trained model's.
    (Scaling every decoder weight instead makes a 24-layer stack chaotic: its residual stream explodes.)"""

    directory.mkdir(parents=True, exist_ok=True)
    train_demo_tokenizer(directory / "spiece.model")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(directory / "spiece.model")).vocab_size()
    config = json.loads(json.dumps(config))
    if fit_text_vocab:
        config["text_encoder"]["vocab_size"] = vocab + 100  # T5 appends 100 sentinel ids
    torch.manual_seed(seed)
    modules = MusicGenModules(MusicGenConfig.from_dict(config))
    tensors = {}
    for name, tensor in modules.state_dict().items():
        if name.endswith("codebook.embed"):
            tensor = torch.randn_like(tensor)  # a zero codebook would make every code decode alike
        elif name.startswith("decoder.lm_heads.") and logit_scale != 1.0:
            tensor = tensor * logit_scale
        key = to_checkpoint_key(name)
        if key.startswith("audio_encoder.") and key.endswith("conv.weight"):
            # the published files store weight norm as (g, v); write it that way to exercise the folding
            norm = tensor.flatten(1).norm(dim=1).view(-1, *[1] * (tensor.dim() - 1))
            tensors[key[: -len("weight")] + "weight_g"] = norm.contiguous()
            tensors[key[: -len("weight")] + "weight_v"] = tensor.contiguous()
        else:
            tensors[key] = tensor.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "generation_config.json").write_text(json.dumps(DEMO_GENERATION_CONFIG, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def demo_checkpoint() -> Path:
    """The demo checkpoint's directory, written on first use under the user cache (or MUSICGEN_DEMO_DIR)."""
    base = os.environ.get("MUSICGEN_DEMO_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "musicgen-live")
    directory = Path(base) / f"demo-v{DEMO_VERSION}"
    if (directory / "config.json").is_file():
        return directory
    Path(base).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="demo-", dir=base))
    write_demo_checkpoint(staging)
    try:
        staging.rename(directory)  # atomic: a concurrent writer's copy wins and ours is dropped
    except OSError:
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
    return directory
