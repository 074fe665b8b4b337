"""Config dataclasses parsed from a MusicGen checkpoint's config.json and generation_config.json.

Only the fields the math needs are kept; every other key in the file is ignored. Defaults are the ones
transformers applies when a key is absent, so a checkpoint that relies on them loads the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor that cannot be used as it is."""


def _pick(raw: dict[str, Any], key: str, default: Any) -> Any:
    value = raw.get(key, default)
    return default if value is None else value


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        name = self.feed_forward_proj.split("-")[-1]
        # transformers maps "gated-gelu" to the tanh approximation ("gelu_new").
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "T5Config":
        ff = _pick(raw, "feed_forward_proj", "relu")
        if ff not in ("relu", "gelu", "gated-gelu", "gated-relu", "gated-silu"):
            raise CheckpointError(f"config.json: text_encoder.feed_forward_proj {ff!r} is not supported")
        return cls(
            vocab_size=raw["vocab_size"],
            d_model=raw["d_model"],
            d_kv=raw["d_kv"],
            d_ff=raw["d_ff"],
            num_layers=raw["num_layers"],
            num_heads=raw["num_heads"],
            relative_attention_num_buckets=_pick(raw, "relative_attention_num_buckets", 32),
            relative_attention_max_distance=_pick(raw, "relative_attention_max_distance", 128),
            layer_norm_epsilon=_pick(raw, "layer_norm_epsilon", 1e-6),
            feed_forward_proj=ff,
        )


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_dim: int
    num_codebooks: int
    max_position_embeddings: int
    audio_channels: int = 1
    activation_function: str = "gelu"
    scale_embedding: bool = False
    pad_token_id: int = 2048
    bos_token_id: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def delays(self) -> list[int]:
        """Delay in steps of each codebook: k for mono, k // 2 for interleaved stereo (pairs share a delay)."""
        return [k // self.audio_channels for k in range(self.num_codebooks)]

    @property
    def max_delay(self) -> int:
        return self.delays[-1]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DecoderConfig":
        channels = _pick(raw, "audio_channels", 1)
        codebooks = _pick(raw, "num_codebooks", 4)
        if channels not in (1, 2) or codebooks % channels:
            raise CheckpointError(
                f"config.json: decoder.audio_channels={channels} with num_codebooks={codebooks} is not supported"
            )
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        if hidden % heads:
            raise CheckpointError(f"config.json: decoder.hidden_size {hidden} not divisible by {heads} heads")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            ffn_dim=raw["ffn_dim"],
            num_codebooks=codebooks,
            max_position_embeddings=_pick(raw, "max_position_embeddings", 2048),
            audio_channels=channels,
            activation_function=_pick(raw, "activation_function", "gelu"),
            scale_embedding=_pick(raw, "scale_embedding", False),
            pad_token_id=_pick(raw, "pad_token_id", raw["vocab_size"]),
            bos_token_id=_pick(raw, "bos_token_id", raw["vocab_size"]),
        )


