"""`musicgen-generate` run as a real process: WAV, codes and the stats line."""

from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np
import pytest

from checkpoints import load_oracle, oracle_generate
from musicgen_cli import wav

PROMPT = "warm lofi beat with piano"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musicgen_cli.generate", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def stats(stderr: str) -> dict[str, str]:
    line = [line for line in stderr.splitlines() if line.startswith("frames=")][-1]
    return dict(item.split("=", 1) for item in line.split())


@pytest.mark.parametrize("fixture", ["mono_checkpoint", "stereo_checkpoint"], ids=["mono", "stereo"])
def test_greedy_cli_writes_transformers_codes_and_a_16_bit_wav(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    oracle, tokenizer = load_oracle(path)
    codes, audio = oracle_generate(oracle, tokenizer, [PROMPT], max_new_tokens=23)
    result = run_cli("--model", str(path), "--prompt", PROMPT, "--frames", "20", "--greedy",
                     "--guidance-scale", "3", "--out", str(tmp_path / "out.wav"),
                     "--codes-out", str(tmp_path / "codes.npy"))
    assert result.returncode == 0, result.stderr
    written = np.load(tmp_path / "codes.npy")
    assert written.dtype == np.int64 and written.shape == tuple(codes.shape[1:])
    assert np.array_equal(written, codes[0].numpy())
    with wave.open(str(tmp_path / "out.wav")) as handle:
        assert (handle.getsampwidth(), handle.getframerate()) == (2, 32000)
        assert handle.getnchannels() == audio.shape[1] and handle.getnframes() == 20 * 640
    pcm, _ = wav.read(tmp_path / "out.wav")
    assert np.abs(pcm - np.clip(audio[0].numpy(), -1, 1)).max() <= 1.0 / 32767 + 1e-6
    reported = stats(result.stderr)
    assert reported["frames"] == "20" and reported["steps"] == "23"
    for key in ("ms_per_step", "load_s", "wall_s"):
        assert float(reported[key]) > 0


def test_cli_continues_an_audio_prompt_and_excludes_it_from_codes(mono_checkpoint, tmp_path):
    prompt = 0.3 * np.random.default_rng(0).standard_normal((1, 640 * 6)).astype(np.float32)
    wav.write(tmp_path / "in.wav", prompt, 32000)
    result = run_cli("--model", str(mono_checkpoint), "--prompt", PROMPT, "--frames", "8", "--greedy",
                     "--audio-prompt", str(tmp_path / "in.wav"), "--out", str(tmp_path / "out.wav"),
                     "--codes-out", str(tmp_path / "codes.npy"))
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "codes.npy").shape == (4, 8)
    with wave.open(str(tmp_path / "out.wav")) as handle:
        assert handle.getnframes() == (6 + 8) * 640  # the prompt is heard first, then the continuation


def test_cli_seed_reproduces(mono_checkpoint, tmp_path):
    for name in ("a", "b"):
        result = run_cli("--model", str(mono_checkpoint), "--prompt", PROMPT, "--frames", "10", "--seed", "4",
                         "--top-k", "20", "--temperature", "0.9", "--out", str(tmp_path / f"{name}.wav"),
                         "--codes-out", str(tmp_path / f"{name}.npy"))
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_cli_demo_model_runs_and_says_it_is_noise(tmp_path):
    import os
    env = {**os.environ, "MUSICGEN_DEMO_DIR": str(tmp_path / "demo")}
    result = run_cli("--model", "demo", "--prompt", "warm lofi beat", "--duration", "0.5",
                     "--out", str(tmp_path / "demo.wav"), env=env)
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr and "noise" in result.stderr
    assert stats(result.stderr)["frames"] == "25"


@pytest.mark.parametrize("args,message", [
    (["--frames", "0"], "frames must be >= 1"),
    (["--frames", "100000"], "window"),
    (["--temperature", "0"], "temperature"),
    (["--top-p", "2"], "top_p"),
], ids=["zero_frames", "past_window", "temperature", "top_p"])
def test_cli_bad_input_exits_2_with_the_reason(mono_checkpoint, tmp_path, args, message):
    result = run_cli("--model", str(mono_checkpoint), "--prompt", PROMPT, *args, "--out", str(tmp_path / "x.wav"))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "x.wav").exists()


def test_cli_missing_checkpoint_exits_2(tmp_path):
    result = run_cli("--model", str(tmp_path / "absent"), "--out", str(tmp_path / "x.wav"))
    assert result.returncode == 2 and "not a checkpoint directory" in result.stderr


def test_cli_int8_with_an_explicit_cache_dtype_equals_the_core_api(mono_checkpoint, tmp_path):
    import torch

    from musicgen_core import MusicGen

    result = run_cli("--model", str(mono_checkpoint), "--prompt", PROMPT, "--frames", "8", "--greedy",
                     "--quantize", "int8", "--kv-dtype", "float32", "--out", str(tmp_path / "a.wav"),
                     "--codes-out", str(tmp_path / "a.npy"))
    assert result.returncode == 0, result.stderr
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8", kv_dtype=torch.float32)
    expected = model.generate(PROMPT, frames=8, params=model.default_sampling(greedy=True)).codes[0]
    assert np.array_equal(np.load(tmp_path / "a.npy"), expected.numpy())
