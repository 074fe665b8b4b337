"""Our int8 kernel: its arithmetic is specified by `reference_linear`, and it must match it bit for bit."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from musicgen_core import MusicGen
from musicgen_core import int8_kernel, quantize
from musicgen_core.cpu import cpu_flags
from musicgen_core.int8_kernel import (Int8Linear, kernel_isa, load_int8_kernel, quantize_weight,
                                       reference_linear)
from musicgen_core.quantize import quantization_backend

CPU_ISA = kernel_isa(cpu_flags())  # every x86-64 machine of this project has at least AVX2


@pytest.fixture(scope="module")
def kernel():
    module = load_int8_kernel()
    if module is None and CPU_ISA is None:
        pytest.skip(f"neither AVX2 nor AVX-512 VNNI on this CPU: {int8_kernel.int8_kernel_failure()}")
    return module


def test_kernel_is_built_for_the_best_instruction_set_the_cpu_has():
    module = load_int8_kernel()
    if CPU_ISA is not None:
        assert module is not None and module.supported(), int8_kernel.int8_kernel_failure()
        assert module.isa() == CPU_ISA
    else:
        assert module is None and "lacks" in int8_kernel.int8_kernel_failure()


@pytest.mark.parametrize("flags,isa", [
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}, "avx512-vnni"),  # Ice Lake / Sapphire Rapids Xeon
    ({"avx2", "fma", "avx512f", "avx512bw"}, "avx2"),  # Skylake-X: AVX-512 without VNNI
    ({"avx2", "fma"}, "avx2"),  # Zen 2/3 EPYC, Haswell to Raptor Lake desktops
    ({"avx2"}, None),  # no FMA: not a real CPU, refused rather than guessed
    ({"sse4_2", "avx"}, None),
], ids=["vnni", "avx512-no-vnni", "avx2", "avx2-no-fma", "pre-avx2"])
def test_the_dispatcher_picks_the_kernel_for_each_flag_set(flags, isa):
    assert kernel_isa(flags) == isa


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 15, 17])
@pytest.mark.parametrize("out_features,in_features", [(64, 32), (37, 29), (2048, 1024), (96, 4100)])
def test_kernel_equals_the_reference_arithmetic(isa_kernel, rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, 1, in_features, generator=generator) * 5
    values, scale = quantize_weight(weight)
    got = Int8Linear(weight, isa_kernel)(x)
    assert got.shape == (rows, 1, out_features)
    assert torch.equal(got, reference_linear(x, values, scale))


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_kernel_gelu_equals_the_reference_then_torch_gelu(isa_kernel, rows):
    generator = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(80, 72, generator=generator), torch.randn(rows, 1, 72, generator=generator)
    values, scale = quantize_weight(weight)
    linear = reference_linear(x, values, scale)
    expected = torch.nn.functional.gelu(linear)
    got = Int8Linear(weight, isa_kernel, applies_gelu=True)(x)
    assert linear.abs().max() > 4  # the tails, where erf saturates, are covered too
    assert (got - expected).abs().max() <= 1e-6 * max(1.0, linear.abs().max().item())


def test_kernel_handles_zero_rows_and_non_contiguous_input(isa_kernel):
    weight = torch.randn(48, 40)
    x = torch.randn(40, 3).T.clone()[:, None]  # contiguous copy of a transposed matrix
    x[1] = 0
    strided = torch.randn(3, 1, 80)[..., ::2]
    layer = Int8Linear(weight, isa_kernel)
    values, scale = quantize_weight(weight)
    assert torch.equal(layer(x), reference_linear(x, values, scale))
    assert torch.equal(layer(x)[1], torch.zeros(1, 48))
    assert torch.equal(layer(strided), reference_linear(strided, values, scale))


def test_weights_are_quantized_per_output_channel():
    weight = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]  # rows four decades apart
    values, scale = quantize_weight(weight)
    assert torch.equal(values.abs().amax(dim=1), torch.full((16,), 127, dtype=torch.int8))
    assert ((values.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


def test_quantized_linear_is_close_to_float(kernel):
    weight, x = torch.randn(1024, 1024) * 0.02, torch.randn(2, 1, 1024)
    exact = x @ weight.T
    error = (Int8Linear(weight, kernel)(x) - exact).norm() / exact.norm()
    assert error < 0.02


def test_int8_decoder_is_the_reference_arithmetic_end_to_end(mono_checkpoint, kernel):
    """Swapping every kernel call for `reference_linear` leaves the int8 model's logits bit-identical. (With
    GELU left to torch: the kernel's own GELU differs by ~1e-7, which the next layer's activation rounding
    can turn into a different int8 value, so that path is held to torch's GELU on its own, above.)"""
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8")
    assert quantization_backend(model.decoder) == "int8-vnni"
    fc1s = [m for m in model.decoder.modules() if isinstance(m, Int8Linear) and m.applies_gelu]
    assert len(fc1s) == model.config.decoder.num_hidden_layers  # by default each fc1 applies GELU itself
    for layer in fc1s:
        layer.applies_gelu = False
    quantize.build_layer_steps(model.decoder, kernel)
    params = model.default_sampling(greedy=True)
    conditioning = model.encode_text(["warm lofi beat"])[0]
    states = [model.start_sequence(conditioning, params, total_frames=12) for _ in range(2)]
    for _ in range(5):
        model.step(states[:1])
        model.step(states[1:])
    columns = states[0].pending_columns()
    with torch.inference_mode():
        fast = model.decoder([columns], [states[0].cache], [states[0].cross])[0]

        class Reference(torch.nn.Module):
            def __init__(self, layer: Int8Linear):
                super().__init__()
                self.layer = layer

            def forward(self, x):
                values = self.layer.packed.permute(0, 2, 1, 3).reshape(self.layer.packed.shape[0] * 16, -1)
                values = values[: self.layer.out_features, : self.layer.in_features]
                return reference_linear(x, values, self.layer.scale[: self.layer.out_features])

        for name, module in list(model.decoder.named_modules()):
            if isinstance(module, Int8Linear):
                quantize._replace(model.decoder, name, Reference(module))
        model.decoder.layer_steps = None  # through the (now reference) modules
        slow = model.decoder([columns], [states[1].cache], [states[1].cross])[0]
    assert torch.equal(fast, slow)


