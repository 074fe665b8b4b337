"""A/B comparisons behind BENCHMARKS.md's "what changed" table, each alternating its two sides in blocks within
one process (or, for threads, in fresh processes) so both see the same machine state.

    python bench/bench_ab.py kernel   --model /tmp/mg-small   # our int8 kernel vs fbgemm
    python bench/bench_ab.py gelu     --model /tmp/mg-small   # GELU inside fc1's kernel vs F.gelu after it
    python bench/bench_ab.py layers   --model /tmp/mg-small   # the C++ one-column layers vs the Python ones
    python bench/bench_ab.py threads  --model /tmp/mg-small   # which thread loads the model vs which steps it
    python bench/bench_ab.py attention                          # SDPA over an fp32 vs a bf16 cache
    python bench/bench_ab.py int8pack                           # aten's weight-only int8 matmul vs the others
    python bench/bench_ab.py t5       --model /tmp/mg-small   # the text encoder with fp32 vs bf16 weights
    python bench/bench_ab.py cross    --model /tmp/mg-small   # cross-attention K/V: zero row skipped vs projected
    python bench/bench_ab.py stream                             # read bandwidth: sum, fbgemm, ours, fresh weights
    python bench/bench_ab.py prefill  --model /tmp/mg-small   # audio-prompt prefill per frame: ours vs fbgemm
    python bench/bench_ab.py zerofill --model /tmp/mg-small   # a 10 s session's KV cache: zeroed vs not
    python bench/bench_ab.py profile  --model /tmp/mg-small   # where an int8 step's time goes (Python layers)
    python bench/bench_ab.py pool     --model /tmp/mg-small   # int8 on the elastic pool vs OpenMP's shares, idle
    python bench/bench_ab.py int4     --model /tmp/mg-small   # int8 vs int4 (each group size) steps, by context
    python bench/bench_ab.py ttfa     --model /tmp/mg-small   # time to first audio through the engine: int8 vs int4
    python bench/bench_ab.py f32      --model /tmp/mg-small   # a float32 step per linear form, and its floor
    python bench/bench_ab.py prompts  --model /tmp/mg-small   # a step with 1-4 weighted prompts (int8, int4)
    python bench/bench_ab.py codec    --model /tmp/mg-small   # the streaming codec alone, between steps, offline
    python bench/bench_ab.py linears                            # each weight format's linears against a read
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from server.engine import call_in_fresh_thread as fresh


def step_ms(model, steps: int = 25) -> float:
    conditioning = model.encode_text(["warm lofi beat"])[0]
    states = [model.start_sequence(conditioning, model.default_sampling(greedy=True, guidance_scale=3.0),
                                   total_frames=steps + 10)]
    model.step(states)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.step(states)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def alternate(sides: dict, blocks: int) -> None:
    """sides: name -> (model, prepare callable). Prints each side's per-block medians and their median."""
    results = {name: [] for name in sides}
    for _ in range(blocks):
        for name, (model, prepare) in sides.items():
            prepare()
            results[name].append(step_ms(model))
    for name, values in results.items():
        print(f"{name:12s} median {statistics.median(values):6.1f} ms/step  blocks {[round(v, 1) for v in values]}")


def kernel(args) -> None:
    from musicgen_core import MusicGen
    ours = MusicGen.from_pretrained(args.model, quantize="int8", kv_dtype=torch.float32)
    fbgemm = MusicGen.from_pretrained(args.model, quantize="int8-fbgemm", kv_dtype=torch.float32)
    alternate({"int8 (ours)": (ours, lambda: None), "int8-fbgemm": (fbgemm, lambda: None)}, args.blocks)


def gelu(args) -> None:
    from musicgen_core import MusicGen
    from musicgen_core.int8_kernel import Int8Linear, load_int8_kernel
    from musicgen_core.quantize import build_layer_steps
    model = MusicGen.from_pretrained(args.model, quantize="int8")
    fc1 = [m for m in model.decoder.modules() if isinstance(m, Int8Linear) and m.applies_gelu]

    def use(fused: bool):
        def prepare():
            for layer in fc1:
                layer.applies_gelu = fused
            build_layer_steps(model.decoder, load_int8_kernel())  # the C++ layers hold the flags
        return prepare

    alternate({"in kernel": (model, use(True)), "F.gelu": (model, use(False))}, args.blocks)


