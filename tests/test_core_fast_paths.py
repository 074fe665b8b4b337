"""The fast paths: the small-batch CPU matmul, int8 decoder weights and bfloat16 stay close to fp32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from musicgen_core import MusicGen
from musicgen_core import decoder as decoder_module
from musicgen_core.decoder import linear
from musicgen_core.quantize import is_quantized

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_fidelity import compare, teacher_forced_guided_logits  # noqa: E402

TEXT = "warm lofi beat with piano"


@pytest.mark.parametrize("rows", [1, 2, 8, 40])
def test_small_batch_linear_equals_f_linear(rows):
    generator = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 64, generator=generator), torch.randn(96, 64, generator=generator)
    assert torch.allclose(linear(x, weight, frozenset({1, 2, 8, 40})), F.linear(x, weight), atol=1e-5)


def test_linear_calibration_returns_only_row_counts_it_measured():
    transposed, kernel_rows = decoder_module.calibrate_linear(torch.randn(256, 128), rows_options=(1, 2), repeats=2)
    assert transposed <= {1, 2} and not kernel_rows  # no kernel offered


def test_linear_calibration_times_distinct_weights_and_gives_each_row_count_one_form():
    from musicgen_core.int8_kernel import load_int8_kernel

    kernel = load_int8_kernel()
    weights = [torch.randn(512, 256) for _ in range(4)]
    transposed, kernel_rows = decoder_module.calibrate_linear(weights, rows_options=(1, 2, 4), kernel=kernel)
    assert transposed | kernel_rows <= {1, 2, 4} and not transposed & kernel_rows


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_the_kernels_float32_linear_equals_f_linear_to_rounding(isa_kernel, rows):
    kernel = isa_kernel  # every build this CPU runs: the AVX2 one too on an AVX-512 machine
    generator = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 1, 1030, generator=generator), torch.randn(300, 1030, generator=generator)
    got = linear(x, weight, kernel_rows=frozenset({rows}), kernel=kernel)
    assert got.shape == (rows, 1, 300)
    assert torch.allclose(got, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="linear_f32"):
        kernel.linear_f32(x, weight.T)  # not contiguous


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_the_kernels_float_linear_takes_bfloat16_weights_as_their_exact_float32_values(isa_kernel, rows):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 1030, generator=generator)  # 1030: whole blocks of 16 and 32, then a tail
    weight = torch.randn(300, 1030, generator=generator).to(torch.bfloat16)
    got = isa_kernel.linear_f32(x, weight)
    assert got.dtype == torch.float32 and got.shape == (rows, 1, 300)
    assert torch.allclose(got, F.linear(x, weight.float()), rtol=1e-5, atol=1e-4)


def teacher_forced_step_logits(model, steps: int = 6) -> torch.Tensor:
    """The decoder's logits over `steps` one-column steps of one guided sequence, fed the same seeded random
    codes whatever the logits (so two paths of one model see the same inputs)."""
    conditioning = model.encode_text([TEXT])[0]
    state = model.start_sequence(conditioning, model.default_sampling(greedy=True), total_frames=steps + 6)
    logits = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(steps):
            logits.append(model.decoder([state.pending_columns()], [state.cache], [state.cross])[0].float())
            state.grid.place(torch.randint(0, model.config.decoder.vocab_size, (model.config.decoder.num_codebooks,),
                                           generator=generator))
    return torch.cat(logits, dim=2)


def python_and_cpp_step_logits(model, kernel) -> tuple[torch.Tensor, torch.Tensor]:
    model.decoder.layer_steps = model.decoder.float_kernel = None
    python = teacher_forced_step_logits(model)
    assert model.decoder.use_float_kernel_layers(kernel)
    return python, teacher_forced_step_logits(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_float_checkpoint_of_published_width_steps_through_the_cpp_layers(wide_ffn_checkpoint, mono_checkpoint,
                                                                             dtype):
    model = MusicGen.from_pretrained(wide_ffn_checkpoint, dtype=dtype)
    assert model.decoder.layer_steps is not None and model.decoder.float_kernel is not None
    out = model.generate(TEXT, frames=6)
    assert out.codes.shape == (1, 4, 6) and torch.isfinite(out.audio).all()
    small = MusicGen.from_pretrained(mono_checkpoint, dtype=dtype)  # torch's layers, as transformers computes
    assert small.decoder.layer_steps is None


@pytest.mark.parametrize("options", [{"dtype": torch.float32}, {"dtype": torch.bfloat16}, {"quantize": "int8"}],
                         ids=["float32", "bfloat16", "int8"])
def test_a_float16_cache_steps_through_the_python_layers(wide_ffn_checkpoint, options):
    """The C++ step reads float32, bfloat16 or int8 caches; another cache dtype takes the Python layers."""
    model = MusicGen.from_pretrained(wide_ffn_checkpoint, kv_dtype=torch.float16, **options)
    assert model.decoder.layer_steps is None
    out = model.generate(TEXT, frames=5)
    assert out.codes.shape == (1, 4, 5) and torch.isfinite(out.audio).all()


def test_a_float_step_of_two_sessions_agrees_with_the_python_layers(wide_ffn_checkpoint):
    """Two guided sessions (4 rows, one pass of the float kernel) through the C++ step, and three (6 rows,
    past one pass: torch's layers), give the Python layers' logits to float rounding."""
    model = MusicGen.from_pretrained(wide_ffn_checkpoint)
    params = model.default_sampling(greedy=True)
    texts = [TEXT, "dark techno", "ambient pads"]
    for sessions in (2, 3):
        results = []
        for cpp in (False, True):
            saved = model.decoder.layer_steps, model.decoder.float_kernel
            if not cpp:
                model.decoder.layer_steps = model.decoder.float_kernel = None
            states = [model.start_sequence(c, params, total_frames=12) for c in model.encode_text(texts[:sessions])]
            logits = []
            with torch.inference_mode():
                for _ in range(4):
                    step = model.decoder([s.pending_columns() for s in states], [s.cache for s in states],
                                         [s.cross for s in states])
                    logits.append(torch.cat(step))
                    for state, value in zip(states, step):
                        state.grid.place(value[0, :, -1].argmax(-1))
            model.decoder.layer_steps, model.decoder.float_kernel = saved
            results.append(torch.cat(logits, dim=2))
        assert (results[0] - results[1]).abs().max() < 1e-4


def test_a_float32_decoders_cpp_step_agrees_with_its_python_layers(mono_checkpoint, isa_kernel):
    python, cpp = python_and_cpp_step_logits(MusicGen.from_pretrained(mono_checkpoint), isa_kernel)
    assert (python - cpp).abs().max() < 1e-4


def test_a_bfloat16_decoders_cpp_step_is_nearer_float32_than_its_python_layers(mono_checkpoint, isa_kernel):
    """The C++ step keeps float32 activations against bfloat16 weights; torch's bfloat16 layers round every
    activation to bfloat16. Both differ from float32; the C++ step by less."""
    reference = teacher_forced_step_logits(MusicGen.from_pretrained(mono_checkpoint))
    python, cpp = python_and_cpp_step_logits(MusicGen.from_pretrained(mono_checkpoint, dtype=torch.bfloat16),
                                             isa_kernel)
    python_error, cpp_error = (python - reference).abs().mean(), (cpp - reference).abs().mean()
    assert 0 < cpp_error < python_error


def test_a_float_decoder_through_the_kernels_linear_steps_like_f_linear(mono_checkpoint):
    from musicgen_core.int8_kernel import load_int8_kernel

    model = MusicGen.from_pretrained(mono_checkpoint)
    conditioning = model.encode_text([TEXT])[0]
    logits = []
    for forms in ((frozenset(), frozenset(), None), (frozenset(), frozenset({1, 2}), load_int8_kernel())):
        model.decoder.use_linear_forms(*forms)
        state = model.start_sequence(conditioning, model.default_sampling(greedy=True), total_frames=8)
        with torch.inference_mode():
            logits.append([model.decoder([state.pending_columns()], [state.cache], [state.cross])[0]])
            state.grid.place(logits[-1][0][0, :, -1].argmax(-1))
            logits[-1].append(model.decoder([state.pending_columns()], [state.cache], [state.cross])[0])
    model.decoder.use_linear_forms(frozenset())
    for plain, fast in zip(*logits):
        assert torch.allclose(plain, fast, rtol=1e-4, atol=1e-4)


def test_a_decoder_takes_the_calibrated_form_in_every_linear_layer(mono_checkpoint):
    model = MusicGen.from_pretrained(mono_checkpoint)
    model.decoder.use_transposed_rows(frozenset({2}))
    layers = [m for m in model.decoder.modules() if isinstance(m, decoder_module.FastLinear)]
    assert layers and all(m.transposed_rows == {2} for m in layers)


@pytest.fixture(scope="module")
def reference(mono_checkpoint):
    model = MusicGen.from_pretrained(mono_checkpoint)
    codes = model.generate(TEXT, frames=40, params=model.default_sampling(greedy=True)).codes[0]
    return model, codes, teacher_forced_guided_logits(model, TEXT, codes)


@pytest.mark.parametrize("options,least_agreement",
                         [({"quantize": "int8"}, 0.9), ({"quantize": "int8-fbgemm"}, 0.9),
                          ({"dtype": torch.bfloat16}, 0.9), ({"kv_dtype": torch.bfloat16}, 0.95)],
                         ids=["int8", "int8-fbgemm", "bfloat16", "kv-bfloat16"])
def test_fast_path_agrees_with_fp32_teacher_forced(mono_checkpoint, reference, options, least_agreement):
    _, codes, reference_logits = reference
    fast = MusicGen.from_pretrained(mono_checkpoint, **options)
    agreement, kl = compare(reference_logits, teacher_forced_guided_logits(fast, TEXT, codes))
    assert agreement >= least_agreement and kl < 0.05


def test_int8_replaces_every_decoder_linear_and_nothing_else(mono_checkpoint):
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8")
    assert is_quantized(model.decoder)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.decoder.modules())
    assert not is_quantized(model.modules.text_encoder) and not is_quantized(model.codec)
    out = model.generate(TEXT, frames=8)
    assert out.codes.shape == (1, 4, 8) and torch.isfinite(out.audio).all()


def test_int8_refuses_non_float32_weights(mono_checkpoint):
    with pytest.raises(ValueError, match="float32"):
        MusicGen.from_pretrained(mono_checkpoint, dtype=torch.bfloat16, quantize="int8")


def test_static_step_equals_the_eager_step(mono_checkpoint):
    """The fixed-shape step that CUDA graphs capture gives the eager step's logits (checked here on CPU)."""
    model = MusicGen.from_pretrained(mono_checkpoint)
    params = model.default_sampling(greedy=True)
    conditionings = model.encode_text([TEXT, "dark techno"])
    eager = [model.start_sequence(c, params, total_frames=20) for c in conditionings]
    static = [model.start_sequence(c, params, total_frames=20) for c in conditionings]
    for state in static:  # the static step attends over the whole capacity: it needs zero-filled caches
        state.cache = model.decoder.allocate_cache(state.cache.rows, state.cache.capacity, zeroed=True)
    for _ in range(6):
        model.step(eager)
        model.step(static)
    with torch.inference_mode():
        expected = torch.cat(model.decoder([s.pending_columns() for s in eager], [s.cache for s in eager],
                                           [s.cross for s in eager]))
        tokens = torch.stack([s.pending_columns() for s in static])
        lengths = torch.tensor([s.cache.length for s in static])
        got = model.decoder.forward_static(tokens, lengths, [s.cache for s in static], [s.cross for s in static])
    assert (got - expected).abs().max() < 1e-4


def test_cuda_graphs_need_a_cuda_device(mono_checkpoint):
    with pytest.raises(ValueError, match="CUDA"):
        MusicGen.from_pretrained(mono_checkpoint, cuda_graphs=True)


def test_cpu_caches_skip_the_zero_fill_and_still_generate_the_same_codes(mono_checkpoint):
    """On the CPU the eager step reads only positions it wrote, so an unfilled cache changes nothing."""
    model = MusicGen.from_pretrained(mono_checkpoint)
    params = model.default_sampling(greedy=True)
    conditioning = model.encode_text([TEXT])[0]
    dirty = model.start_sequence(conditioning, params, total_frames=16)
    dirty.cache.keys.fill_(float("nan"))
    dirty.cache.values.fill_(float("nan"))
    clean = model.start_sequence(conditioning, params, total_frames=16)
    clean.cache = model.decoder.allocate_cache(clean.cache.rows, clean.cache.capacity, zeroed=True)
    while not clean.finished:
        assert torch.equal(model.step([dirty])[0].column, model.step([clean])[0].column)


def test_kv_cache_dtype_defaults_to_the_weights_and_to_int8_with_our_kernels_decoders(mono_checkpoint):
    from musicgen_core.cpu import has_bf16
    assert MusicGen.from_pretrained(mono_checkpoint).decoder.allocate_cache(2, 8).keys.dtype == torch.float32
    for scheme in ("int8", "int4"):
        assert MusicGen.from_pretrained(mono_checkpoint, quantize=scheme).decoder.allocate_cache(2, 8).keys.dtype \
            == torch.int8
    fbgemm = MusicGen.from_pretrained(mono_checkpoint, quantize="int8-fbgemm")  # attends through sdpa: no int8
    assert fbgemm.decoder.allocate_cache(2, 8).keys.dtype == (torch.bfloat16 if has_bf16() else torch.float32)
    exact_cache = MusicGen.from_pretrained(mono_checkpoint, quantize="int8", kv_dtype=torch.float32)
    assert exact_cache.decoder.allocate_cache(2, 8).keys.dtype == torch.float32


def test_kv_cache_dtype_must_be_one_the_decoder_can_attend_over(mono_checkpoint):
    with pytest.raises(ValueError, match="kv_dtype"):
        MusicGen.from_pretrained(mono_checkpoint, kv_dtype=torch.int16)


def test_bfloat16_kv_cache_runs_the_static_step_too(mono_checkpoint):
    """The fixed-shape step casts into and out of a bfloat16 cache the way the eager step does."""
    model = MusicGen.from_pretrained(mono_checkpoint, kv_dtype=torch.bfloat16)
    params = model.default_sampling(greedy=True)
    conditioning = model.encode_text([TEXT])[0]
    eager, static = (model.start_sequence(conditioning, params, total_frames=12) for _ in range(2))
    static.cache = model.decoder.allocate_cache(static.cache.rows, static.cache.capacity, zeroed=True)
    for _ in range(4):
        model.step([eager])
        model.step([static])
    with torch.inference_mode():
        expected = model.decoder([eager.pending_columns()], [eager.cache], [eager.cross])[0]
        got = model.decoder.forward_static(static.pending_columns()[None], torch.tensor([static.cache.length]),
                                           [static.cache], [static.cross])
    assert (got - expected).abs().max() < 1e-2


@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}], ids=["fp32", "int8"])
def test_cross_attention_skips_zero_rows_without_changing_them(mono_checkpoint, options):
    """Guidance's unconditional row is all zeros; projecting only the other rows gives the same keys/values."""
    model = MusicGen.from_pretrained(mono_checkpoint, **options)
    hidden = model.encode_text([TEXT])[0].hidden
    stacked = torch.stack([hidden, torch.zeros_like(hidden), hidden * 0.5])
    mask = torch.ones(3, hidden.shape[0], dtype=torch.long)
    with torch.inference_mode():
        skipped = model.decoder.cross_attention_kv(stacked, mask)
        live = model.decoder.cross_attention_kv(stacked[[0, 2]], mask[[0, 2]])
    assert torch.equal(skipped.keys[:, 1], torch.zeros_like(skipped.keys[:, 1]))
    assert torch.equal(skipped.values[:, 1], torch.zeros_like(skipped.values[:, 1]))
    assert torch.equal(skipped.keys[:, [0, 2]], live.keys) and torch.equal(skipped.values[:, [0, 2]], live.values)
