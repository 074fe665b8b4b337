"""musicgen_core reproduces transformers on the same weights: tokens, hidden states, logits, codes, audio."""

from __future__ import annotations

import pytest
import torch

from checkpoints import load_oracle, oracle_generate
from musicgen_core import MusicGen
from musicgen_core.delay import build_delayed

TEXTS = ["warm lofi beat with piano and soft drums", "dark techno", "ambient pad"]
AUDIO_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def mono(mono_checkpoint):
    oracle, tokenizer = load_oracle(mono_checkpoint)
    return MusicGen.from_pretrained(mono_checkpoint), oracle, tokenizer


def greedy(model: MusicGen, **overrides):
    return model.default_sampling(greedy=True, guidance_scale=3.0, **overrides)


@pytest.mark.parametrize("text", [
    "warm lofi beat", "  leading and  double   spaces ", "Punctuation, CAPS & digits 1984!", "café naïve ünïcode",
    "x", "",
], ids=["plain", "spaces", "punctuation", "unicode", "single", "empty"])
def test_tokenizer_matches_t5_tokenizer(mono, text):
    model, _, tokenizer = mono
    assert model.tokenizer.encode(text) == tokenizer(text).input_ids


def test_tokenizer_pads_batches_like_t5_tokenizer(mono):
    model, _, tokenizer = mono
    reference = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ours = model.tokenizer.batch(TEXTS)
    assert torch.equal(ours.input_ids, reference.input_ids)
    assert torch.equal(ours.attention_mask, reference.attention_mask)


def test_text_encoder_hidden_states_match(mono):
    model, oracle, tokenizer = mono
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = oracle.text_encoder(**batch).last_hidden_state
        ours = model.modules.text_encoder(batch.input_ids, batch.attention_mask)
    mask = batch.attention_mask.bool()
    assert (ours[mask] - reference[mask]).abs().max() < 1e-5


def teacher_forced_inputs(model: MusicGen, frames: int, seed: int = 0) -> torch.Tensor:
    """Random codes laid out in the delay pattern, as the decoder reads them: (codebooks, columns)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config.decoder
    codes = torch.randint(0, config.vocab_size, (config.num_codebooks, frames), generator=generator)
    return build_delayed(codes, config.delays, config.pad_token_id, total_frames=frames)


def oracle_logits(oracle, tokenizer, text: str, columns: torch.Tensor) -> torch.Tensor:
    """transformers' conditional logits for every column: (codebooks, columns, vocab)."""
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = oracle(**batch, decoder_input_ids=columns)
    return out.logits


def test_decoder_logits_match_teacher_forced_whole_sequence(mono):
    model, oracle, tokenizer = mono
    columns = teacher_forced_inputs(model, frames=20)
    reference = oracle_logits(oracle, tokenizer, TEXTS[0], columns)
    conditioning = model.encode_text([TEXTS[0]])[0]
    state = model.start_sequence(conditioning, model.default_sampling(guidance_scale=1.0), total_frames=20)
    with torch.inference_mode():
        ours = model.decoder([columns], [state.cache], [state.cross], last_only=False)[0][0]
    assert (ours - reference).abs().max() < 1e-4


def test_decoder_logits_match_teacher_forced_step_by_step(mono):
    """The KV-cached one-column steps give the logits of the whole-sequence forward."""
    model, oracle, tokenizer = mono
    columns = teacher_forced_inputs(model, frames=20, seed=1)
    reference = oracle_logits(oracle, tokenizer, TEXTS[1], columns)
    state = model.start_sequence(model.encode_text([TEXTS[1]])[0], model.default_sampling(guidance_scale=1.0),
                                 total_frames=20)
    steps = []
    with torch.inference_mode():
        for column in range(columns.shape[1]):
            steps.append(model.decoder([columns[:, column: column + 1]], [state.cache], [state.cross])[0][0])
    ours = torch.cat(steps, dim=1)
    worst = (ours - reference).abs().max().item()
    assert worst < 1e-4, worst


@pytest.mark.parametrize("fixture", ["mono_checkpoint", "stereo_checkpoint", "weight_g_checkpoint",
                                     "proj_checkpoint", "sharded_checkpoint", "wide_ffn_checkpoint"],
                         ids=["mono", "stereo", "weight_g_names", "enc_to_dec_proj", "sharded",
                              "wide_ffn_cpp_float_step"])
def test_greedy_generation_with_guidance_matches_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    oracle, tokenizer = load_oracle(path)
    reference_codes, reference_audio = oracle_generate(oracle, tokenizer, TEXTS, max_new_tokens=24)
    model = MusicGen.from_pretrained(path)
    out = model.generate(TEXTS, frames=reference_codes.shape[-1], params=greedy(model))
    assert torch.equal(out.codes, reference_codes)
    assert out.audio.shape == reference_audio.shape
    assert (out.audio - reference_audio).abs().max() < AUDIO_TOLERANCE