def test_int8_falls_back_to_fbgemm_when_the_kernel_is_unavailable(mono_checkpoint, monkeypatch, caplog):
    monkeypatch.setattr(quantize, "load_int8_kernel", lambda: None)
    with caplog.at_level(logging.WARNING):
        model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8")
    assert quantization_backend(model.decoder) == "int8-fbgemm"
    assert "using fbgemm" in caplog.text


def test_int8_fbgemm_can_be_chosen_explicitly(mono_checkpoint):
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8-fbgemm")
    assert quantization_backend(model.decoder) == "int8-fbgemm"
    assert model.generate("warm lofi beat", frames=6).codes.shape == (1, 4, 6)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_lets_go_of_the_checkpoint_file(mono_checkpoint, tmp_path, scheme):
    """Loaded tensors share the checkpoint's memory map; once the decoder is quantized nothing may point into
    it, so the map (and every page quantization read) is released."""
    import gc
    import shutil

    private = tmp_path / "checkpoint"
    shutil.copytree(mono_checkpoint, private)
    weights = str((private / "model.safetensors").resolve())

    def mapped() -> bool:
        return weights in open("/proc/self/maps").read()

    fp32 = MusicGen.from_pretrained(private)
    assert mapped()  # float loads read the weights through the map
    del fp32
    gc.collect()
    model = MusicGen.from_pretrained(private, quantize=scheme)
    gc.collect()
    assert not mapped()
    assert model.generate("warm lofi beat", frames=4).codes.shape == (1, 4, 4)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8],
                         ids=["fp32-cache", "bf16-cache", "int8-cache"])
def test_the_cpp_layers_step_bit_for_bit_like_the_python_layers(mono_checkpoint, kernel, kv_dtype):
    """Two sequences batched (one with guidance, one without), several steps: the C++ one-column layers give the
    Python path's logits and caches exactly."""
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8", kv_dtype=kv_dtype)
    assert len(model.decoder.layer_steps) == model.config.decoder.num_hidden_layers
    fused, plain = step_cpp_and_python_layers(model)
    for a, b in zip(fused, plain):
        assert a.cache.length == b.cache.length
        assert torch.equal(a.cache.keys[:, :, :, :a.cache.length], b.cache.keys[:, :, :, :b.cache.length])
        if kv_dtype == torch.int8:
            assert torch.equal(a.cache.value_scales[:, :, :, :a.cache.length],
                               b.cache.value_scales[:, :, :, :b.cache.length])


