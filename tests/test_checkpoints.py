"""Sanity tests of the checkpoint factory (tests/checkpoints.py) itself, with transformers as the reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from checkpoints import FRAME_SAMPLES, load_oracle, oracle_generate

PROMPTS = ["An upbeat jazz song with piano and drums, 120 bpm", "dark techno"]


def _keys(path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


@pytest.mark.parametrize("name", ["mono", "stereo", "weight_g", "proj"])
def test_single_file_layout(request, name):
    path = request.getfixturevalue(f"{name}_checkpoint")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "spiece.model",
    ]


def test_sharded_layout(sharded_checkpoint, mono_checkpoint):
    names = sorted(p.name for p in sharded_checkpoint.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 2
    assert all(n == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, n in enumerate(shards))
    assert names == ["config.json", "generation_config.json", *shards, "model.safetensors.index.json", "spiece.model"]
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(_keys(sharded_checkpoint)) == set(_keys(mono_checkpoint))


def test_configs(mono_checkpoint, stereo_checkpoint):
    config = json.loads((mono_checkpoint / "config.json").read_text())
    assert config["model_type"] == "musicgen"
    assert config["text_encoder"]["model_type"] == "t5"
    assert config["audio_encoder"]["model_type"] == "encodec"
    assert config["audio_encoder"]["upsampling_ratios"] == [8, 5, 4, 4]
    assert config["audio_encoder"]["audio_channels"] == 1
    assert config["decoder"]["num_codebooks"] == 4
    stereo = json.loads((stereo_checkpoint / "config.json").read_text())
    assert stereo["decoder"]["num_codebooks"] == 8 and stereo["decoder"]["audio_channels"] == 2
    assert stereo["audio_encoder"]["audio_channels"] == 1
    gen = json.loads((mono_checkpoint / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["guidance_scale"] == 3.0 and gen["max_length"] == 1500
    assert gen["pad_token_id"] == gen["bos_token_id"] == gen["decoder_start_token_id"] == 2048
    assert "top_k" not in gen


def test_weight_norm_names(mono_checkpoint, weight_g_checkpoint):
    fresh, published = _keys(mono_checkpoint), _keys(weight_g_checkpoint)
    assert not any(".weight_g" in k or ".weight_v" in k for k in fresh)
    assert not any("parametrizations" in k for k in published)
    g = sorted(k for k in published if k.endswith(".weight_g"))
    v = sorted(k for k in published if k.endswith(".weight_v"))
    assert len(g) == len(v) > 0
    assert "audio_encoder.decoder.layers.0.conv.weight_g" in published
    assert published["audio_encoder.decoder.layers.0.conv.weight_v"] == (
        fresh["audio_encoder.decoder.layers.0.conv.parametrizations.weight.original1"]
    )
    assert len(fresh) == len(published)


def test_weight_g_checkpoint_loads_in_transformers(mono_checkpoint, weight_g_checkpoint):
    a, _ = load_oracle(mono_checkpoint)
    b, _ = load_oracle(weight_g_checkpoint)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_enc_to_dec_proj(proj_checkpoint, mono_checkpoint):
    keys = _keys(proj_checkpoint)
    assert keys["enc_to_dec_proj.weight"] == (48, 32)
    assert keys["enc_to_dec_proj.bias"] == (48,)
    assert not any(k.startswith("enc_to_dec_proj") for k in _keys(mono_checkpoint))


def test_codebooks_are_random(mono_checkpoint):
    with safe_open(str(mono_checkpoint / "model.safetensors"), "pt") as st:
        for i in range(4):
            embed = st.get_tensor(f"audio_encoder.quantizer.layers.{i}.codebook.embed")
            assert embed.shape == (2048, 16)
            assert embed.std() > 0.5
            assert torch.equal(embed, st.get_tensor(f"audio_encoder.quantizer.layers.{i}.codebook.embed_avg"))
            assert torch.all(st.get_tensor(f"audio_encoder.quantizer.layers.{i}.codebook.cluster_size") == 1)


def test_tokenizer(mono_checkpoint):
    import sentencepiece as spm

    _, tok = load_oracle(mono_checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(mono_checkpoint / "spiece.model"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == sp.get_piece_size() + 100
    batch = tok(PROMPTS, padding=True)
    for text, ids, mask in zip(PROMPTS, batch["input_ids"], batch["attention_mask"]):
        ref = sp.encode(text) + [1]
        assert ids[: len(ref)] == ref
        assert ids[len(ref) :] == [0] * (len(ids) - len(ref))
        assert mask == [1] * len(ref) + [0] * (len(ids) - len(ref))


def test_transformers_generate_mono(mono_checkpoint):
    model, tok = load_oracle(mono_checkpoint)
    inputs = tok(PROMPTS[:1], return_tensors="pt")
    audio = model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=12)
    assert audio.shape == (1, 1, 9 * FRAME_SAMPLES)
    assert torch.isfinite(audio).all() and audio.abs().max() > 0


def test_codes_depend_on_codebooks_and_prompt(mono_checkpoint):
    model, tok = load_oracle(mono_checkpoint)
    codes, audio = oracle_generate(model, tok, PROMPTS, max_new_tokens=24)
    assert codes.shape == (2, 4, 21) and audio.shape == (2, 1, 21 * FRAME_SAMPLES)
    assert not torch.equal(codes[0], codes[1])  # the text conditions the LM
    other = codes.clone()
    other[:, 3] = (other[:, 3] + 1) % 2048
    changed = model.audio_encoder.decode(other[None], [None]).audio_values
    assert (changed - audio).abs().max() > 1e-3  # decoding does not ignore the codes


def test_fp32_and_fp64_greedy_codes_match(stereo_checkpoint):
    m32, tok = load_oracle(stereo_checkpoint)
    m64, _ = load_oracle(stereo_checkpoint, dtype=torch.float64)
    c32, a32 = oracle_generate(m32, tok, PROMPTS, max_new_tokens=20)
    c64, a64 = oracle_generate(m64, tok, PROMPTS, max_new_tokens=20)
    assert c32.shape == (2, 8, 17) and a32.shape == (2, 2, 17 * FRAME_SAMPLES)
    assert torch.equal(c32, c64)
    torch.testing.assert_close(a32.double(), a64, rtol=0, atol=1e-4)
