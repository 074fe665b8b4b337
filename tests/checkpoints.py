"""Test-time factory of tiny random-weight MusicGen checkpoints in the published Hugging Face layout.

Everything here is built locally (nothing is downloaded): a tiny sentencepiece unigram model is trained on a
generated corpus of music descriptions, and a tiny ``MusicgenForConditionalGeneration`` is built with
``transformers`` (a test-only dependency) and saved the way ``facebook/musicgen-*`` checkpoints are published::

    config.json                      composite MusicgenConfig (text_encoder / audio_encoder / decoder)
    generation_config.json           do_sample=true, guidance_scale=3.0, max_length=1500, ids 2048
    model.safetensors                or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    spiece.model                     T5 sentencepiece model (pad=0, eos=1, unk=2, no bos)

Weights are random but reproducible (``seed``). Two things make them useful as an oracle:

* the EnCodec codebooks are randomised (a fresh transformers EnCodec has all-zero codebooks, and decoding would
  then ignore the codes), and
* every weight of the decoder (the LM) is multiplied by ``DECODER_WEIGHT_SCALE`` so greedy logits are far from
  ties: fp32 and fp64 greedy runs produce identical codes.

``weight_norm_names="weight_g"`` stores the weight-norm tensors as ``X.weight_g`` / ``X.weight_v`` (as the
published 2023 files do) instead of ``X.parametrizations.weight.original0`` / ``original1``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "CODEBOOK_SIZE",
    "DECODER_WEIGHT_SCALE",
    "FRAME_SAMPLES",
    "SAMPLING_RATE",
    "build_config",
    "build_model",
    "load_oracle",
    "load_tokenizer",
    "make_checkpoint",
    "oracle_generate",
    "train_spiece_model",
]

SAMPLING_RATE = 32000
FRAME_SAMPLES = 640  # prod(upsampling_ratios) = 8 * 5 * 4 * 4
CODEBOOK_SIZE = 2048
DECODER_WEIGHT_SCALE = 3.0
# std of the random EnCodec codebook entries. 1.0 makes decoding clearly depend on every codebook (replacing
# one codebook's codes changes the audio by ~25% of its std). Note: the random *encoder* maps real audio to
# nearly constant codes at any scale; these checkpoints are meant for decoding, as MusicGen uses them.
CODEBOOK_SCALE = 1.0
SPIECE_VOCAB_SIZE = 256
T5_EXTRA_IDS = 100

# --------------------------------------------------------------------------------------------------------------
# sentencepiece
# --------------------------------------------------------------------------------------------------------------

_GENRES = [
    "rock", "jazz", "blues", "techno", "house", "ambient", "classical", "folk", "metal", "reggae", "funk",
    "soul", "disco", "hip hop", "lofi", "pop", "country", "trance", "dubstep", "orchestral", "synthwave",
    "bossa nova", "gospel", "punk", "electronic", "cinematic", "latin", "afrobeat",
]
_INSTRUMENTS = [
    "guitar", "piano", "drums", "bass", "violin", "cello", "synth", "saxophone", "trumpet", "flute", "organ",
    "harp", "strings", "choir", "percussion", "ukulele", "banjo", "marimba", "clarinet", "accordion",
    "electric guitar", "acoustic guitar", "bass guitar", "drum machine", "pads", "horns", "vocals",
]
_MOODS = [
    "happy", "sad", "calm", "energetic", "dark", "bright", "dreamy", "epic", "melancholic", "uplifting",
    "relaxing", "aggressive", "warm", "mellow", "groovy", "peaceful", "intense", "nostalgic", "playful",
]
_ADJECTIVES = [
    "slow", "fast", "heavy", "soft", "loud", "gentle", "driving", "catchy", "smooth", "distorted", "steady",
    "punchy", "lush", "sparse", "layered", "rhythmic", "funky", "deep", "crisp", "vintage", "modern",
]
_PLACES = ["a beach", "the city", "a forest", "a road trip", "a rainy night", "a party", "a film", "a video game"]
_TEMPLATES = [
    "{mood} {genre} song with {adj} {instr} and {instr2}",
    "a {adj} {genre} track featuring {instr}",
    "{genre} music, {mood}, {adj} {instr}, {bpm} bpm",
    "an {mood} {genre} tune with {adj} {instr} and {instr2} at {bpm} bpm",
    "{adj} {instr} solo over a {mood} {genre} beat",
    "{mood} {genre} for {place}, with {instr} and {adj} {instr2}",
    "{bpm} bpm {genre} with a {adj} groove, {instr} melody and {instr2} chords",
    "background music for {place}: {mood}, {adj}, {genre}",
]


def music_description_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """English-like music descriptions built from word lists (deterministic)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        s = rng.choice(_TEMPLATES).format(
            mood=rng.choice(_MOODS),
            genre=rng.choice(_GENRES),
            instr=rng.choice(_INSTRUMENTS),
            instr2=rng.choice(_INSTRUMENTS),
            adj=rng.choice(_ADJECTIVES),
            place=rng.choice(_PLACES),
            bpm=rng.randrange(60, 181),
        )
        if rng.random() < 0.5:
            s = s[0].upper() + s[1:]
        if rng.random() < 0.7:
            s += "."
        sentences.append(s)
    return sentences


