"""EnCodec (SEANet encoder/decoder + residual vector quantizer), offline: whole signals in, whole signals out.

Parameter names follow transformers' `EncodecModel`; weight norm is folded into plain `conv.weight` at load.
The streaming decoder (streaming_codec.py) reuses these modules' weights with explicit state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncodecConfig


def pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad that also reflects signals shorter than the padding (zero-extends first, as EnCodec does)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode=mode)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    padded = F.pad(x, (left, right), mode="reflect")
    return padded[..., : padded.shape[-1] - extra]


class Conv1d(nn.Module):
    """Conv1d padded so that output length = ceil(input / stride): EnCodec's non-causal or causal padding."""

    def __init__(self, config: EncodecConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        self.causal, self.pad_mode = config.use_causal_conv, config.pad_mode
        self.stride = stride
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.padding_total = self.effective_kernel - stride

    def padding(self, length: int) -> tuple[int, int]:
        frames = math.ceil((length - self.effective_kernel + self.padding_total) / self.stride + 1) - 1
        extra = frames * self.stride + self.effective_kernel - self.padding_total - length
        if self.causal:
            return self.padding_total, extra
        right = self.padding_total // 2
        return self.padding_total - right, right + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.padding(x.shape[-1])
        return self.conv(pad1d(x, left, right, self.pad_mode))


class ConvTranspose1d(nn.Module):
    def __init__(self, config: EncodecConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        padding_total = kernel_size - stride
        if config.use_causal_conv:
            self.trim_right = math.ceil(padding_total * config.trim_right_ratio)
        else:
            if config.trim_right_ratio != 1.0:
                raise ValueError("trim_right_ratio != 1.0 only makes sense for causal convolutions")
            self.trim_right = padding_total // 2
        self.trim_left = padding_total - self.trim_right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.trim_left: y.shape[-1] - self.trim_right]


class LSTM(nn.Module):
    """Stacked LSTM over time with a skip connection, in conv layout (batch, channels, time)."""

    def __init__(self, config: EncodecConfig, width: int):
        super().__init__()
        self.lstm = nn.LSTM(width, width, config.num_lstm_layers)

    def forward(self, x: torch.Tensor, state=None):
        seq = x.permute(2, 0, 1)
        out, state = self.lstm(seq, state)
        return (out + seq).permute(1, 2, 0), state


class ResnetBlock(nn.Module):
    def __init__(self, config: EncodecConfig, width: int, dilations: tuple[int, int]):
        super().__init__()
        hidden = width // config.compress
        kernels = (config.residual_kernel_size, 1)
        self.block = nn.ModuleList([
            nn.ELU(), Conv1d(config, width, hidden, kernels[0], dilation=dilations[0]),
            nn.ELU(), Conv1d(config, hidden, width, kernels[1], dilation=dilations[1]),
        ])
        self.shortcut = Conv1d(config, width, width, 1) if config.use_conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


def _run(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)[0] if isinstance(layer, LSTM) else layer(x)
    return x


class SEANetEncoder(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        layers: list[nn.Module] = [Conv1d(config, config.audio_channels, config.num_filters, config.kernel_size)]
        scale = 1
        for ratio in reversed(config.upsampling_ratios):
            width = scale * config.num_filters
            for j in range(config.num_residual_layers):
                layers.append(ResnetBlock(config, width, (config.dilation_growth_rate ** j, 1)))
            layers += [nn.ELU(), Conv1d(config, width, width * 2, ratio * 2, stride=ratio)]
            scale *= 2
        layers += [LSTM(config, scale * config.num_filters), nn.ELU(),
                   Conv1d(config, scale * config.num_filters, config.hidden_size, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.layers, x)


class SEANetDecoder(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        scale = 2 ** len(config.upsampling_ratios)
        layers: list[nn.Module] = [
            Conv1d(config, config.hidden_size, scale * config.num_filters, config.kernel_size),
            LSTM(config, scale * config.num_filters),
        ]
        for ratio in config.upsampling_ratios:
            width = scale * config.num_filters
            layers += [nn.ELU(), ConvTranspose1d(config, width, width // 2, ratio * 2, ratio)]
            for j in range(config.num_residual_layers):
                layers.append(ResnetBlock(config, width // 2, (config.dilation_growth_rate ** j, 1)))
            scale //= 2
        layers += [nn.ELU(), Conv1d(config, config.num_filters, config.audio_channels, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.layers, x)


class Codebook(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(config.codebook_size, config.codebook_dim), requires_grad=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, time, dim) -> nearest code ids (batch, time), ties to the lowest id."""
        flat = x.reshape(-1, x.shape[-1])
        embed = self.embed.t()
        distance = -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed + embed.pow(2).sum(0, keepdim=True))
        return distance.max(dim=-1).indices.view(*x.shape[:-1])


class QuantizerLayer(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.codebook = Codebook(config)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.layers = nn.ModuleList([QuantizerLayer(config) for _ in range(config.num_quantizers)])

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings: (batch, dim, time) -> codes (batch, quantizers, time)"""
        residual = embeddings.transpose(1, 2)
        codes = []
        for layer in self.layers:
            ids = layer.codebook.encode(residual)
            residual = residual - F.embedding(ids, layer.codebook.embed)
            codes.append(ids)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (batch, quantizers, time) -> embeddings (batch, dim, time)"""
        embed = self.layers[0].codebook.embed
        total = torch.zeros(codes.shape[0], codes.shape[2], embed.shape[1], dtype=embed.dtype, device=embed.device)
        for q in range(codes.shape[1]):
            total = total + F.embedding(codes[:, q], self.layers[q].codebook.embed)
        return total.transpose(1, 2)


class Encodec(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        if config.normalize:
            raise ValueError("EnCodec with normalize=True is not supported (MusicGen's codec does not normalize)")
        self.config = config
        self.encoder = SEANetEncoder(config)
        self.decoder = SEANetDecoder(config)
        self.quantizer = ResidualVectorQuantizer(config)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: (batch, channels, samples) -> codes (batch, quantizers, ceil(samples / hop))."""
        if audio.dim() != 3 or audio.shape[1] != self.config.audio_channels:
            raise ValueError(f"EnCodec.encode expects (batch, {self.config.audio_channels}, samples), "
                             f"got {tuple(audio.shape)}")
        return self.quantizer.encode(self.encoder(audio))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (batch, quantizers, frames) -> audio (batch, channels, frames * hop)."""
        return self.decoder(self.quantizer.decode(codes))
