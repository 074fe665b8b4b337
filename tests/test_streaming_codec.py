"""Streaming EnCodec == offline EnCodec: decoder (exact and low-latency), encoder, latency accounting.

Small random codecs with the 32 kHz structure (ratios 8,5,4,4, kernel 7, non-causal, reflect); codebooks are
randomised (a zero codebook would make decoding ignore the codes).
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from musicgen_core.config import DecoderConfig, EncodecConfig
from musicgen_core.delay import DelayGrid, build_delayed, columns_for
from musicgen_core.encodec import Encodec
from musicgen_core.streaming_codec import (
    algorithmic_latency,
    decode_step,
    decoder_lookahead_samples,
    encode_flush,
    encode_step,
    encoder_final_frames,
    encoder_lookahead_samples,
    flush,
    init_decoder_state,
    init_encoder_state,
    init_layer_states,
    split_channels,
    stream_layers_flush,
    stream_layers_step,
)

HOP = 640
SMALL = dict(num_filters=4, hidden_size=16, codebook_size=64, codebook_dim=16, upsampling_ratios=(8, 5, 4, 4),
             use_causal_conv=False, pad_mode="reflect", use_conv_shortcut=False, target_bandwidths=(1.2,))


def make_codec(seed: int = 0, **overrides) -> Encodec:
    config = EncodecConfig(**{**SMALL, **overrides})
    assert config.num_quantizers == 4
    torch.manual_seed(seed)
    codec = Encodec(config).eval()
    for layer in codec.quantizer.layers:
        layer.codebook.embed.data.normal_()
    return codec


@pytest.fixture(scope="module")
def codec() -> Encodec:
    return make_codec()


def chunk_sizes(kind: str, total: int, seed: int = 0) -> list[int]:
    if kind == "one":
        return [1] * total
    if kind == "all":
        return [total]
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(rng.choice([0, 1, 1, 2, 3, 5, 8]), total - sum(sizes)))
    return sizes


def stream_decode(codec, codes, sizes, lookahead_frames=None, trace=None):
    state = init_decoder_state(codec, batch=codes.shape[0], lookahead_frames=lookahead_frames)
    pieces, at = [], 0
    for n in sizes:
        before = (state.final_samples, state.emitted_samples)
        pieces.append(decode_step(codec, state, codes[..., at: at + n]))
        at += n
        if trace is not None:
            trace.append((at, before, state.final_samples, state.emitted_samples))
    pieces.append(flush(codec, state))
    return torch.cat(pieces, dim=-1), state


def offline(codec, codes):
    with torch.no_grad():
        return codec.decode(codes)


CHUNKINGS = [pytest.param("one", 0, id="one-at-a-time"), pytest.param("all", 0, id="all-at-once")] + [
    pytest.param("random", seed, id=f"random-{seed}") for seed in range(4)]


@pytest.mark.parametrize("frames", [1, 3, 4, 5, 9, 31], ids=lambda n: f"{n}frames")
@pytest.mark.parametrize("kind,seed", CHUNKINGS)
def test_streamed_equals_offline(codec, frames, kind, seed):
    codes = torch.randint(0, 64, (2, 4, frames), generator=torch.Generator().manual_seed(seed + frames))
    streamed, state = stream_decode(codec, codes, chunk_sizes(kind, frames, seed))
    assert streamed.shape == (2, 1, frames * HOP)
    torch.testing.assert_close(streamed, offline(codec, codes), atol=1e-5, rtol=0)
    assert state.emitted_samples == frames * HOP


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(use_causal_conv=True, use_conv_shortcut=True, upsampling_ratios=(8, 5, 4, 2),
                      sampling_rate=16000), id="causal-shortcut"),
    pytest.param(dict(pad_mode="constant", num_residual_layers=2, upsampling_ratios=(4, 3, 2),
                      sampling_rate=1200, kernel_size=5, last_kernel_size=3), id="zero-pad-2res"),
    pytest.param(dict(audio_channels=2), id="stereo-codec"),
])
def test_streamed_equals_offline_other_structures(overrides):
    codec = make_codec(1, **overrides)
    hop = codec.config.hop_length
    codes = torch.randint(0, 64, (1, 4, 23), generator=torch.Generator().manual_seed(5))
    for kind in ("one", "random"):
        streamed, _ = stream_decode(codec, codes, chunk_sizes(kind, 23, 3))
        assert streamed.shape == (1, codec.config.audio_channels, 23 * hop)
        torch.testing.assert_close(streamed, offline(codec, codes), atol=1e-5, rtol=0)


def test_exact_mode_holds_back_its_right_context(codec):
    """After m frames, exactly max(0, m * hop - 2402) samples are out, and they are final (causality)."""
    lookahead = decoder_lookahead_samples(codec.config)
    assert lookahead == 2402  # 3 frames for the kernel-7 first conv + 482 samples of the upsampling stack
    codes = torch.randint(0, 64, (1, 4, 20), generator=torch.Generator().manual_seed(1))
    other = torch.cat([codes[..., :12], torch.randint(0, 64, (1, 4, 8), generator=torch.Generator())], dim=-1)
    full, prefix_end = offline(codec, codes), offline(codec, codes[..., :12])
    state = init_decoder_state(codec)
    emitted = []
    for m in range(1, 13):
        emitted.append(decode_step(codec, state, codes[..., m - 1: m]))
        out = torch.cat(emitted, dim=-1)
        assert out.shape[-1] == max(0, m * HOP - lookahead)
        torch.testing.assert_close(out, full[..., : out.shape[-1]], atol=1e-5, rtol=0)
    # appending different frames never changes what was emitted; ending here gives the offline decode
    torch.testing.assert_close(out, offline(codec, other)[..., : out.shape[-1]], atol=1e-5, rtol=0)
    ended = torch.cat([out, flush(codec, state.clone())], dim=-1)
    torch.testing.assert_close(ended, prefix_end, atol=1e-5, rtol=0)


def test_clone_continues_independently(codec):
    codes = torch.randint(0, 64, (1, 4, 15), generator=torch.Generator().manual_seed(2))
    state = init_decoder_state(codec)
    head = decode_step(codec, state, codes[..., :7])
    twin, diverged = state.clone(), state.clone()
    decode_step(codec, diverged, torch.randint(0, 64, (1, 4, 5), generator=torch.Generator()))
    flush(codec, diverged)  # stepping and ending a clone leaves the original untouched
    tails = [torch.cat([decode_step(codec, s, codes[..., 7:]), flush(codec, s)], dim=-1) for s in (state, twin)]
    assert torch.equal(tails[0], tails[1])
    torch.testing.assert_close(torch.cat([head, tails[0]], dim=-1), offline(codec, codes), atol=1e-5, rtol=0)


def test_an_encoder_clone_continues_independently(codec):
    audio = 0.3 * torch.randn(1, 1, 4000, generator=torch.Generator().manual_seed(4))
    state = init_encoder_state(codec)
    head = encode_step(codec, state, audio[..., :1500])
    twin, diverged = state.clone(), state.clone()
    encode_step(codec, diverged, torch.randn(1, 1, 900))
    encode_flush(codec, diverged)
    tails = [torch.cat([encode_step(codec, s, audio[..., 1500:]), encode_flush(codec, s)], dim=-1)
             for s in (state, twin)]
    assert torch.equal(tails[0], tails[1])
    assert torch.equal(torch.cat([head, tails[0]], dim=-1), codec.encode(audio))


def completed_frames(frames: torch.Tensor, delays: list[int]):
    """Replay known frames through a delay grid column by column: yields (frame index, codes (codebooks,)) as
    each completes, as the session gets them from a decoder step."""
    total = frames.shape[1]
    layout = build_delayed(frames, delays, pad_id=64, total_frames=total)
    grid = DelayGrid.start(frames[:, :0], delays, 64, capacity=columns_for(total, delays), total_frames=total)
    while not grid.finished:
        grid.place(layout[:, grid.next_column])
        if grid.completed_frame() is not None:
            yield grid.completed_frame(), grid.frame(grid.completed_frame())


def test_stereo_from_the_delay_grid(codec):
    """Stereo LM columns (delays 0,0,1,1,2,2,3,3) -> whole frames -> even/odd codebooks as a batch of 2."""
    frames = torch.randint(0, 64, (8, 14), generator=torch.Generator().manual_seed(3))
    delays = [k // 2 for k in range(8)]
    state = init_decoder_state(codec, batch=2)
    pieces = [decode_step(codec, state, split_channels(codes[:, None], 2))
              for _, codes in completed_frames(frames, delays)]
    assert len(pieces) == 14
    streamed = torch.cat(pieces + [flush(codec, state)], dim=-1)[:, 0]  # (channels, samples)
    expected = torch.stack([offline(codec, frames[c::2][None])[0, 0] for c in range(2)])  # MusicGen.decode_audio
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lookahead", [0, 0.5, 1, 2, 3], ids=lambda k: f"lookahead{k}")
@pytest.mark.parametrize("kind", ["one", "random"])
def test_low_latency(codec, lookahead, kind):
    """Emits up to m * hop - lookahead; the provisional samples are the offline decode of the prefix received
    so far, the final ones the offline decode of everything; the state stays exact."""
    total = 25
    codes = torch.randint(0, 64, (1, 4, total), generator=torch.Generator().manual_seed(4))
    full = offline(codec, codes)
    trace: list = []
    streamed, state = stream_decode(codec, codes, chunk_sizes(kind, total, 7), lookahead, trace)
    held = round(lookahead * HOP)
    exact, _ = stream_decode(codec, codes, chunk_sizes(kind, total, 7))
    for received, (final_before, emitted_before), final_after, emitted_after in trace:
        assert emitted_after == max(emitted_before, final_after, received * HOP - held)
        assert final_after == max(0, received * HOP - 2402)
        exact_end = max(emitted_before, final_after)
        torch.testing.assert_close(streamed[..., emitted_before:exact_end], full[..., emitted_before:exact_end],
                                   atol=1e-5, rtol=0)
        if emitted_after > exact_end:
            prefix = offline(codec, codes[..., :received])
            torch.testing.assert_close(streamed[..., exact_end:emitted_after], prefix[..., exact_end:emitted_after],
                                       atol=1e-5, rtol=0)
    assert streamed.shape == full.shape and state.final_samples == total * HOP
    # nothing drifts: the samples emitted at flush are exact, and the error is confined to provisional ones
    last_emitted = trace[-1][3]
    torch.testing.assert_close(streamed[..., last_emitted:], full[..., last_emitted:], atol=1e-5, rtol=0)
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=0)
    snr = 10 * torch.log10(full.pow(2).sum() / (streamed - full).pow(2).sum())
    assert snr > 10  # bounded error (random weights; see BENCHMARKS.md for the musicgen-small shape)


def test_low_latency_error_shrinks_with_lookahead(codec):
    codes = torch.randint(0, 64, (1, 4, 40), generator=torch.Generator().manual_seed(6))
    full = offline(codec, codes)
    snrs = []
    for lookahead in (0, 1, 2, 3):
        streamed, _ = stream_decode(codec, codes, [1] * 40, lookahead)
        snrs.append(float(10 * torch.log10(full.pow(2).sum() / (streamed - full).pow(2).sum())))
    assert snrs == sorted(snrs), snrs


def test_lookahead_at_or_above_exact_need_is_exact(codec):
    assert init_decoder_state(codec, lookahead_frames=4).lookahead_samples is None
    assert init_decoder_state(codec, lookahead_frames=3.75).lookahead_samples == 2400  # < 2402: approximate
    assert init_decoder_state(codec, lookahead_frames=3.76).lookahead_samples is None  # 2407 samples
    with pytest.raises(ValueError):
        init_decoder_state(codec, lookahead_frames=-1)


# -- encoder --------------------------------------------------------------------------------------------------


def sample_chunks(kind: str, total: int, seed: int) -> list[int]:
    if kind == "all":
        return [total]
    if kind == "hop":
        return [HOP] * (total // HOP) + ([total % HOP] if total % HOP else [])
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < total:  # tiny pieces (down to 1 sample and empty) mixed with large ones
        sizes.append(min(rng.choice([0, 1, 2, 7, 100, 639, 641, 1500, 4000]), total - sum(sizes)))
    return sizes


# lengths that hit the short-signal path of pad1d in the strided convs and every extra-pad phase of the last one
ENCODER_LENGTHS = [1, 3, 5, 6, 10, 14, 21, 300, 640, 1281, 2240, 2560 + 320, 9000, 12800]


@pytest.mark.parametrize("samples", ENCODER_LENGTHS, ids=lambda n: f"{n}samples")
@pytest.mark.parametrize("kind", ["all", "hop", "random"])
def test_encoder_chunks_equal_whole(codec, samples, kind):
    """Codes, and the embeddings before quantization (which codes alone could hide), equal the whole-audio
    encoding; frames are handed out as soon as they are final."""
    audio = 0.3 * torch.randn(2, 1, samples, generator=torch.Generator().manual_seed(samples))
    state, layers = init_encoder_state(codec, batch=2), init_layer_states(codec.encoder.layers, batch=2)
    pieces, embedded, at = [], [], 0
    with torch.no_grad():
        for n in sample_chunks(kind, samples, samples):
            pieces.append(encode_step(codec, state, audio[..., at: at + n]))
            embedded.append(stream_layers_step(codec.encoder.layers, layers, audio[..., at: at + n]))
            at += n
            assert state.frames == encoder_final_frames(codec.config, at)
        pieces.append(encode_flush(codec, state))
        embedded.append(stream_layers_flush(codec.encoder.layers, layers))
        expected, expected_embeddings = codec.encode(audio), codec.encoder(audio)
    torch.testing.assert_close(torch.cat(embedded, dim=-1), expected_embeddings, atol=1e-5, rtol=0)
    codes = torch.cat(pieces, dim=-1)
    assert codes.shape == expected.shape == (2, 4, -(-samples // HOP))
    assert torch.equal(codes, expected)


def test_encoder_prefix_codes_are_final_only_up_to_the_lookahead(codec):
    """The codes of frame f are final once (f + 1) * hop + 2386 samples are in; the last frames of a prefix
    depend on where it ends (reflect pad at the end, extra pad to a whole frame) and differ from the whole's."""
    lookahead = encoder_lookahead_samples(codec.config)
    assert lookahead == 2386
    audio = 0.3 * torch.randn(1, 1, 30 * HOP, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        whole = codec.encode(audio)
        embeddings_whole = codec.encoder(audio)
    for cut in (10 * HOP, 10 * HOP + 333, 17 * HOP - 1):
        final = encoder_final_frames(codec.config, cut)
        assert final == (cut - lookahead) // HOP  # frame f is final once (f + 1) * hop + lookahead samples are in
        with torch.no_grad():
            embeddings_prefix = codec.encoder(audio[..., :cut])
            prefix = codec.encode(audio[..., :cut])
        torch.testing.assert_close(embeddings_prefix[..., :final], embeddings_whole[..., :final], atol=1e-5, rtol=0)
        assert torch.equal(prefix[..., :final], whole[..., :final])
        assert not torch.allclose(embeddings_prefix[..., final:], embeddings_whole[..., final: prefix.shape[-1]],
                                  atol=1e-3)


# -- latency --------------------------------------------------------------------------------------------------


def decoder_config(channels: int) -> DecoderConfig:
    return DecoderConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=128,
                         num_codebooks=4 * channels, max_position_embeddings=64, audio_channels=channels)


