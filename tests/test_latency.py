"""Started.latency_samples is the true lag of the output path: measured through a real session, at every rate."""

from __future__ import annotations

import numpy as np
import pytest

from musicgen_core import MusicGen
from server.events import AudioChunk, SessionSpec, Started
from server.session import Limits, Session

RATES = [32000, 44100, 48000]


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint)


def measured_latency(model: MusicGen, output_rate: int, chunk_frames: int, lookahead: float | None,
                     steps: int = 240, audio_prompt: np.ndarray | None = None) -> tuple[Started, int]:
    """Run a session step by step; after each chunk, the lag is the audio the decoder has (partly) sampled,
    steps x samples per frame, minus the audio sent so far. Returns Started and the largest lag seen."""
    events, lags = [], []
    spec = SessionSpec(text="warm lofi beat", params=model.default_sampling(greedy=True), chunk_frames=chunk_frames,
                       output_rate=0 if output_rate == model.config.sampling_rate else output_rate,
                       lookahead_frames=lookahead, max_lead_seconds=None, audio_prompt=audio_prompt)

    def sink(event) -> None:
        events.append(event)
        if isinstance(event, AudioChunk):
            spf = events[0].samples_per_frame
            lags.append(session.stats.steps * spf - (event.start_sample + event.pcm.shape[1]))

    session = Session("latency", spec, model, Limits(context_frames=250, reprime_keep_frames=100), sink)
    session.begin()
    for _ in range(steps):
        (result,) = model.step([session.state])
        session.after_step(result, 0.0)
    assert len(lags) > steps // chunk_frames - 10, "the session sent too few chunks to measure"
    return events[0], max(lags)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("chunk_frames", [1, 5])
def test_reported_latency_equals_the_measured_lag(model, rate, chunk_frames):
    started, lag = measured_latency(model, rate, chunk_frames, lookahead=None)
    assert started.latency_samples == lag


@pytest.mark.parametrize("rate", [44100, 48000])
def test_low_latency_decoding_reports_the_resampler_too(model, rate):
    started, lag = measured_latency(model, rate, chunk_frames=2, lookahead=0.0, steps=200)
    assert started.latency_samples == lag
    assert started.latency_resampler_samples > 0  # soxr holds audio back: zero would under-report it


def test_resampler_part_is_zero_at_the_model_rate(model):
    started, _ = measured_latency(model, model.config.sampling_rate, chunk_frames=5, lookahead=None, steps=60)
    assert started.latency_resampler_samples == 0


@pytest.mark.parametrize("rate", RATES)
def test_latency_after_an_audio_prompt_is_measured_too(model, rate):
    prompt = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 32000 // 2)).astype(np.float32)
    started, lag = measured_latency(model, rate, chunk_frames=5, lookahead=None, steps=150, audio_prompt=prompt)
    assert started.latency_samples == lag