@dataclass(frozen=True)
class EncodecConfig:
    sampling_rate: int = 32000
    audio_channels: int = 1
    hidden_size: int = 128
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 4)
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = False
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 2048
    codebook_dim: int = 128
    target_bandwidths: tuple[float, ...] = (2.2,)
    use_conv_shortcut: bool = False
    normalize: bool = False

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def num_quantizers(self) -> int:
        bits = math.ceil(math.log2(self.codebook_size))
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * bits))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EncodecConfig":
        norm = _pick(raw, "norm_type", "weight_norm")
        if norm != "weight_norm":
            raise CheckpointError(f"config.json: audio_encoder.norm_type {norm!r} is not supported (weight_norm only)")
        if _pick(raw, "chunk_length_s", None) is not None:
            raise CheckpointError("config.json: audio_encoder.chunk_length_s is set; only unchunked EnCodec is supported")
        hidden = _pick(raw, "hidden_size", 128)
        defaults = cls()
        return cls(
            sampling_rate=_pick(raw, "sampling_rate", 24000),
            audio_channels=_pick(raw, "audio_channels", 1),
            hidden_size=hidden,
            num_filters=_pick(raw, "num_filters", 32),
            num_residual_layers=_pick(raw, "num_residual_layers", 1),
            upsampling_ratios=tuple(_pick(raw, "upsampling_ratios", (8, 5, 4, 2))),
            norm_type=norm,
            kernel_size=_pick(raw, "kernel_size", defaults.kernel_size),
            last_kernel_size=_pick(raw, "last_kernel_size", defaults.last_kernel_size),
            residual_kernel_size=_pick(raw, "residual_kernel_size", defaults.residual_kernel_size),
            dilation_growth_rate=_pick(raw, "dilation_growth_rate", defaults.dilation_growth_rate),
            use_causal_conv=_pick(raw, "use_causal_conv", True),
            pad_mode=_pick(raw, "pad_mode", "reflect"),
            compress=_pick(raw, "compress", 2),
            num_lstm_layers=_pick(raw, "num_lstm_layers", 2),
            trim_right_ratio=_pick(raw, "trim_right_ratio", 1.0),
            codebook_size=_pick(raw, "codebook_size", 1024),
            codebook_dim=_pick(raw, "codebook_dim", hidden),
            target_bandwidths=tuple(_pick(raw, "target_bandwidths", (1.5, 3.0, 6.0, 12.0, 24.0))),
            use_conv_shortcut=_pick(raw, "use_conv_shortcut", True),
            normalize=_pick(raw, "normalize", False),
        )


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults: the checkpoint's generation_config.json, transformers' defaults where it is silent."""

    do_sample: bool = False
    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_length: int = 20

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "GenerationDefaults":
        return cls(
            do_sample=bool(_pick(raw, "do_sample", False)),
            guidance_scale=float(_pick(raw, "guidance_scale", 1.0)),
            temperature=float(_pick(raw, "temperature", 1.0)),
            top_k=int(_pick(raw, "top_k", 50)),
            top_p=float(_pick(raw, "top_p", 1.0)),
            max_length=int(_pick(raw, "max_length", 20)),
        )


@dataclass(frozen=True)
class MusicGenConfig:
    text_encoder: T5Config
    decoder: DecoderConfig
    audio_encoder: EncodecConfig
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    name: str = "musicgen"

    @property
    def has_enc_to_dec_proj(self) -> bool:
        return self.text_encoder.d_model != self.decoder.hidden_size

    @property
    def audio_channels(self) -> int:
        return self.decoder.audio_channels

    @property
    def sampling_rate(self) -> int:
        return self.audio_encoder.sampling_rate

    @property
    def frame_rate(self) -> int:
        return self.audio_encoder.frame_rate

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None,
                  name: str = "musicgen") -> "MusicGenConfig":
        model_type = raw.get("model_type")
        if model_type not in ("musicgen", None):
            raise CheckpointError(f"config.json: model_type {model_type!r} is not a MusicGen checkpoint "
                                  "(expected 'musicgen'; musicgen_melody and others are not supported)")
        for part in ("text_encoder", "audio_encoder", "decoder"):
            if part not in raw:
                raise CheckpointError(f"config.json: missing the '{part}' section of a composite MusicGen config")
        if raw["text_encoder"].get("model_type", "t5") != "t5":
            raise CheckpointError(f"config.json: text_encoder.model_type {raw['text_encoder'].get('model_type')!r} "
                                  "is not supported (t5 only)")
        if raw["audio_encoder"].get("model_type", "encodec") != "encodec":
            raise CheckpointError("config.json: audio_encoder.model_type must be 'encodec'")
        decoder_raw = raw["decoder"]
        if decoder_raw.get("cross_attention_hidden_size") not in (None, raw["text_encoder"]["d_model"]):
            raise CheckpointError("config.json: decoder.cross_attention_hidden_size must equal the text encoder width")
        config = cls(
            text_encoder=T5Config.from_dict(raw["text_encoder"]),
            decoder=DecoderConfig.from_dict(decoder_raw),
            audio_encoder=EncodecConfig.from_dict(raw["audio_encoder"]),
            generation=GenerationDefaults.from_dict(generation or {}),
            name=name,
        )
        if config.audio_encoder.codebook_size != config.decoder.vocab_size:
            raise CheckpointError(
                f"config.json: audio_encoder.codebook_size {config.audio_encoder.codebook_size} != "
                f"decoder.vocab_size {config.decoder.vocab_size}")
        return config