@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
@pytest.mark.parametrize("lookahead,held,exact", [
    pytest.param(None, 2402, True, id="exact"),
    pytest.param(0, 0, False, id="lookahead0"),
    pytest.param(1, 640, False, id="lookahead1"),
    pytest.param(2, 1280, False, id="lookahead2"),
    pytest.param(3, 1920, False, id="lookahead3"),
    pytest.param(4, 2402, True, id="lookahead4"),
])
def test_algorithmic_latency(channels, lookahead, held, exact):
    latency = algorithmic_latency(decoder_config(channels), EncodecConfig(), lookahead)
    assert latency.delay_steps == 3 and latency.codec_lookahead_samples == held and latency.exact == exact
    assert latency.samples == 3 * 640 + held
    assert latency.milliseconds == pytest.approx(1000 * (1920 + held) / 32000)
    if lookahead is None:
        assert (latency.samples, latency.milliseconds, latency.steps_to_frame_start) == (4322, 135.0625, 3)


def test_latency_matches_the_stream(codec):
    """After F LM steps the emitted audio ends exactly `latency.samples` before F * hop."""
    frames = torch.randint(0, 64, (4, 20), generator=torch.Generator().manual_seed(9))
    delays = [0, 1, 2, 3]
    for lookahead in (None, 0, 2):
        latency = algorithmic_latency(decoder_config(1), codec.config, lookahead)
        state = init_decoder_state(codec, 1, lookahead)
        layout = build_delayed(frames, delays, pad_id=64, total_frames=20)
        grid = DelayGrid.start(frames[:, :0], delays, 64, capacity=columns_for(20, delays), total_frames=20)
        for step in range(1, 21):
            grid.place(layout[:, step])
            if grid.completed_frame() is not None:
                decode_step(codec, state, grid.frame(grid.completed_frame())[None, :, None])
            assert state.emitted_samples == max(0, step * HOP - latency.samples)


# -- the musicgen-small codec shape ---------------------------------------------------------------------------


def test_musicgen_small_shape():
    codec = make_codec(0, num_filters=64, hidden_size=128, codebook_size=2048, codebook_dim=128,
                       target_bandwidths=(2.2,))
    assert decoder_lookahead_samples(codec.config) == 2402
    codes = torch.randint(0, 2048, (1, 4, 30), generator=torch.Generator().manual_seed(10))
    started = time.perf_counter()
    streamed, _ = stream_decode(codec, codes, chunk_sizes("random", 30, 11))
    assert time.perf_counter() - started < 20
    torch.testing.assert_close(streamed, offline(codec, codes), atol=1e-5, rtol=0)