def layers(args) -> None:
    from musicgen_core import MusicGen
    model = MusicGen.from_pretrained(args.model, quantize="int8")
    fused = model.decoder.layer_steps

    def use(steps):
        return lambda: setattr(model.decoder, "layer_steps", steps)

    alternate({"C++ layers": (model, use(fused)), "Python": (model, use(None))}, args.blocks)


THREAD_PROBE = """
import sys, threading
from musicgen_core import MusicGen
sys.path.insert(0, 'bench')
from bench_ab import step_ms
loader, stepper = sys.argv[1], sys.argv[2]
box = {}
def on(where, work):
    if where == 'main':
        work()
    else:
        thread = threading.Thread(target=work); thread.start(); thread.join()
on(loader, lambda: box.update(model=MusicGen.from_pretrained(sys.argv[3], quantize='int8')))
on(stepper, lambda: box.update(ms=step_ms(box['model'], 60)))
print(round(box['ms'], 1))
"""


def threads(args) -> None:
    """Each pairing in a fresh process: load on the main thread or on a thread that ends; step likewise."""
    pairings = [("main", "main"), ("main", "thread"), ("thread", "thread")]
    results = {pairing: [] for pairing in pairings}
    for _ in range(args.blocks):
        for loader, stepper in pairings:
            out = subprocess.run([sys.executable, "-c", THREAD_PROBE, loader, stepper, args.model],
                                 capture_output=True, text=True, check=True)
            results[(loader, stepper)].append(float(out.stdout.strip().splitlines()[-1]))
    for (loader, stepper), values in results.items():
        print(f"load on {loader:6s} step on {stepper:6s}  median {statistics.median(values):6.1f} ms/step  {values}")


def attention(args) -> None:
    query = torch.randn(2, 16, 1, 64)
    for length in (80, 500, 1400):
        for dtype in (torch.float32, torch.bfloat16):
            keys = [torch.randn(2, 16, length, 64).to(dtype) for _ in range(24)]
            values = [torch.randn(2, 16, length, 64).to(dtype) for _ in range(24)]
            q = query.to(dtype)

            def step():
                for k, v in zip(keys, values):
                    F.scaled_dot_product_attention(q, k, v)

            step()
            best = min(_timed(step) for _ in range(5))
            print(f"{length:5d} positions {str(dtype):15s} {1000 * best:6.2f} ms for 24 layers")


