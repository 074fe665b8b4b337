"""Streaming EnCodec: decode frames (and encode audio) piece by piece, each sample computed once.

The weights are those of the offline modules in encodec.py; the state lives in explicit, clonable dataclasses,
one per layer of `codec.decoder.layers` / `codec.encoder.layers` (any stack of Conv1d, ConvTranspose1d, LSTM,
ResnetBlock, ELU streams the same way: `init_layer_states`, `stream_layers_step`, `stream_layers_flush`):

- `Conv1d`: the inputs still needed (its receptive field, plus the last samples a reflect pad at the stream's
  end will mirror). Output n (window: inputs n * stride - left .. + effective_kernel - 1) is produced once its
  last input is final; the left reflect pad is built once the first `max(left, right_base + stride - 1) + 1`
  inputs are in (from then on `pad1d` can never take its short-signal path; a stream that ends sooner is run
  through the offline layer whole); at the end, `Conv1d.padding(length)` gives the right pad (base + the extra
  that makes ceil(length / stride) outputs) and the kept tail is padded exactly as offline.
- `ConvTranspose1d`: the overlap-add tail (kernel - stride samples, bias not yet added); `trim_left` samples are
  dropped at the start and `trim_right` at the end.
- `LSTM`: (h, c). It is causal, but runs only over inputs that are final (the first conv's output lags it).
- `ResnetBlock`: the states of its branch, and the skip-path samples waiting for the (later) branch output.

A step replaces a state's tensors and never writes into them, so a clone (a rollback snapshot per chunk, the
low-latency mode's look-ahead copy) copies the dataclasses and lists and shares the tensors (`clone_state`).

A layer's count of final outputs depends only on its count of final inputs (`final_output_count`), so the
stack's latency follows from the modules themselves. For the 32 kHz MusicGen codec (ratios 8,5,4,4, kernel 7,
non-causal, reflect) the decoder holds back 2402 samples = 3.75 frames (`decoder_lookahead_samples`): 3 frames
for the first kernel-7 conv, then 482 samples from the transposed convs' trim_left (4, 3, 2, 2 samples at
their rates), the kernel-3 resnet convs (1 sample each) and the last kernel-7 conv (3 samples).

Decoder. Exact mode gives, over a whole stream, `codec.decode(all codes)` (edges included). Low-latency mode
(`lookahead_frames` below the exact need) also emits, after each step, samples up to
frames_in * hop - lookahead computed as if the stream ended now (the eventual right edge: a flush of a copy of
the state), i.e. the offline decode of the prefix received so far. Those samples are not revised later; the
state itself stays exact, so later samples are unaffected and the stream ends aligned. A low-latency step costs
about what decoding 4 frames does (the copy is flushed through every layer).

Encoder. Chunked encoding equals whole-audio encoding (codes, and embeddings to float rounding) for every
frame, once the end is flushed: the convs are exact as above and the encoder's LSTM is causal. What cannot be
had early is frame f before sample (f + 1) * hop + 2386 has arrived (`encoder_lookahead_samples`, 32 kHz codec):
its window reaches that far right, and the last frames depend on where the signal ends (reflect pad mirrored
from the last samples; the extra pad that rounds the length up to whole frames). `encode_step` hands out
exactly the frames that are final (`encoder_final_frames`); `encode_flush` the rest. Encoding a prefix and
flushing gives codes that differ from the whole's in its last frames, by design. Codes are nearest-neighbour
choices, so a float-rounding difference could in principle flip a near tie.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig, EncodecConfig
from .encodec import LSTM, Conv1d, ConvTranspose1d, Encodec, ResnetBlock, SEANetDecoder, SEANetEncoder, pad1d

# -- per-layer state ----------------------------------------------------------------------------------------


def clone_state(value: Any) -> Any:
    """A copy of a streaming state whose tensors are shared: the steps give a state new tensors and never write
    into one they hold, so the copy and the original go on independently. Copying the tensors too (deepcopy)
    took ~12% of the engine's time with four demo sessions, a snapshot per chunk each."""
    if isinstance(value, (torch.Tensor, int, float, bool, str)) or value is None:
        return value
    if isinstance(value, list):
        return [clone_state(item) for item in value]
    if isinstance(value, tuple):
        return tuple(clone_state(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        copied = copy.copy(value)
        for field in dataclasses.fields(value):
            setattr(copied, field.name, clone_state(getattr(value, field.name)))
        return copied
    raise TypeError(f"clone_state: no rule for {type(value).__name__}")


@dataclass
class ConvState:
    buffer: torch.Tensor  # (batch, in_channels, n) inputs from index `start` (negative: the left pad)
    start: int = 0
    seen: int = 0  # inputs received
    emitted: int = 0  # outputs produced
    started: bool = False  # left pad applied


@dataclass
class ConvTransposeState:
    tail: torch.Tensor  # (batch, out_channels, kernel - stride) overlap-add partial sums, no bias
    seen: int = 0


@dataclass
class LSTMState:
    hidden: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class ResidualState:
    block: list[Any]
    shortcut: ConvState | None  # None: identity shortcut
    pending_block: torch.Tensor  # (batch, width, a) branch outputs not yet summed
    pending_skip: torch.Tensor  # (batch, width, b) skip outputs not yet summed


def _conv_geometry(layer: Conv1d) -> tuple[int, int, int, int]:
    """(effective kernel, stride, left pad, right pad without the length-dependent extra)."""
    kernel, stride = layer.effective_kernel, layer.stride
    left, right = layer.padding(stride * kernel)  # a multiple of stride: extra == 0
    return kernel, stride, left, right


def _conv_start_after(layer: Conv1d) -> int:
    """Inputs needed before the left pad is known. With reflect, `pad1d` zero-extends signals no longer than
    max(left, right) (right up to base + stride - 1), which changes the left pad too."""
    kernel, stride, left, right = _conv_geometry(layer)
    return max(left, right + stride - 1) + 1 if layer.pad_mode == "reflect" else 1


def _is_pointwise(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.ELU, nn.Identity))


def _init(layer: nn.Module, batch: int) -> Any:
    if _is_pointwise(layer):
        return None
    if isinstance(layer, LSTM):
        return LSTMState()
    weight = next(layer.parameters())
    if isinstance(layer, Conv1d):
        if layer.pad_mode not in ("reflect", "constant", "replicate"):
            raise TypeError(f"no streaming rule for pad_mode {layer.pad_mode!r}")
        return ConvState(weight.new_zeros(batch, layer.conv.in_channels, 0))
    if isinstance(layer, ConvTranspose1d):
        overlap = layer.conv.kernel_size[0] - layer.conv.stride[0]
        return ConvTransposeState(weight.new_zeros(batch, layer.conv.out_channels, overlap))
    if isinstance(layer, ResnetBlock):
        width = layer.block[1].conv.in_channels
        shortcut = None if isinstance(layer.shortcut, nn.Identity) else _init(layer.shortcut, batch)
        empty = weight.new_zeros(batch, width, 0)
        return ResidualState(init_layer_states(layer.block, batch), shortcut, empty, empty)
    raise TypeError(f"no streaming rule for {type(layer).__name__}")


def _final_count(layer: nn.Module, inputs: int) -> int:
    """Outputs that are final once `inputs` inputs are, whatever follows (the stream may go on or end)."""
    if _is_pointwise(layer) or isinstance(layer, LSTM):
        return inputs
    if isinstance(layer, Conv1d):
        kernel, stride, left, _ = _conv_geometry(layer)
        if inputs < _conv_start_after(layer):
            return 0
        return max(0, (inputs + left - kernel) // stride + 1)
    if isinstance(layer, ConvTranspose1d):
        return max(0, inputs * layer.conv.stride[0] - layer.trim_left)
    if isinstance(layer, ResnetBlock):
        branch = final_output_count(layer.block, inputs)
        skip = inputs if isinstance(layer.shortcut, nn.Identity) else _final_count(layer.shortcut, inputs)
        return min(branch, skip)
    raise TypeError(f"no streaming rule for {type(layer).__name__}")


def final_output_count(layers, inputs: int) -> int:
    """Outputs of a layer stack that are final once `inputs` of its inputs are (the stream may go on)."""
    for layer in layers:
        inputs = _final_count(layer, inputs)
    return inputs


# -- per-layer step / flush ---------------------------------------------------------------------------------


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b], dim=-1)