def test_an_int8_cache_needs_our_kernels_decoder(mono_checkpoint):
    with pytest.raises(ValueError, match="int8 KV cache needs our kernel"):
        MusicGen.from_pretrained(mono_checkpoint, kv_dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 KV cache needs our kernel"):
        MusicGen.from_pretrained(mono_checkpoint, quantize="int8-fbgemm", kv_dtype=torch.int8)


def test_an_int8_cache_holds_half_of_bf16s_bytes_and_generates(mono_checkpoint, kernel):
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8", kv_dtype=torch.int8)
    cache = model.decoder.allocate_cache(2, 64)
    config = model.config.decoder
    elements = 2 * config.num_hidden_layers * 2 * config.num_attention_heads * 64 * config.head_dim
    assert cache.keys.dtype == torch.int8 and cache.nbytes == elements + elements // config.head_dim * 4
    assert model.generate("warm lofi beat", frames=6).codes.shape == (1, 4, 6)


def step_cpp_and_python_layers(model, steps: int = 6):
    """Two sequences batched (one with guidance, one without) stepped through the C++ layers and through the
    Python layers side by side, asserting equal logits at every step; -> (fused states, plain states)."""
    fused_steps = model.decoder.layer_steps
    conditionings = model.encode_text(["warm lofi beat", "dark techno"])
    params = [model.default_sampling(greedy=True), model.default_sampling(greedy=True, guidance_scale=1.0)]
    fused, plain = ([model.start_sequence(c, p, total_frames=10) for c, p in zip(conditionings, params)]
                    for _ in range(2))
    try:
        with torch.inference_mode():
            for _ in range(steps):
                model.decoder.layer_steps = fused_steps
                got = model.decoder([s.pending_columns() for s in fused], [s.cache for s in fused],
                                    [s.cross for s in fused])
                model.decoder.layer_steps = None
                expected = model.decoder([s.pending_columns() for s in plain], [s.cache for s in plain],
                                         [s.cross for s in plain])
                assert all(torch.equal(a, b) for a, b in zip(got, expected))
                for states, logits in ((fused, got), (plain, expected)):
                    for state, value in zip(states, logits):
                        state.grid.place(value[0, :, -1].argmax(-1))
    finally:
        model.decoder.layer_steps = fused_steps
    return fused, plain


def test_the_cpp_layers_refuse_a_full_cache(mono_checkpoint, kernel):
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8")
    state = model.start_sequence(model.encode_text(["warm lofi beat"])[0], model.default_sampling(greedy=True),
                                 total_frames=2)
    state.cache.length = state.cache.capacity
    with pytest.raises(ValueError, match="KV cache full"), torch.inference_mode():
        model.decoder([state.grid.tokens[:, :1]], [state.cache], [state.cross])


def test_a_row_with_nan_or_inf_comes_out_nan_and_leaves_the_others_alone(isa_kernel):
    weight = torch.randn(48, 40)
    x = torch.randn(4, 1, 40)
    x[1, 0, 3] = float("nan")  # in the vectorized part
    x[2, 0, 37] = float("inf")  # in the scalar tail
    values, scale = quantize_weight(weight)
    got, expected = Int8Linear(weight, isa_kernel)(x), reference_linear(x, values, scale)
    assert torch.isnan(got[1:3]).all() and torch.isnan(expected[1:3]).all()
    assert torch.equal(got[[0, 3]], expected[[0, 3]])


def test_the_kernel_refuses_an_input_of_the_wrong_width(kernel):
    layer = Int8Linear(torch.randn(16, 32), kernel)
    with pytest.raises(RuntimeError, match="input width 25 does not match the weight.s 32"):
        layer(torch.randn(1, 1, 25))


def test_a_finished_build_loads_even_with_a_build_lock_left_behind(kernel, tmp_path, monkeypatch):
    """A process killed while compiling leaves torch's lock file; torch would wait for it forever."""
    import shutil

    monkeypatch.setenv("MUSICGEN_KERNEL_DIR", str(tmp_path))
    directory = int8_kernel.kernel_build_directory()
    directory.mkdir(parents=True)
    name = f"musicgen_int8_{directory.name}"
    shutil.copy(kernel.__file__, directory / f"{name}.so")
    (directory / "lock").touch()
    monkeypatch.setattr(int8_kernel, "_kernel", None)
    monkeypatch.setattr(int8_kernel, "_failure", None)
    monkeypatch.setattr(int8_kernel, "_build", lambda *args: pytest.fail("rebuilt a finished kernel"))
    assert load_int8_kernel().supported()


def test_a_stale_build_lock_is_removed_before_building(tmp_path, monkeypatch):
    import os
    import time

    directory = tmp_path / "build"
    directory.mkdir()
    lock = directory / "lock"
    lock.touch()
    old = time.time() - int8_kernel.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    seen = {}
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kwargs: seen.setdefault("lock", lock.exists()))
    int8_kernel._build("musicgen_int8_test", directory, int8_kernel.CFLAGS)
    assert seen == {"lock": False}