def int8pack(args) -> None:
    """One 4096x1024 layer at 2 rows (weights cached): fp32 F.linear, fbgemm, ours, aten's weight-only int8."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    from musicgen_core.int8_kernel import Int8Linear, load_int8_kernel, quantize_weight

    weight, x = torch.randn(4096, 1024) * 0.02, torch.randn(2, 1024)
    plain = torch.nn.Linear(1024, 4096, bias=False)
    plain.weight.data = weight
    plain.qconfig = default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fbgemm = DynamicInt8Linear.from_float(plain)
    values, scale = quantize_weight(weight)
    forms = {"fp32 F.linear": lambda: F.linear(x, weight), "fbgemm dynamic int8": lambda: fbgemm(x),
             "aten _weight_int8pack_mm fp32": lambda: torch._weight_int8pack_mm(x, values, scale),
             "aten _weight_int8pack_mm bf16": lambda: torch._weight_int8pack_mm(x.bfloat16(), values,
                                                                                 scale.bfloat16())}
    kernel = load_int8_kernel()
    if kernel is not None:
        ours = Int8Linear(weight, kernel)
        forms["ours (VNNI)"] = lambda: ours(x)
    exact = F.linear(x, weight)
    for name, form in forms.items():
        error = ((form().float() - exact).norm() / exact.norm()).item()
        best = min(_timed(lambda: [form() for _ in range(50)]) for _ in range(5)) / 50
        print(f"{name:32s} {1e6 * best:8.1f} us   {100 * error:5.2f}% off fp32")


def t5(args) -> None:
    from musicgen_core import MusicGen
    model = MusicGen.from_pretrained(args.model)
    prompt = ["warm lofi beat with soft piano"]
    with torch.inference_mode():
        exact = model.encode_text(prompt)[0].hidden
        fp32 = statistics.median(_timed(lambda: model.encode_text(prompt)) for _ in range(8))
        for module in model.modules.text_encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.bfloat16()
        original = torch.nn.Linear.forward
        torch.nn.Linear.forward = lambda self, x: F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        try:
            approx = model.encode_text(prompt)[0].hidden
            bf16 = statistics.median(_timed(lambda: model.encode_text(prompt)) for _ in range(8))
        finally:
            torch.nn.Linear.forward = original
    error = ((approx - exact).norm() / exact.norm()).item()
    print(f"text encoder: fp32 {1000 * fp32:.1f} ms, bf16 weights {1000 * bf16:.1f} ms, hidden states {100 * error:.2f}% off")


def cross(args) -> None:
    """Cross-attention keys/values for a guided prompt ([text, zeros]: the zero row is skipped) against the same
    number of rows all projected ([text, text])."""
    from musicgen_core import MusicGen
    for scheme in ("int8", None):
        model = MusicGen.from_pretrained(args.model, quantize=scheme)
        hidden = model.encode_text(["warm lofi beat with soft piano"])[0].hidden
        mask = torch.ones(2, hidden.shape[0], dtype=torch.long)
        with torch.inference_mode():
            for name, rows in (("zero row skipped", torch.stack([hidden, torch.zeros_like(hidden)])),
                               ("both rows projected", torch.stack([hidden, hidden]))):
                model.decoder.cross_attention_kv(rows, mask)
                seconds = statistics.median(_timed(lambda: model.decoder.cross_attention_kv(rows, mask))
                                            for _ in range(10))
                print(f"{scheme or 'fp32':5s} {name:20s} {1000 * seconds:6.1f} ms")


def stream(args) -> None:
    """GB/s reading ~300 MB of distinct weights once per pass (so they come from DRAM, as in a decoder step)."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    from musicgen_core.int8_kernel import Int8Linear, load_int8_kernel

    tensors = [torch.ones(1 << 20) for _ in range(300 // 4)]  # 4 MB each
    passes = [_timed(lambda: [t.sum() for t in tensors]) for _ in range(3)]
    print(f"fp32 tensor.sum            {0.3 / min(passes):5.1f} GB/s")
    kernel = load_int8_kernel()
    for out_features, in_features in ((4096, 1024), (1024, 4096), (1024, 1024), (3072, 1024)):
        count = 300_000_000 // (out_features * in_features)
        weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(count)]
        x = torch.randn(2, 1, in_features)
        layers = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fbgemm = []
            for weight in weights:
                plain = torch.nn.Linear(in_features, out_features, bias=False)
                plain.weight.data = weight
                plain.qconfig = default_dynamic_qconfig
                fbgemm.append(DynamicInt8Linear.from_float(plain))
            layers["fbgemm"] = fbgemm
        if kernel is not None:
            layers["ours"] = [Int8Linear(weight, kernel) for weight in weights]
        del weights
        line = []
        for name, group in layers.items():
            best = min(_timed(lambda: [layer(x) for layer in group]) for _ in range(3))
            line.append(f"{name} {count * out_features * in_features / best / 1e9:5.1f} GB/s")
        print(f"{out_features}x{in_features} int8, 2 rows: " + ", ".join(line))


def prefill(args) -> None:
    from musicgen_core import MusicGen
    for scheme in ("int8", "int8-fbgemm"):
        model = MusicGen.from_pretrained(args.model, quantize=scheme)
        conditioning = model.encode_text(["warm lofi beat"])[0]
        params = model.default_sampling(greedy=True, guidance_scale=3.0)
        for frames in (50, 200, 600):
            context = torch.randint(0, model.config.decoder.vocab_size, (model.config.decoder.num_codebooks, frames))
            states = [model.start_sequence(conditioning, params, context, total_frames=frames + 10)]
            seconds = _timed(lambda: model.step(states))
            print(f"{scheme:12s} prefill of {frames:4d} frames: {1000 * seconds:7.0f} ms ({1000 * seconds / frames:.1f} ms/frame)")
        del model


def pool(args) -> None:
    """The int8 kernel and C++ layers on the elastic pool vs OpenMP's fixed shares (kernel.set_parallel), on an
    idle machine: a step at --context frames of KV cache, and a prefill of that many frames (a re-prime)."""
    from musicgen_core import MusicGen
    from musicgen_core.int8_kernel import loaded_int8_kernel
    from musicgen_core.threads import KERNEL_SPIN_US
    model = MusicGen.from_pretrained(args.model, quantize="int8")
    kernel = loaded_int8_kernel()
    conditioning = model.encode_text(["warm lofi beat"])[0]
    params = model.default_sampling(greedy=True, guidance_scale=3.0)
    context = torch.randint(0, model.config.decoder.vocab_size, (model.config.decoder.num_codebooks, args.context))
    states = [model.start_sequence(conditioning, params, context, total_frames=args.context + 16 * args.blocks + 8)]
    model.step(states)
    sides = {"pool": False, "openmp": True}
    steps, prefills = {name: [] for name in sides}, {name: [] for name in sides}
    for _ in range(args.blocks):
        for name, use_openmp in sides.items():
            kernel.set_parallel(torch.get_num_threads(), KERNEL_SPIN_US, use_openmp)
            # OpenMP's team spins on after its regions, and the pool takes a helper preempted by it for a
            # neighbour (contended for 1 s): let both settle, so neither side pays for the other
            time.sleep(1.2)
            model.step(states)
            times = [_timed(lambda: model.step(states)) for _ in range(7)]
            steps[name].append(1000 * statistics.median(times))
            fresh_states = [model.start_sequence(conditioning, params, context, total_frames=args.context + 2)]
            prefills[name].append(_timed(lambda: model.step(fresh_states)))
    kernel.set_parallel(torch.get_num_threads(), KERNEL_SPIN_US, False)
    for name in sides:
        print(f"{name:8s} step at {args.context} frames: median {statistics.median(steps[name]):6.1f} ms  "
              f"prefill of {args.context}: median {statistics.median(prefills[name]):5.2f} s  "
              f"blocks {[round(v, 1) for v in steps[name]]}")


def zerofill(args) -> None:
    from musicgen_core import MusicGen
    model = MusicGen.from_pretrained(args.model, quantize="int8")
    from musicgen_core.delay import columns_for
    capacity = columns_for(500, model.config.decoder.delays)  # a 10 s session
    for zeroed in (True, False, True, False):
        seconds = _timed(lambda: model.decoder.allocate_cache(2, capacity, zeroed=zeroed))
        print(f"KV cache for a 10 s session, zeroed={zeroed!s:5s}: {1000 * seconds:6.1f} ms")


def profile(args) -> None:
    from torch.profiler import profile as torch_profile
    from torch.profiler import record_function

    from musicgen_core import MusicGen
    from musicgen_core.int8_kernel import Int8Linear
    model = MusicGen.from_pretrained(args.model, quantize="int8")
    model.decoder.layer_steps = None  # the Python layers, so that each kernel call can be labelled
    conditioning = model.encode_text(["warm lofi beat"])[0]
    states = [model.start_sequence(conditioning, model.default_sampling(greedy=True, guidance_scale=3.0),
                                   total_frames=80)]
    for _ in range(20):
        model.step(states)
    forward = Int8Linear.forward

    def labelled(self, x):
        with record_function("int8 kernel (ours)"):
            return forward(self, x)

    Int8Linear.forward = labelled
    try:
        with torch_profile() as recorded:
            for _ in range(20):
                model.step(states)
    finally:
        Int8Linear.forward = forward
    print("ms per step, by op (20 steps):")
    for event in sorted(recorded.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"  {event.key:55s} {event.self_cpu_time_total / 1000 / 20:6.2f}  ({event.count // 20} calls)")
    print(f"  {'total':55s} {sum(e.self_cpu_time_total for e in recorded.key_averages()) / 1000 / 20:6.2f}")


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def int4(args) -> None:
    """One step of each scheme in turn (one model each, fp32 cache as this CPU's default without bf16), at 0,
    300 and 600 frames of context; medians over the blocks."""
    from musicgen_core import MusicGen

    schemes = ["int8", "int4-g32", "int4-g64", "int4-g128"]
    models = {s: MusicGen.from_pretrained(args.model, quantize=s, kv_dtype=torch.float32) for s in schemes}
    vocab, books = models["int8"].config.decoder.vocab_size, models["int8"].config.decoder.num_codebooks
    for context in (0, 300, 600):
        prompt = torch.randint(0, vocab, (books, context), generator=torch.Generator().manual_seed(0))
        states = {}
        for scheme, model in models.items():
            conditioning = model.encode_text(["warm lofi beat"])[0]
            states[scheme] = [model.start_sequence(conditioning, model.default_sampling(), prompt if context else None,
                                                   total_frames=context + 40 * args.blocks + 10)]
            model.step(states[scheme])  # the prefill
        times = {scheme: [] for scheme in schemes}
        for _ in range(args.blocks):
            for scheme, model in models.items():
                block = []
                for _ in range(8):
                    started = time.perf_counter()
                    model.step(states[scheme])
                    block.append(time.perf_counter() - started)
                times[scheme].append(statistics.median(block))
        print(f"context {context:4d}: " + "  ".join(
            f"{scheme} {1000 * statistics.median(values):5.1f} ms" for scheme, values in times.items()), flush=True)


def ttfa(args) -> None:
    """bench_generate's time to first audio (a 10 s session, chunk of 1 frame, through the engine) for int8 and
    int4 in turn, `--blocks` rounds: the new-prompt median and range, and the known-prompt and cold figures."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from bench_generate import time_to_first_audio
    from musicgen_core import MusicGen

    models = {scheme: MusicGen.from_pretrained(args.model, quantize=scheme) for scheme in ("int8", "int4")}
    runs = {scheme: [] for scheme in models}
    for _ in range(args.blocks):
        for scheme, model in models.items():
            runs[scheme].append(fresh(time_to_first_audio, model, sessions=6))
    for scheme, values in runs.items():
        new = [1000 * t for run in values for t in run[1:-1]]
        print(f"{scheme}: new prompt median {statistics.median(new):.0f} ms ({min(new):.0f}-{max(new):.0f}); "
              f"known {[round(1000 * run[-1]) for run in values]} ms; cold {[round(1000 * run[0]) for run in values]} ms")


def f32(args) -> None:
    """A float32 step (2 rows, 0 frames of context) with every linear as F.linear, as weight @ x.T, and as the
    kernel's linear_f32 (with and without torch single-threaded around the step), in turn; the floor is a
    `sum` over the same weight tensors the step reads, timed in the same loop."""
    from musicgen_core import MusicGen
    from musicgen_core.decoder import FastLinear
    from musicgen_core.int8_kernel import load_int8_kernel

    model = MusicGen.from_pretrained(args.model)
    decoder, kernel = model.decoder, load_int8_kernel()
    chosen = decoder.layers[0].fc1
    print(f"chosen at load: weight @ x.T for rows {sorted(chosen.transposed_rows)}, "
          f"linear_f32 for rows {sorted(chosen.kernel_rows)}")
    read = [m.weight for name, m in decoder.named_modules() if isinstance(m, FastLinear)
            and not name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj"))]  # cross K/V: once per prompt
    conditioning = model.encode_text(["warm lofi beat"])[0]
    state = model.start_sequence(conditioning, model.default_sampling(), total_frames=40 * args.blocks + 10)
    model.step([state])
    every = frozenset({1, 2, 4, 6, 8})

    def step() -> float:
        started = time.perf_counter()
        model.step([state])
        return time.perf_counter() - started

    def floor() -> float:
        started = time.perf_counter()
        for weight in read:
            weight.sum()
        return time.perf_counter() - started

    def threads_on() -> None:
        decoder.use_linear_forms(frozenset(), every, kernel)
        decoder.kernel_rows = frozenset()  # the linears on the pool, torch's team left on

    sides = {"F.linear": lambda: decoder.use_linear_forms(frozenset()),
             "weight @ x.T": lambda: decoder.use_linear_forms(every),
             "linear_f32": lambda: decoder.use_linear_forms(frozenset(), every, kernel),
             "linear_f32, torch threads on": threads_on}
    results = {name: [] for name in [*sides, "floor (sum)"]}
    for _ in range(args.blocks):
        for name, prepare in sides.items():
            prepare()
            results[name].append(min(step() for _ in range(3)))
        results["floor (sum)"].append(min(floor() for _ in range(3)))
    gigabytes = sum(w.numel() * w.element_size() for w in read) / 1e9
    for name, values in results.items():
        print(f"{name:30s} {1000 * statistics.median(values):6.1f} ms")
    print(f"weights read per step: {gigabytes:.2f} GB")


PROMPT_TEXTS = ["warm lofi beat with piano", "dark techno", "ambient pad with long strings", "funky bass groove"]


def prompts(args) -> None:
    """One session's step with 1, 2, 3 and 4 weighted prompts (2-5 decoder rows with guidance), int8 and int4,
    in turn, at 0 and `--context` frames of context; medians over the blocks."""
    from musicgen_core import MusicGen

    schemes = {s: MusicGen.from_pretrained(args.model, quantize=s) for s in ("int8", "int4")}
    for context in (0, args.context):
        for scheme, model in schemes.items():
            decoder = model.config.decoder
            prompt = torch.randint(0, decoder.vocab_size, (decoder.num_codebooks, context),
                                   generator=torch.Generator().manual_seed(0))
            states = {}
            for count in range(1, 5):
                conditioning = [model.encode_text([t])[0] for t in PROMPT_TEXTS[:count]]
                states[count] = [model.start_sequence(conditioning, model.default_sampling(),
                                                      prompt if context else None,
                                                      total_frames=context + 10 * args.blocks + 10)]
                model.step(states[count])  # the prefill
            times = {count: [] for count in states}
            for _ in range(args.blocks):
                for count, state in states.items():
                    model.step(state)
                    times[count].append(statistics.median(_timed(lambda: model.step(state)) for _ in range(7)))
            medians = {count: 1000 * statistics.median(values) for count, values in times.items()}
            print(f"{scheme} context {context:4d}: " + "  ".join(
                f"{count} prompt(s) {ms:5.1f} ms" for count, ms in medians.items())
                + f"  (+{(medians[4] - medians[1]) / 3:.1f} ms per extra prompt)", flush=True)


def codec(args) -> None:
    """The streaming codec per frame at --chunk frames, alone and as in the server (each chunk decoded after that
    many int4 decoder steps, which evict the codec's weights from the caches), against an offline decode of the
    same frames; medians of the blocks, taken in turn. Run it with GOMP_SPINCOUNT=10000 (the server's policy,
    musicgen_core/threads.py): this script imports torch first."""
    import musicgen_core.streaming_codec as streaming
    from musicgen_core import MusicGen
    from musicgen_core.threads import pooled_step

    model = MusicGen.from_pretrained(args.model, quantize="int4")
    conditioning = model.encode_text(["warm lofi beat"])[0]
    frames = 20 * args.chunk
    codes = torch.randint(0, model.config.decoder.vocab_size, (1, model.config.decoder.num_codebooks, frames))
    results: dict[str, list[float]] = {"alone": [], "between steps": [], "offline": []}
    with torch.no_grad():
        model.codec.decode(codes)  # warm: the first decode allocates
        for _ in range(args.blocks):
            for name in ("alone", "between steps"):
                state, spent = streaming.init_decoder_state(model.codec), 0.0
                states = [model.start_sequence(conditioning, model.default_sampling(), total_frames=frames + 10)]
                for start in range(0, frames, args.chunk):
                    if name == "between steps":
                        with pooled_step():
                            for _ in range(args.chunk):
                                model.step(states)
                    started = time.perf_counter()
                    streaming.decode_step(model.codec, state, codes[..., start: start + args.chunk])
                    spent += time.perf_counter() - started
                results[name].append(1000 * spent / frames)
            started = time.perf_counter()
            model.codec.decode(codes)
            results["offline"].append(1000 * (time.perf_counter() - started) / frames)
    offline_ms = statistics.median(results["offline"])
    for name, values in results.items():
        print(f"{name:14s} {statistics.median(values):5.2f} ms/frame ({statistics.median(values) / offline_ms:4.2f}x "
              f"offline)  blocks {[round(v, 2) for v in values]}")
    _codec_layers(model.codec, codes, args.chunk)


def _codec_layers(codec_model, codes, chunk: int) -> None:
    """Where the time goes: ms per frame in each kind of top-level decoder layer, streamed (alone) and offline."""
    from collections import Counter

    import musicgen_core.streaming_codec as streaming

    frames = codes.shape[-1]
    streamed, offline = Counter(), Counter()
    step, depth = streaming._step, [0]

    def timed(layer, state, x):  # top-level layers only (a residual block's inner layers count in the block)
        depth[0] += 1
        started = time.perf_counter()
        try:
            return step(layer, state, x)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                streamed[type(layer).__name__] += time.perf_counter() - started

    streaming._step = timed
    try:
        with torch.no_grad():
            state = streaming.init_decoder_state(codec_model)
            for start in range(0, frames, chunk):
                streaming.decode_step(codec_model, state, codes[..., start: start + chunk])
            x = codec_model.quantizer.decode(codes)
            for layer in codec_model.decoder.layers:
                started = time.perf_counter()
                x = layer(x)
                x = x[0] if isinstance(x, tuple) else x  # the LSTM returns its state too
                offline[type(layer).__name__] += time.perf_counter() - started
    finally:
        streaming._step = step
    for name in sorted(offline, key=offline.get, reverse=True):
        print(f"  {name:16s} streamed {1000 * streamed[name] / frames:5.2f}  offline "
              f"{1000 * offline[name] / frames:5.2f} ms/frame")


def linears(args) -> None:
    """80 distinct musicgen-small-sized weights (40 of 4096x1024, 40 of 1024x4096) at 2 rows, as a step reads
    them, in each format through the kernel (float32 and bfloat16 in `linear_f32`, int8, int4-g64), against
    `stream_read` of the same bytes; blocks alternate formats, on the pool as in a step. The linears' time
    includes 80 calls from Python (~10-20 us each), which weighs most on the smallest formats."""
    from musicgen_core.int8_kernel import Int4Linear, Int8Linear, load_int8_kernel
    from musicgen_core.threads import pooled_step

    kernel = load_int8_kernel()
    generator = torch.Generator().manual_seed(0)
    shapes = [(4096, 1024)] * 40 + [(1024, 4096)] * 40
    base = [torch.randn(*shape, generator=generator) * 0.02 for shape in shapes]
    inputs = {n: torch.randn(2, 1, n, generator=generator) for n in (1024, 4096)}
    formats = {
        "float32": ([(w, None) for w in base], lambda w, _: kernel.linear_f32(inputs[w.shape[1]], w)),
        "bfloat16": ([(w.to(torch.bfloat16), None) for w in base],
                     lambda w, _: kernel.linear_f32(inputs[w.shape[1]], w)),
        "int8": ([(None, Int8Linear(w, kernel)) for w in base], lambda _, layer: layer(inputs[layer.in_features])),
        "int4-g64": ([(None, Int4Linear(w, kernel, 64)) for w in base],
                     lambda _, layer: layer(inputs[layer.in_features])),
    }
    del base
    read = {name: [t for w, layer in items for t in ([w] if layer is None else
                                                   [layer.packed, layer.scale, layer.rowsum]) if t.numel()]
            for name, (items, _) in formats.items()}
    ratios = {name: [] for name in formats}
    with pooled_step():
        for _ in range(args.blocks):
            for name, (items, run) in formats.items():
                linear_ms = 1000 * statistics.median(_timed(lambda: [run(w, layer) for w, layer in items])
                                                     for _ in range(7))
                read_ms = 1000 * statistics.median(_timed(lambda: kernel.stream_read(read[name])) for _ in range(7))
                ratios[name].append((linear_ms, read_ms))
    for name, pairs in ratios.items():
        megabytes = sum(t.numel() * t.element_size() for t in read[name]) / 1e6
        linear_ms = statistics.median(p[0] for p in pairs)
        read_ms = statistics.median(p[1] for p in pairs)
        print(f"{name:9s} {megabytes:6.0f} MB  linears {linear_ms:6.2f} ms  read {read_ms:6.2f} ms  "
              f"ratio {linear_ms / read_ms:4.2f}  blocks {[round(a / b, 2) for a, b in pairs]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kernel", "gelu", "layers", "threads", "attention", "int8pack", "t5",
                                         "cross", "stream", "prefill", "zerofill", "profile", "pool", "int4", "ttfa", "f32",
                                         "prompts", "codec", "linears"])
    parser.add_argument("--model", default="/tmp/mg-small")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=600, help="pool, prompts: frames of context")
    parser.add_argument("--chunk", type=int, default=5, help="codec: frames per chunk (the server's default 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "threads":
        threads(args)  # its own processes
    else:
        fresh(globals()[args.what], args)  # a thread that ends: no OpenMP pool left on this one


if __name__ == "__main__":
    main()