def _conv_outputs(layer: Conv1d, state: ConvState, padded: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """Outputs first..stop-1 from `padded` (which starts at input index state.start)."""
    kernel, stride, left, _ = _conv_geometry(layer)
    if stop <= first:
        return padded.new_zeros(padded.shape[0], layer.conv.out_channels, 0)
    offset = first * stride - left - state.start
    return layer.conv(padded[..., offset: offset + (stop - first - 1) * stride + kernel])


def _conv_step(layer: Conv1d, state: ConvState, x: torch.Tensor) -> torch.Tensor:
    kernel, stride, left, right = _conv_geometry(layer)
    state.buffer = torch.cat([state.buffer, x], dim=-1)
    state.seen += x.shape[-1]
    if not state.started and state.seen >= _conv_start_after(layer):
        state.buffer = pad1d(state.buffer, left, 0, layer.pad_mode)
        state.start, state.started = -left, True
    count = _final_count(layer, state.seen)
    y = _conv_outputs(layer, state, state.buffer, state.emitted, count)
    state.emitted = max(state.emitted, count)
    if state.started:  # keep the receptive field of the next output and what the end's right pad mirrors
        keep = max(state.start, min(state.emitted * stride - left, state.seen - right - stride))
        state.buffer = state.buffer[..., keep - state.start:].clone()
        state.start = keep
    return y


def _conv_flush(layer: Conv1d, state: ConvState) -> torch.Tensor:
    if not state.started:  # the whole (short) signal is buffered: the offline layer handles its edges
        if state.seen == 0:
            return state.buffer.new_zeros(state.buffer.shape[0], layer.conv.out_channels, 0)
        y = layer(state.buffer)
    else:
        _, right = layer.padding(state.seen)
        padded = pad1d(state.buffer, 0, right, layer.pad_mode)
        y = _conv_outputs(layer, state, padded, state.emitted, -(-state.seen // layer.stride))
    state.emitted += y.shape[-1]
    return y


def _conv_transpose(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """F.conv_transpose1d(x, weight, stride=stride) without bias, as one matmul plus an overlap-add when the
    kernel is a multiple of the stride (EnCodec: 2 * stride). For the few frames of a streaming step this
    measured 1.2-3x faster on CPU than conv_transpose1d."""
    in_channels, out_channels, kernel = weight.shape
    if kernel % stride:
        return F.conv_transpose1d(x, weight, None, stride=stride)
    batch, _, n = x.shape
    blocks = kernel // stride
    parts = (x.transpose(1, 2) @ weight.reshape(in_channels, -1)).view(batch, n, out_channels, blocks, stride)
    y = x.new_zeros(batch, out_channels, n + blocks - 1, stride)
    for j in range(blocks):  # input i, kernel block j -> output block i + j
        y[:, :, j: j + n] += parts[:, :, :, j].transpose(1, 2)
    return y.view(batch, out_channels, -1)


def _conv_transpose_step(layer: ConvTranspose1d, state: ConvTransposeState, x: torch.Tensor) -> torch.Tensor:
    stride = layer.conv.stride[0]
    if x.shape[-1] == 0:
        return state.tail[..., :0]
    y = _conv_transpose(x, layer.conv.weight, stride)
    overlap = state.tail.shape[-1]
    y[..., :overlap] += state.tail
    final_end = x.shape[-1] * stride
    state.tail = y[..., final_end:].clone()
    done = state.seen * stride  # untrimmed outputs before this chunk
    state.seen += x.shape[-1]
    out = y[..., :final_end] + layer.conv.bias[:, None]
    return out[..., max(0, layer.trim_left - done):]


def _conv_transpose_flush(layer: ConvTranspose1d, state: ConvTransposeState) -> torch.Tensor:
    if state.seen == 0:
        return state.tail[..., :0]
    done = state.seen * layer.conv.stride[0]
    out = state.tail + layer.conv.bias[:, None]
    return out[..., max(0, layer.trim_left - done): out.shape[-1] - layer.trim_right]


def _lstm_step(layer: LSTM, state: LSTMState, x: torch.Tensor) -> torch.Tensor:
    """`layer(x, hidden)` written out with F.linear. On CPU, nn.LSTM took 8-40 ms per one-time-step call at
    width 1024 (2 layers) here, against ~2 ms for this (2 ms with oneDNN disabled). Same math: gates i, f, g, o."""
    if x.shape[-1] == 0:
        return x
    lstm = layer.lstm
    if lstm.bidirectional or lstm.proj_size or lstm.batch_first:
        raise TypeError("streaming LSTM: unidirectional, no projection, time-major only")
    seq = x.permute(2, 0, 1)  # (time, batch, width)
    if state.hidden is None:
        zeros = seq.new_zeros(lstm.num_layers, seq.shape[1], lstm.hidden_size)
        state.hidden = (zeros, zeros)
    h_all, c_all = state.hidden
    inputs, h_out, c_out = seq, [], []
    for k in range(lstm.num_layers):
        bias = getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}") if lstm.bias else None
        from_input = F.linear(inputs, getattr(lstm, f"weight_ih_l{k}"), bias)  # (time, batch, 4 * hidden)
        w_hh, h, c = getattr(lstm, f"weight_hh_l{k}"), h_all[k], c_all[k]
        outputs = []
        for t in range(seq.shape[0]):
            i, f, g, o = (from_input[t] + F.linear(h, w_hh)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        inputs = torch.stack(outputs)
        h_out.append(h)
        c_out.append(c)
    state.hidden = (torch.stack(h_out), torch.stack(c_out))
    return (inputs + seq).permute(1, 2, 0)


def _residual_emit(state: ResidualState, branch: torch.Tensor | None, skip: torch.Tensor | None) -> torch.Tensor:
    state.pending_block = _cat(state.pending_block, branch)
    state.pending_skip = _cat(state.pending_skip, skip)
    ready = min(state.pending_block.shape[-1], state.pending_skip.shape[-1])
    out = state.pending_skip[..., :ready] + state.pending_block[..., :ready]
    state.pending_block = state.pending_block[..., ready:].clone()  # own storage: clones stay small
    state.pending_skip = state.pending_skip[..., ready:].clone()
    return out


def _step(layer: nn.Module, state: Any, x: torch.Tensor) -> torch.Tensor:
    if _is_pointwise(layer):
        return layer(x)
    if isinstance(layer, LSTM):
        return _lstm_step(layer, state, x)
    if isinstance(layer, Conv1d):
        return _conv_step(layer, state, x)
    if isinstance(layer, ConvTranspose1d):
        return _conv_transpose_step(layer, state, x)
    if isinstance(layer, ResnetBlock):
        branch = stream_layers_step(layer.block, state.block, x)
        skip = x if state.shortcut is None else _conv_step(layer.shortcut, state.shortcut, x)
        return _residual_emit(state, branch, skip)
    raise TypeError(f"no streaming rule for {type(layer).__name__}")


def _flush(layer: nn.Module, state: Any) -> torch.Tensor | None:
    """What the layer still owes at the end of the stream (None: nothing)."""
    if _is_pointwise(layer) or isinstance(layer, LSTM):
        return None
    if isinstance(layer, Conv1d):
        return _conv_flush(layer, state)
    if isinstance(layer, ConvTranspose1d):
        return _conv_transpose_flush(layer, state)
    if isinstance(layer, ResnetBlock):
        branch = stream_layers_flush(layer.block, state.block)
        skip = None if state.shortcut is None else _conv_flush(layer.shortcut, state.shortcut)
        out = _residual_emit(state, branch, skip)
        if state.pending_block.shape[-1] or state.pending_skip.shape[-1]:
            raise RuntimeError("residual branches ended with different lengths")
        return out
    raise TypeError(f"no streaming rule for {type(layer).__name__}")


def init_layer_states(layers, batch: int) -> list[Any]:
    """States for streaming a stack of encodec.py layers (Conv1d, ConvTranspose1d, LSTM, ResnetBlock, ELU)."""
    return [_init(layer, batch) for layer in layers]


def stream_layers_step(layers, states: list[Any], x: torch.Tensor) -> torch.Tensor:
    """x (batch, channels, n) new inputs -> the outputs they make final (possibly none)."""
    for layer, state in zip(layers, states):
        x = _step(layer, state, x)
    return x


def stream_layers_flush(layers, states: list[Any]) -> torch.Tensor | None:
    """End of stream: each layer takes what the layers before it still owed, then gives what it owes."""
    x = None
    for layer, state in zip(layers, states):
        y = _step(layer, state, x) if x is not None else None
        x = _cat(y, _flush(layer, state))
    return x


def _total_count(layer: nn.Module, inputs: int) -> int:
    """Outputs of a stream of `inputs` inputs once it has ended."""
    if inputs == 0 or _is_pointwise(layer) or isinstance(layer, LSTM):
        return inputs
    if isinstance(layer, Conv1d):
        return -(-inputs // layer.stride)
    if isinstance(layer, ConvTranspose1d):
        return inputs * layer.conv.stride[0]
    if isinstance(layer, ResnetBlock):
        for sub in layer.block:
            inputs = _total_count(sub, inputs)
        return inputs
    raise TypeError(f"no streaming rule for {type(layer).__name__}")


def _inputs_needed(layer: nn.Module, outputs: int, available: int) -> int:
    """Fewest inputs (at most `available`, which suffice) that make `outputs` outputs final."""
    low, high = 0, available
    while low < high:
        middle = (low + high) // 2
        if _final_count(layer, middle) >= outputs:
            high = middle
        else:
            low = middle + 1
    return low


def _flush_until(layers, states: list[Any], inputs: int, limit: int) -> torch.Tensor | None:
    """`stream_layers_flush` (the stack has had `inputs` inputs), but only as far as output `limit` (counted
    from the stream's start): a layer whose share of that is final without the end is stepped over just the
    inputs it needs instead of flushed. Same values as the full flush, less work (e.g. fewer LSTM steps)."""
    seen, total = [], []  # per layer: inputs it has now, and would have after a full flush
    now, end = inputs, inputs
    for layer in layers:
        seen.append(now)
        total.append(end)
        now, end = _final_count(layer, now), _total_count(layer, end)
    flushes, wanted = [], []
    for layer, available in zip(reversed(layers), reversed(total)):
        flushes.append(_final_count(layer, available) < limit)
        limit = available if flushes[-1] else _inputs_needed(layer, limit, available)
        wanted.append(limit)
    x = None
    for layer, state, has, want, flush_it in zip(layers, states, seen, reversed(wanted), reversed(flushes)):
        y = _step(layer, state, x[..., : max(0, want - has)]) if x is not None else None
        x = _cat(y, _flush(layer, state)) if flush_it else y
    return x


# -- decoder ------------------------------------------------------------------------------------------------


@dataclass
class DecoderState:
    """One stream's decoder state (a batch of streams stepped together). Clone with `.clone()`."""

    layers: list[Any]  # one state per codec.decoder.layers entry
    batch: int
    lookahead_samples: int | None  # None: exact
    frames: int = 0  # frames received
    final_samples: int = 0  # samples the exact pipeline has produced
    emitted_samples: int = 0  # samples handed out (> final_samples when low-latency samples ran ahead)
    finished: bool = False

    def clone(self) -> "DecoderState":
        return clone_state(self)


@functools.lru_cache(maxsize=32)
def decoder_lookahead_samples(config: EncodecConfig) -> int:
    """Right context of the decoder in output samples: after n frames (n large), the exact decoder has
    emitted n * hop - this. Computed from the layers (built on the meta device), not hard-coded."""
    with torch.device("meta"):
        layers = SEANetDecoder(config).layers
    hop = config.hop_length
    return max(n * hop - final_output_count(layers, n) for n in range(1000, 1000 + 8))


def init_decoder_state(codec: Encodec, batch: int = 1, lookahead_frames: float | None = None) -> DecoderState:
    """lookahead_frames None (default): exact. A value below the exact need (decoder_lookahead_samples / hop)
    emits samples up to frames_in * hop - lookahead_frames * hop after each step (approximate near the edge);
    values at or above the exact need are exact mode."""
    lookahead = None
    if lookahead_frames is not None:
        if lookahead_frames < 0:
            raise ValueError(f"lookahead_frames must be >= 0, got {lookahead_frames}")
        samples = math.ceil(lookahead_frames * codec.config.hop_length)
        if samples < decoder_lookahead_samples(codec.config):
            lookahead = samples
    return DecoderState(init_layer_states(codec.decoder.layers, batch), batch, lookahead)


@torch.no_grad()
def decode_step(codec: Encodec, state: DecoderState, codes: torch.Tensor) -> torch.Tensor:
    """codes (batch, quantizers, n_frames) -> pcm (batch, channels, n_samples): the samples this step makes
    final (exact mode), plus, in low-latency mode, provisional samples up to frames * hop - lookahead.
    Each frame goes through each layer once: the cost per frame does not grow with the stream."""
    if state.finished:
        raise ValueError("decode_step after flush")
    if codes.dim() != 3 or codes.shape[0] != state.batch:
        raise ValueError(f"codes must be (batch={state.batch}, quantizers, n), got {tuple(codes.shape)}")
    state.frames += codes.shape[-1]
    exact = stream_layers_step(codec.decoder.layers, state.layers, codec.quantizer.decode(codes))
    first = state.final_samples
    state.final_samples += exact.shape[-1]
    out = exact[..., max(0, state.emitted_samples - first):]
    state.emitted_samples = max(state.emitted_samples, state.final_samples)
    if state.lookahead_samples is not None:
        target = state.frames * codec.config.hop_length - state.lookahead_samples
        if target > state.emitted_samples:
            # decode a copy as if the stream ended now, as far as `target`
            ahead = _flush_until(codec.decoder.layers, clone_state(state.layers), state.frames, target)
            start = state.emitted_samples - state.final_samples
            out = torch.cat([out, ahead[..., start: start + target - state.emitted_samples]], dim=-1)
            state.emitted_samples = target
    return out


@torch.no_grad()
def flush(codec: Encodec, state: DecoderState) -> torch.Tensor:
    """End of stream: the remaining samples (pcm (batch, channels, n)); the state is finished afterwards."""
    if state.finished:
        raise ValueError("flush twice")
    state.finished = True
    rest = stream_layers_flush(codec.decoder.layers, state.layers)  # the last layer is a conv: never None
    first = state.final_samples
    state.final_samples += rest.shape[-1]
    out = rest[..., max(0, state.emitted_samples - first):]
    state.emitted_samples = max(state.emitted_samples, state.final_samples)
    return out


def split_channels(codes: torch.Tensor, audio_channels: int) -> torch.Tensor:
    """MusicGen frames (codebooks, n) -> codec batch (channels, codebooks // channels, n): stereo models decode
    even codebooks (left) and odd codebooks (right) as two mono streams, i.e. one state with batch = 2."""
    return torch.stack([codes[c::audio_channels] for c in range(audio_channels)])


# -- encoder ------------------------------------------------------------------------------------------------


@dataclass
class EncoderState:
    layers: list[Any]  # one state per codec.encoder.layers entry
    batch: int
    samples: int = 0  # samples received
    frames: int = 0  # frames emitted
    finished: bool = False

    def clone(self) -> "EncoderState":
        return clone_state(self)


def init_encoder_state(codec: Encodec, batch: int = 1) -> EncoderState:
    return EncoderState(init_layer_states(codec.encoder.layers, batch), batch)


@functools.lru_cache(maxsize=32)
def _meta_encoder_layers(config: EncodecConfig) -> nn.ModuleList:
    with torch.device("meta"):
        return SEANetEncoder(config).layers


def encoder_final_frames(config: EncodecConfig, samples: int) -> int:
    """Frames whose codes are final once `samples` samples have arrived (the stream may still go on)."""
    return final_output_count(_meta_encoder_layers(config), samples)


@functools.lru_cache(maxsize=32)
def encoder_lookahead_samples(config: EncodecConfig) -> int:
    """Samples past the end of frame f needed before its codes are final (worst case over frames)."""
    layers = _meta_encoder_layers(config)
    hop, worst = config.hop_length, 0
    for frame in range(1000, 1004):
        needed = (frame + 1) * hop
        while final_output_count(layers, needed) < frame + 1:
            needed += 1
        worst = max(worst, needed - (frame + 1) * hop)
    return worst


def _quantize(codec: Encodec, embeddings: torch.Tensor | None, batch: int) -> torch.Tensor:
    if embeddings is None or embeddings.shape[-1] == 0:
        device = codec.quantizer.layers[0].codebook.embed.device
        return torch.zeros(batch, codec.config.num_quantizers, 0, dtype=torch.long, device=device)
    return codec.quantizer.encode(embeddings)


@torch.no_grad()
def encode_step(codec: Encodec, state: EncoderState, pcm: torch.Tensor) -> torch.Tensor:
    """pcm (batch, channels, n) -> codes (batch, quantizers, k) of the frames that are now final."""
    if state.finished:
        raise ValueError("encode_step after encode_flush")
    if pcm.dim() != 3 or pcm.shape[:2] != (state.batch, codec.config.audio_channels):
        raise ValueError(f"pcm must be (batch={state.batch}, {codec.config.audio_channels}, n), "
                         f"got {tuple(pcm.shape)}")
    state.samples += pcm.shape[-1]
    codes = _quantize(codec, stream_layers_step(codec.encoder.layers, state.layers, pcm), state.batch)
    state.frames += codes.shape[-1]
    return codes


@torch.no_grad()
def encode_flush(codec: Encodec, state: EncoderState) -> torch.Tensor:
    """End of audio: codes of the remaining frames (those that depend on the signal's end)."""
    if state.finished:
        raise ValueError("encode_flush twice")
    state.finished = True
    codes = _quantize(codec, stream_layers_flush(codec.encoder.layers, state.layers), state.batch)
    state.frames += codes.shape[-1]
    return codes


# -- latency ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamLatency:
    """Algorithmic latency of streamed generation (compute time excluded).

    samples = delay_steps * hop + codec_lookahead_samples. After the LM has run F steps (columns 1..F, i.e.
    codebook 0 of frames 0..F-1), frames 0..F-1-delay_steps are complete and the streaming decoder has
    emitted audio up to sample F * hop - samples. A DAW delays its timeline by `samples` to line streamed
    audio up with the LM's frontier. `steps_to_frame_start`: further LM steps, after the step that
    completes frame t, until the first sample of frame t (t * hop) is emitted.
    """

    sampling_rate: int
    hop_length: int
    delay_steps: int  # max_delay: steps between a frame's first and last codebook
    codec_lookahead_samples: int  # right context the streaming decoder holds back
    exact: bool  # False in low-latency mode (the last codec_lookahead.. samples are provisional)

    @property
    def samples(self) -> int:
        return self.delay_steps * self.hop_length + self.codec_lookahead_samples

    @property
    def milliseconds(self) -> float:
        return 1000.0 * self.samples / self.sampling_rate

    @property
    def frames(self) -> float:
        return self.samples / self.hop_length

    @property
    def steps_to_frame_start(self) -> int:
        return max(0, math.ceil((self.codec_lookahead_samples + 1) / self.hop_length) - 1)


def algorithmic_latency(decoder_config: DecoderConfig, encodec_config: EncodecConfig,
                        lookahead_frames: float | None = None) -> StreamLatency:
    """Latency for a configuration: exact (lookahead_frames None) or the low-latency setting, which holds back
    min(ceil(lookahead_frames * hop), exact need) samples, as `init_decoder_state` does."""
    exact_need = decoder_lookahead_samples(encodec_config)
    held = exact_need
    if lookahead_frames is not None:
        held = min(exact_need, math.ceil(lookahead_frames * encodec_config.hop_length))
    return StreamLatency(encodec_config.sampling_rate, encodec_config.hop_length, decoder_config.max_delay,
                         held, held == exact_need)