def train_spiece_model(path: Path, *, vocab_size: int = SPIECE_VOCAB_SIZE, seed: int = 0) -> Path:
    """Train a tiny T5-style sentencepiece unigram model; write ``spiece.model``.

    ``path`` is either a directory (``path/spiece.model`` is written) or a file name ending in ``.model``.
    Special ids follow T5: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, no ``<s>``.
    """
    import sentencepiece as spm

    path = Path(path)
    if path.suffix == ".model":
        out = path
    else:
        out = path / "spiece.model"
    out.parent.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    model = _BytesSink()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(music_description_corpus(seed=seed)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out


class _BytesSink:
    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)


def spiece_vocab_size(spiece_path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(spiece_path)).get_piece_size()


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------


def build_config(
    *,
    stereo: bool = False,
    text_width: int = 32,
    decoder_width: int = 32,
    ffn_dim: int = 64,
    max_position_embeddings: int = 256,
    text_vocab_size: int = SPIECE_VOCAB_SIZE + T5_EXTRA_IDS,
    t5_ff: str = "relu",
):
    """The composite ``MusicgenConfig`` of a tiny checkpoint with the musicgen 32 kHz structure."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    t5 = T5Config(
        vocab_size=text_vocab_size,
        d_model=text_width,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        feed_forward_proj=t5_ff,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    encodec = EncodecConfig(
        sampling_rate=SAMPLING_RATE,
        audio_channels=1,  # stereo MusicGen decodes left and right separately with a mono codec
        upsampling_ratios=[8, 5, 4, 4],
        use_causal_conv=False,
        pad_mode="reflect",
        norm_type="weight_norm",
        num_lstm_layers=2,
        use_conv_shortcut=False,
        normalize=False,
        target_bandwidths=[2.2],
        codebook_size=CODEBOOK_SIZE,
        chunk_length_s=None,
        overlap=None,
        trim_right_ratio=1.0,
        num_filters=4,
        hidden_size=16,
    )
    assert encodec.num_quantizers == 4, encodec.num_quantizers
    num_codebooks = 8 if stereo else 4
    decoder = MusicgenDecoderConfig(
        vocab_size=CODEBOOK_SIZE,
        num_codebooks=num_codebooks,
        audio_channels=2 if stereo else 1,
        hidden_size=decoder_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings,
        activation_function="gelu",
        pad_token_id=CODEBOOK_SIZE,
        bos_token_id=CODEBOOK_SIZE,
        decoder_start_token_id=CODEBOOK_SIZE,
    )
    return MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=encodec.to_dict(), decoder=decoder.to_dict())


def _generation_config_dict() -> dict:
    return {
        "do_sample": True,
        "guidance_scale": 3.0,
        "max_length": 1500,
        "pad_token_id": CODEBOOK_SIZE,
        "bos_token_id": CODEBOOK_SIZE,
        "decoder_start_token_id": CODEBOOK_SIZE,
    }


@torch.no_grad()
def build_model(config, *, seed: int = 0, decoder_weight_scale: float = DECODER_WEIGHT_SCALE):
    """A ``MusicgenForConditionalGeneration`` with reproducible random weights, usable as an oracle."""
    from transformers import GenerationConfig, MusicgenForConditionalGeneration

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        torch.manual_seed(seed)
        model = MusicgenForConditionalGeneration(config).eval()

    # (a) EnCodec codebooks: a fresh model has all-zero codebooks (and zero cluster sizes).
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.audio_encoder.quantizer.layers:
        cb = layer.codebook
        embed = torch.randn(cb.embed.shape, generator=gen, dtype=cb.embed.dtype) * CODEBOOK_SCALE
        cb.embed.copy_(embed)
        cb.embed_avg.copy_(embed)
        cb.cluster_size.fill_(1.0)
        if hasattr(cb, "inited"):
            cb.inited.fill_(True)

    # (b) scale the LM so greedy logits are far from ties.
    for p in model.decoder.parameters():
        p.mul_(decoder_weight_scale)

    gen_config = GenerationConfig(**_generation_config_dict())
    model.generation_config = gen_config
    return model


_WN_RE = re.compile(r"^(.*)\.parametrizations\.weight\.original([01])$")


def _rename_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        m = _WN_RE.match(k)
        if m:
            k = f"{m.group(1)}.weight_{'g' if m.group(2) == '0' else 'v'}"
        out[k] = v
    return out


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def make_checkpoint(
    path: Path,
    *,
    stereo: bool = False,
    text_width: int = 32,
    decoder_width: int = 32,
    ffn_dim: int = 64,
    weight_norm_names: Literal["parametrizations", "weight_g"] = "parametrizations",
    sharded: bool = False,
    max_position_embeddings: int = 256,
    seed: int = 0,
    t5_ff: str = "relu",
    decoder_weight_scale: float = DECODER_WEIGHT_SCALE,
    spiece_model: Path | None = None,
) -> Path:
    """Build a tiny random-weight MusicGen checkpoint directory in the published layout and return ``path``.

    ``stereo``: 8 interleaved codebooks (even = left, odd = right), decoder ``audio_channels=2``, mono codec.
    ``decoder_width != text_width`` gives the composite model an ``enc_to_dec_proj``.
    ``ffn_dim``: the decoder's feed-forward width; from 1024 (the published models' 4096) a float decoder loaded
    on a CPU steps through the kernel's C++ layers.
    ``weight_norm_names``: ``"parametrizations"`` (what transformers saves today:
    ``X.parametrizations.weight.original0/1``) or ``"weight_g"`` (``X.weight_g`` / ``X.weight_v``, as in the
    published 2023 files). ``sharded``: ``model-0000N-of-0000M.safetensors`` (at least 2) plus
    ``model.safetensors.index.json`` instead of one ``model.safetensors``.
    ``t5_ff``: T5 ``feed_forward_proj`` (``"relu"`` like t5-base, or ``"gated-gelu"``).
    ``spiece_model``: an existing ``spiece.model`` to copy in; a fresh one is trained (~0.2 s) if None.
    Same arguments give byte-identical files.
    """
    from safetensors.torch import load_file, save_file

    if weight_norm_names not in ("parametrizations", "weight_g"):
        raise ValueError(f"weight_norm_names must be 'parametrizations' or 'weight_g', not {weight_norm_names!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    spiece = path / "spiece.model"
    if spiece_model is None:
        train_spiece_model(spiece, seed=0)
    elif Path(spiece_model).resolve() != spiece.resolve():
        spiece.write_bytes(Path(spiece_model).read_bytes())

    config = build_config(
        stereo=stereo,
        text_width=text_width,
        decoder_width=decoder_width,
        ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings,
        text_vocab_size=spiece_vocab_size(spiece) + T5_EXTRA_IDS,
        t5_ff=t5_ff,
    )
    model = build_model(config, seed=seed, decoder_weight_scale=decoder_weight_scale)

    for stale in [*_safetensors_files(path), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if sharded:
        # A shard limit of a third of the total size gives 3-4 shards.
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        max_shard_size = max(total // 3, 1)
    else:
        max_shard_size = "10GB"
    model.save_pretrained(path, max_shard_size=max_shard_size)
    files = _safetensors_files(path)
    if sharded:
        assert len(files) >= 2 and (path / "model.safetensors.index.json").exists(), files
    else:
        assert [f.name for f in files] == ["model.safetensors"], files

    if weight_norm_names == "weight_g":
        index_path = path / "model.safetensors.index.json"
        for f in _safetensors_files(path):
            state = load_file(str(f))
            save_file(_rename_weight_norm(state), str(f), metadata={"format": "pt"})
        if index_path.exists():
            index = json.loads(index_path.read_text())
            index["weight_map"] = dict(
                sorted(_rename_weight_norm(dict(index["weight_map"])).items())  # type: ignore[arg-type]
            )
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    return path


def load_oracle(path: Path, *, dtype: torch.dtype = torch.float32):
    """``(MusicgenForConditionalGeneration in eval mode, T5Tokenizer)`` loaded from a checkpoint directory."""
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(str(path), dtype=dtype).eval()
    return model, load_tokenizer(path)


def load_tokenizer(path: Path):
    """transformers' T5 tokenizer built from just ``spiece.model`` (appends ``</s>``, pads with id 0).

    In transformers 5.x ``T5Tokenizer`` is the ``tokenizers``-backed class. ``from_pretrained(dir)`` converts
    ``dir/spiece.model``; ``T5Tokenizer(vocab_file=...)`` does NOT (it silently builds a 104-token placeholder
    vocabulary), so do not use the constructor.
    """
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(path))


@torch.no_grad()
def oracle_generate(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_new_tokens: int,
    guidance_scale: float = 3.0,
    do_sample: bool = False,
    **generate_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run transformers' ``generate`` and return ``(codes, audio)``.

    ``codes``: ``(batch, num_codebooks, frames)`` int64 with the delay pattern removed (stereo: 8 codebooks
    interleaved, even = left, odd = right); ``audio``: ``(batch, channels, frames * 640)`` in the model's dtype.
    transformers returns only the audio, so the codes are captured on their way into the EnCodec decoder.
    """
    captured: list[torch.Tensor] = []
    codec = model.audio_encoder
    original_decode = codec.decode

    def recording_decode(audio_codes, *args, **kwargs):
        captured.append(audio_codes.detach().clone())
        return original_decode(audio_codes, *args, **kwargs)

    inputs = tokenizer(list(texts), padding=True, return_tensors="pt")
    codec.decode = recording_decode
    try:
        audio = model.generate(
            **inputs,
            do_sample=do_sample,
            guidance_scale=guidance_scale,
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )
    finally:
        del codec.decode  # drop the instance attribute: the class method shows through again
    if hasattr(audio, "sequences"):
        audio = audio.sequences
    if len(captured) == 1:  # mono: (1, batch, K, T)
        codes = captured[0][0]
    else:  # stereo: left = even codebooks, right = odd codebooks
        left, right = captured[0][0], captured[1][0]
        b, k, t = left.shape
        codes = torch.stack([left, right], dim=2).reshape(b, 2 * k, t)
    return codes, audio
