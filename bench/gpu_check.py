"""GPU check (run on a lent CUDA machine): eager vs CUDA-graph decoder steps, fp32 and bf16, against
transformers on the same GPU, plus the concurrent-session sweep and time to first audio.

    python bench/make_checkpoint.py --shape small --out /tmp/mg-small
    python bench/gpu_check.py --model /tmp/mg-small --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PROMPT, time_to_first_audio, transformers_step_times  # noqa: E402

from musicgen_core import MusicGen  # noqa: E402


def step_ms(model: MusicGen, steps: int, sessions: int = 1) -> float:
    params = model.default_sampling(greedy=True, guidance_scale=3.0)
    conditioning = model.encode_text([PROMPT])[0]
    states = [model.start_sequence(conditioning, params, total_frames=steps + 16) for _ in range(sessions)]
    for _ in range(3):  # prefill, then two steps so a graph is captured
        model.step(states)
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.step(states)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="gpu.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    variants = {"fp32_eager": dict(dtype=torch.float32, cuda_graphs=False),
                "fp32_graphs": dict(dtype=torch.float32, cuda_graphs=True),
                "bf16_eager": dict(dtype=torch.bfloat16, cuda_graphs=False),
                "bf16_graphs": dict(dtype=torch.bfloat16, cuda_graphs=True)}
    codes = {}
    for name, options in variants.items():
        model = MusicGen.from_pretrained(args.model, device="cuda", **options)
        result[f"{name}_ms_per_step"] = round(step_ms(model, args.steps), 3)
        out = model.generate(PROMPT, frames=60, params=model.default_sampling(greedy=True))
        codes[name] = out.codes.cpu()
        if name == "bf16_graphs":
            result["sessions"] = {n: round(step_ms(model, 50, sessions=n), 3) for n in (1, 4, 8, 16, 32)}
            first_audio = time_to_first_audio(model)
            result["time_to_first_audio_ms_cold"] = round(1000 * first_audio[0], 1)
            result["time_to_first_audio_ms"] = round(1000 * statistics.median(first_audio[1:]), 1)
        if name == "bf16_eager":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step_ms(model, 5)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
        print(name, result[f"{name}_ms_per_step"], flush=True)
        del model
        torch.cuda.empty_cache()
    result["graphs_equal_eager_fp32_codes"] = bool(torch.equal(codes["fp32_eager"], codes["fp32_graphs"]))
    result["graphs_equal_eager_bf16_codes"] = bool(torch.equal(codes["bf16_eager"], codes["bf16_graphs"]))
    try:
        from transformers import AutoTokenizer, MusicgenForConditionalGeneration
        oracle = MusicgenForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).cuda().eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)

        class OnDevice:  # move the tokenizer's tensors to the GPU
            def __call__(self, *a, **k):
                return {key: value.cuda() for key, value in tokenizer(*a, **k).items()}
        times = transformers_step_times(oracle, OnDevice(), args.steps)
        result["transformers_fp32_ms_per_step"] = round(1000 * statistics.median(times), 3)
        import transformers
        result["transformers"] = transformers.__version__
    except Exception as error:  # report, do not lose the other figures
        result["transformers_error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
