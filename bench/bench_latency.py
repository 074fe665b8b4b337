"""Algorithmic latency per output rate and chunk size, as Started reports it (the output path's lag measured
by AudioOut.output_lag_frames), on the demo model, whose 32 kHz codec has musicgen-small's geometry.

    python bench/bench_latency.py
"""

from __future__ import annotations

from musicgen_core import MusicGen
from musicgen_core.streaming_codec import algorithmic_latency
from server.session import AudioOut


def main() -> None:
    model = MusicGen.from_pretrained("demo")
    config = model.config
    for lookahead in (None, 0.0):
        latency = algorithmic_latency(config.decoder, config.audio_encoder, lookahead)
        for rate in (0, 44100, 48000):
            audio = AudioOut(model, lookahead, rate)
            for chunk in (1, 5, 10):
                path, send = audio.output_lag_frames(latency, chunk)
                samples = (latency.delay_steps + send) * audio.samples_per_frame
                print(f"lookahead={'exact' if lookahead is None else lookahead} rate={audio.output_rate} "
                      f"chunk={chunk} path_lag_frames={path} latency_samples={samples} "
                      f"ms={1000 * samples / audio.output_rate:.1f}")


if __name__ == "__main__":
    main()