@pytest.mark.parametrize("threads, chunk_bytes, openmp", [(1, 2 << 20, False), (2, 1, False), (3, 1, False),
                                                          (2, 2 << 20, True)],
                         ids=["pool-alone", "pool-2-every-attention-cut", "pool-3-every-attention-cut", "openmp"])
def test_the_cpp_layers_give_the_same_bits_however_the_work_is_shared(mono_checkpoint, kernel, threads,
                                                                      chunk_bytes, openmp):
    """The elastic pool (any thread count, attention cut by rows and heads) and OpenMP's fixed shares all give
    the logits of the Python layers bit for bit: each output is computed whole by one thread."""
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int8")
    saved = kernel.parallel()
    kernel.set_parallel(threads, 20, openmp, chunk_bytes)
    try:
        step_cpp_and_python_layers(model)
    finally:
        kernel.set_parallel(*saved)


def test_the_pool_runs_a_linear_with_any_thread_count_to_the_same_bits(isa_kernel):
    torch.manual_seed(3)
    weight, x = torch.randn(2048, 72), torch.randn(5, 72)  # 128 output blocks: 3 chunks of ~64 KB
    values, scale = int8_kernel.quantize_weight(weight)
    packed, rowsum, scales = int8_kernel.pack(values, scale)
    saved = isa_kernel.parallel()
    try:
        results = []
        for threads in (1, 2, 4):
            isa_kernel.set_parallel(threads, 0, False)
            results.append(isa_kernel.linear(x, packed, rowsum, scales, 72, 2048, False))
        assert all(torch.equal(r, int8_kernel.reference_linear(x, values, scale)) for r in results)
    finally:
        isa_kernel.set_parallel(*saved)


def test_set_parallel_refuses_nonsense(kernel):
    with pytest.raises(RuntimeError, match="threads >= 1"):
        kernel.set_parallel(0, 20, False)


STRESS = """
import sys, torch
from musicgen_core import int8_kernel
kernel = int8_kernel.load_int8_kernel()
kernel.set_parallel(int(sys.argv[1]), 1000, False)  # spinning helpers race every claim
torch.manual_seed(0)
cases = []
for out in (1024, 4096, 2048, 8192):  # 256 inputs: regions of 4, 16, 8 and 32 chunks, one after another
    values, scale = int8_kernel.quantize_weight(torch.randn(out, 256))
    x = torch.randn(2, 256)
    cases.append((x, *int8_kernel.pack(values, scale), out, int8_kernel.reference_linear(x, values, scale)))
for i in range(int(sys.argv[2])):
    if i % 5000 == 0:  # in and out of bursts: helpers hot between regions, then not
        kernel.end_burst() if kernel.pool_state()[0] else kernel.begin_burst()
    x, packed, rowsum, scales, out, expected = cases[i % len(cases)]
    assert torch.equal(kernel.linear(x, packed, rowsum, scales, 256, out, False), expected), i
print("ok", kernel.pool_state()[2] > 0)  # the busy processes preempted a helper
"""


def test_the_pool_survives_many_regions_of_changing_sizes_with_more_threads_than_cores(kernel):
    """Threads that outnumber the cores are descheduled mid-region all the time: every region still ends, with
    the reference's bits (a helper that claimed against the next region's count once hung the caller here)."""
    import subprocess
    import sys

    threads = 2 * (os.cpu_count() or 2)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:  # processes that preempt the caller anywhere, inside the few instructions that publish a region too
        result = subprocess.run([sys.executable, "-c", STRESS, str(threads), "100000"], capture_output=True,
                                text=True, timeout=240)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert result.returncode == 0 and result.stdout.strip() == "ok True", result.stderr[-2000:]
