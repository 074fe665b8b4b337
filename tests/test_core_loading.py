"""Checkpoint loading: where files are found, what is accepted, and the errors for what is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from musicgen_core import CheckpointError, MusicGen
from musicgen_core.loading import resolve_checkpoint


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_tensors(directory: Path, change) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["config.json", "spiece.model", "model.safetensors"])
def test_missing_file_is_named(mono_checkpoint, tmp_path, name):
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    (directory / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        MusicGen.from_pretrained(directory)


def test_unknown_architecture_is_refused(mono_checkpoint, tmp_path):
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "musicgen_melody"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'musicgen_melody'"):
        MusicGen.from_pretrained(directory)


def test_shape_mismatch_names_the_tensor(mono_checkpoint, tmp_path):
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["decoder"]["ffn_dim"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.fc1\.weight.*shape"):
        MusicGen.from_pretrained(directory)


def test_unexpected_tensor_is_named(mono_checkpoint, tmp_path):
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    rewrite_tensors(directory, lambda t: t.__setitem__("decoder.model.decoder.layers.0.extra.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'decoder\.layers\.0\.extra\.weight'"):
        MusicGen.from_pretrained(directory)


def test_foreign_tensor_names_file_and_key(mono_checkpoint, tmp_path):
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    rewrite_tensors(directory, lambda t: t.__setitem__("vision_tower.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'vision_tower\.weight'"):
        MusicGen.from_pretrained(directory)


def test_missing_tensor_is_named(mono_checkpoint, tmp_path):
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    rewrite_tensors(directory, lambda t: t.pop("decoder.lm_heads.2.weight"))
    with pytest.raises(CheckpointError, match=r"'decoder\.lm_heads\.2\.weight' missing"):
        MusicGen.from_pretrained(directory)


def test_half_of_a_weight_norm_pair_is_named(weight_g_checkpoint, tmp_path):
    directory = copy_checkpoint(weight_g_checkpoint, tmp_path / "ckpt")
    key = next(k for k in load_file(str(directory / "model.safetensors")) if k.endswith(".weight_v"))
    rewrite_tensors(directory, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        MusicGen.from_pretrained(directory)


def test_invalid_json_is_named(mono_checkpoint, tmp_path):
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        MusicGen.from_pretrained(directory)


def test_hub_id_resolves_from_local_cache(mono_checkpoint, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--facebook--musicgen-small" / "snapshots" / "abc123"
    shutil.copytree(mono_checkpoint, snapshot)
    (tmp_path / "hub" / "models--facebook--musicgen-small" / "refs").mkdir()
    (tmp_path / "hub" / "models--facebook--musicgen-small" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint("facebook/musicgen-small") == snapshot
    assert MusicGen.from_pretrained("facebook/musicgen-small").config.decoder.num_codebooks == 4


def test_hub_id_resolves_under_hf_home(mono_checkpoint, tmp_path, monkeypatch):
    snapshot = tmp_path / "home" / "hub" / "models--facebook--musicgen-small" / "snapshots" / "rev"
    shutil.copytree(mono_checkpoint, snapshot)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_checkpoint("facebook/musicgen-small") == snapshot


def test_absent_hub_id_says_how_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as error:
        MusicGen.from_pretrained("facebook/musicgen-small")
    message = str(error.value)
    assert "never downloads" in message and "download facebook/musicgen-small" in message
    assert str(tmp_path / "empty") in message


def test_nonexistent_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        MusicGen.from_pretrained(tmp_path / "nowhere")


def test_bfloat16_load_generates(mono_checkpoint):
    model = MusicGen.from_pretrained(mono_checkpoint, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    out = model.generate("warm lofi beat", frames=5, params=model.default_sampling(greedy=True))
    assert out.codes.shape == (1, 4, 5) and torch.isfinite(out.audio).all()


def test_generation_defaults_come_from_generation_config(mono_checkpoint, tmp_path):
    model = MusicGen.from_pretrained(mono_checkpoint)
    params = model.default_sampling()
    assert (params.greedy, params.guidance_scale, params.top_k, params.top_p) == (False, 3.0, 50, 1.0)
    directory = copy_checkpoint(mono_checkpoint, tmp_path / "ckpt")
    generation = json.loads((directory / "generation_config.json").read_text())
    generation.update(top_k=250, temperature=0.8)
    (directory / "generation_config.json").write_text(json.dumps(generation))
    params = MusicGen.from_pretrained(directory).default_sampling()
    assert (params.top_k, params.temperature) == (250, 0.8)


def test_demo_model_builds_in_the_published_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGEN_DEMO_DIR", str(tmp_path / "demo"))
    model = MusicGen.from_pretrained("demo")
    directory = next((tmp_path / "demo").iterdir())
    assert {p.name for p in directory.iterdir()} == {"config.json", "generation_config.json",
                                                      "model.safetensors", "spiece.model"}
    assert any(k.endswith(".weight_g") for k in load_file(str(directory / "model.safetensors")))
    out = model.generate("warm lofi beat", frames=10)
    assert out.audio.shape == (1, 1, 10 * 640)