def test_unconditional_generation_matches_transformers(mono):
    model, oracle, _ = mono
    with torch.no_grad():
        inputs = oracle.get_unconditional_inputs(num_samples=1)
        inputs = {"encoder_outputs": inputs.encoder_outputs, "attention_mask": inputs.attention_mask}
        captured = []
        original = oracle.audio_encoder.decode
        oracle.audio_encoder.decode = lambda codes, *a, **k: captured.append(codes) or original(codes, *a, **k)
        try:
            oracle.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=20)
        finally:
            del oracle.audio_encoder.decode
    out = model.generate(None, frames=17, params=greedy(model))
    assert torch.equal(out.codes, captured[0][0])


def test_batched_prompts_of_different_lengths_equal_each_alone(mono):
    model, _, _ = mono
    batched = model.generate(TEXTS, frames=15, params=greedy(model))
    for row, text in enumerate(TEXTS):
        alone = model.generate([text], frames=15, params=greedy(model))
        assert torch.equal(batched.codes[row], alone.codes[0])
        assert (batched.audio[row] - alone.audio[0]).abs().max() < 1e-5


@pytest.mark.parametrize("fixture", ["mono_checkpoint", "stereo_checkpoint"], ids=["mono", "stereo"])
def test_audio_prompt_continuation_matches_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    oracle, tokenizer = load_oracle(path)
    model = MusicGen.from_pretrained(path)
    channels = model.config.audio_channels
    audio = 0.3 * torch.randn(1, channels, 640 * 9 + 123, generator=torch.Generator().manual_seed(7))
    reference_codes, reference_audio = oracle_generate(oracle, tokenizer, TEXTS[:1], max_new_tokens=16,
                                                       input_values=audio)
    prompt_frames = 10  # ceil(5883 / 640)
    out = model.generate(TEXTS[:1], frames=reference_codes.shape[-1] - prompt_frames, audio_prompt=audio[0],
                         params=greedy(model))
    assert torch.equal(out.prompt_codes, reference_codes[..., :prompt_frames])
    assert torch.equal(out.codes, reference_codes[..., prompt_frames:])
    assert (out.audio - reference_audio).abs().max() < AUDIO_TOLERANCE


def test_encodec_encode_codes_identical_and_decode_close(mono):
    model, oracle, _ = mono
    audio = 0.5 * torch.randn(2, 1, 32000 // 4 + 77, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = oracle.audio_encoder.encode(audio).audio_codes[0]
        ours = model.codec.encode(audio)
        assert torch.equal(ours, reference)
        reference_audio = oracle.audio_encoder.decode(reference[None], [None]).audio_values
        ours_audio = model.codec.decode(ours)
    assert (ours_audio - reference_audio).abs().max() < AUDIO_TOLERANCE


@pytest.mark.parametrize("causal,trim,pad_mode", [(True, 1.0, "reflect"), (True, 0.5, "constant"),
                                                   (False, 1.0, "constant")],
                         ids=["causal", "causal_trim_half_constant_pad", "noncausal_constant_pad"])
def test_encodec_honours_causal_flag_pad_mode_and_trim_ratio(tmp_path, causal, trim, pad_mode):
    from safetensors.torch import save_file
    from transformers import EncodecConfig as HFEncodecConfig
    from transformers import EncodecModel

    from musicgen_core.config import EncodecConfig
    from musicgen_core.encodec import Encodec
    from musicgen_core.loading import read_state_dict

    raw = dict(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], num_filters=4, hidden_size=16,
               codebook_size=64, target_bandwidths=[2.2], use_causal_conv=causal, trim_right_ratio=trim,
               pad_mode=pad_mode, use_conv_shortcut=False, num_lstm_layers=2)
    torch.manual_seed(0)
    oracle = EncodecModel(HFEncodecConfig(**raw)).eval()
    for layer in oracle.quantizer.layers:
        layer.codebook.embed.normal_()
    save_file({f"audio_encoder.{k}": v.contiguous() for k, v in oracle.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    ours = Encodec(EncodecConfig.from_dict(raw))
    state = {k[len("audio_encoder."):]: v for k, v in read_state_dict(tmp_path, torch.float32).items()}
    ours.load_state_dict(state)
    audio = 0.5 * torch.randn(1, 1, 640 * 5 + 99, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = oracle.encode(audio).audio_codes[0]
        assert torch.equal(ours.encode(audio), codes)
        reference = oracle.decode(codes[None], [None]).audio_values
        assert (ours.decode(codes) - reference).abs().max() < AUDIO_TOLERANCE
