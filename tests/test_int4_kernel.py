"""Our int4 kernel (group-wise int4 weights, int8 activations): its arithmetic is specified by
`reference_linear_int4`, and it must match it bit for bit on every CPU of this project (it is AVX2 code)."""

from __future__ import annotations

import grpc
import pytest
import torch

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import MusicGen, int8_kernel, quantize
from musicgen_core.decoder import FastLinear
from musicgen_core.int8_kernel import (INT4_GROUPS, Int4Linear, load_int8_kernel, pack_int4, quantize_weight_int4,
                                       reference_linear_int4, unpack_int4)
from musicgen_core.quantize import quantization_backend

from test_int8_kernel import step_cpp_and_python_layers


@pytest.fixture(scope="module")
def kernel():
    module = load_int8_kernel()
    assert module is not None, int8_kernel.int8_kernel_failure()  # every x86 machine here has AVX2
    assert module.int4_isa() == module.isa()  # AVX-512 VNNI where the CPU has it, else AVX2
    return module


@pytest.mark.parametrize("group", INT4_GROUPS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 9, 15, 17])
@pytest.mark.parametrize("out_features,in_features", [(64, 32), (37, 29), (512, 1024), (40, 300)])
def test_kernel_equals_the_reference_arithmetic(isa_kernel, group, rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features + group)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, 1, in_features, generator=generator) * 5
    values, scales = quantize_weight_int4(weight, group)
    got = Int4Linear(weight, isa_kernel, group)(x)
    assert got.shape == (rows, 1, out_features)
    assert torch.equal(got, reference_linear_int4(x, values, scales, group))


def test_weights_use_all_sixteen_levels_and_each_groups_extreme_sets_its_bfloat16_scale():
    weight = torch.randn(24, 200) * torch.logspace(-3, 1, 24)[:, None]  # rows four decades apart
    values, scales = quantize_weight_int4(weight, 64)
    assert values.shape == (24, 200) and scales.shape == (24, 4)  # the last group holds 8 inputs
    assert scales.dtype == torch.bfloat16
    assert values.min() == -8 and values.max() <= 7
    padded = torch.zeros(24, 256)
    padded[:, :200] = weight
    extremes = padded.view(24, 4, 64).abs().amax(dim=2)
    assert torch.equal(scales, (extremes / 8).to(torch.bfloat16).abs() * scales.sign())  # the extreme / -8, rounded
    step = scales.float().repeat_interleave(64, dim=1)[:, :200]
    error = (values.float() * step - weight).abs()
    # the side opposite the extreme reaches up to 8 steps (8.03 with the scale's rounding), stored as 7
    clamped = weight / step > 7.5
    assert (error[~clamped] <= step.abs()[~clamped] / 2 * (1 + 1e-5)).all()
    assert (error[clamped] <= step.abs()[clamped] * (1 + 2 ** -5)).all()


def test_a_group_too_small_for_a_bfloat16_scale_becomes_zeros_with_scale_one():
    weight = torch.randn(2, 128)
    weight[0] *= 1e-41  # every scale would round to 0 in bfloat16
    values, scales = quantize_weight_int4(weight, 64)
    assert scales[0].eq(1).all() and values[0].eq(0).all()
    assert scales[1].ne(1).all() and values[1].min() == -8


def test_packing_round_trips():
    weight = torch.randn(37, 100)
    values, scales = quantize_weight_int4(weight, 32)
    packed, packed_scales = pack_int4(values, scales, 32)
    assert packed.shape == (3, 16, 16, 4) and packed.dtype == torch.uint8  # out 48 / 16, in 128 / 8
    assert packed_scales.shape == (3, 4, 16)
    unpacked, unpacked_scales = unpack_int4(packed, packed_scales, 37, 100)
    assert torch.equal(unpacked, values) and torch.equal(unpacked_scales, scales)


@pytest.mark.parametrize("group", [32, 128])
def test_quantized_linear_is_close_to_float_and_finer_groups_are_closer(kernel, group):
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(1024, 1024, generator=generator) * 0.02, torch.randn(2, 1, 1024, generator=generator)
    exact = x @ weight.T
    error = (Int4Linear(weight, kernel, group)(x) - exact).norm() / exact.norm()
    assert error < {32: 0.09, 128: 0.12}[group]  # a Gaussian weight's 4-bit rounding error, ~8-10%
    if group == 128:
        finer = (Int4Linear(weight, kernel, 32)(x) - exact).norm() / exact.norm()
        assert finer < error


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_kernel_gelu_equals_the_reference_then_torch_gelu(isa_kernel, rows):
    generator = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(80, 96, generator=generator), torch.randn(rows, 1, 96, generator=generator)
    linear = reference_linear_int4(x, *quantize_weight_int4(weight, 32), 32)
    got = Int4Linear(weight, isa_kernel, 32, applies_gelu=True)(x)
    assert linear.abs().max() > 4  # the tails, where erf saturates, are covered too
    assert (got - torch.nn.functional.gelu(linear)).abs().max() <= 1e-6 * max(1.0, linear.abs().max().item())


def test_a_row_with_nan_or_inf_comes_out_nan_and_leaves_the_others_alone(isa_kernel):
    weight, x = torch.randn(48, 70), torch.randn(4, 1, 70)
    x[1, 0, 3] = float("nan")
    x[2, 0, 69] = float("inf")
    got = Int4Linear(weight, isa_kernel, 64)(x)
    expected = reference_linear_int4(x, *quantize_weight_int4(weight, 64), 64)
    assert torch.isnan(got[1:3]).all() and torch.isnan(expected[1:3]).all()
    assert torch.equal(got[[0, 3]], expected[[0, 3]])


def test_the_kernel_refuses_a_wrong_width_or_group(kernel):
    layer = Int4Linear(torch.randn(16, 64), kernel, 32)
    with pytest.raises(RuntimeError, match="input width 25 does not match the weight.s 64"):
        layer(torch.randn(1, 1, 25))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel.linear4(torch.randn(1, 64), layer.packed, layer.scale, 64, 16, 16, False)
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_weight_int4(torch.randn(16, 64), 48)


def test_the_pool_runs_an_int4_linear_with_any_thread_count_to_the_same_bits(isa_kernel):
    weight, x = torch.randn(1000, 1024), torch.randn(2, 1, 1024)
    layer = Int4Linear(weight, isa_kernel, 64)
    expected = reference_linear_int4(x, *quantize_weight_int4(weight, 64), 64)
    saved = isa_kernel.parallel()
    try:
        for threads in (1, 2, 4):
            isa_kernel.set_parallel(threads, saved[1], False)
            assert torch.equal(layer(x), expected)
    finally:
        isa_kernel.set_parallel(saved[0], saved[1], bool(saved[2]), saved[3], saved[4])


@pytest.mark.parametrize("scheme,group", [("int4", 64), ("int4-g32", 32), ("int4-g128", 128)])
def test_an_int4_model_quantizes_every_decoder_linear(mono_checkpoint, kernel, scheme, group):
    model = MusicGen.from_pretrained(mono_checkpoint, quantize=scheme)
    assert quantization_backend(model.decoder) == f"int4-g{group}"
    layers = [m for m in model.decoder.modules() if isinstance(m, Int4Linear)]
    # per layer: fused qkv, out, cross q/k/v/out, fc1, fc2; and the fused heads. No float linear is left.
    assert len(layers) == 8 * model.config.decoder.num_hidden_layers + 1
    assert not any(isinstance(m, FastLinear) for m in model.decoder.modules())
    assert model.generate("warm lofi beat", frames=6).codes.shape == (1, 4, 6)


@pytest.mark.parametrize("scheme", ["int4", "int4-g128"])
def test_the_cpp_layers_step_int4_bit_for_bit_like_the_python_layers(mono_checkpoint, kernel, scheme):
    model = MusicGen.from_pretrained(mono_checkpoint, quantize=scheme, kv_dtype=torch.float32)
    assert len(model.decoder.layer_steps) == model.config.decoder.num_hidden_layers
    step_cpp_and_python_layers(model)


def test_int4_decoder_is_the_reference_arithmetic_end_to_end(mono_checkpoint, kernel):
    """Swapping every int4 kernel call for `reference_linear_int4` (GELU left to torch on both sides) leaves
    the model's logits bit-identical."""
    model = MusicGen.from_pretrained(mono_checkpoint, quantize="int4")
    for layer in model.decoder.modules():
        if isinstance(layer, Int4Linear):
            layer.applies_gelu = False
    quantize.build_layer_steps(model.decoder, kernel)
    conditioning = model.encode_text(["warm lofi beat"])[0]
    states = [model.start_sequence(conditioning, model.default_sampling(greedy=True), total_frames=12)
              for _ in range(2)]
    for _ in range(5):
        model.step(states[:1])
        model.step(states[1:])
    columns = states[0].pending_columns()

    class Reference(torch.nn.Module):
        def __init__(self, layer: Int4Linear):
            super().__init__()
            self.group = layer.group
            self.values, self.scales = unpack_int4(layer.packed, layer.scale, layer.out_features, layer.in_features)

        def forward(self, x):
            return reference_linear_int4(x, self.values, self.scales, self.group)

    with torch.inference_mode():
        fast = model.decoder([columns], [states[0].cache], [states[0].cross])[0]
        for name, module in list(model.decoder.named_modules()):
            if isinstance(module, Int4Linear):
                quantize._replace(model.decoder, name, Reference(module))
        model.decoder.layer_steps = None
        slow = model.decoder([columns], [states[1].cache], [states[1].cross])[0]
    assert torch.equal(fast, slow)


def test_int4_without_the_kernel_fails_and_says_why(mono_checkpoint, monkeypatch):
    monkeypatch.setattr(quantize, "load_int8_kernel", lambda: None)
    monkeypatch.setattr(quantize, "int8_kernel_failure", lambda: "no compiler")
    with pytest.raises(ValueError, match="quantize=int4 needs our int4 kernel.*no compiler"):
        MusicGen.from_pretrained(mono_checkpoint, quantize="int4")


def test_an_int4_server_says_so_in_model_info(mono_checkpoint, kernel):
    from server_harness import ServerThread

    with ServerThread(MusicGen.from_pretrained(mono_checkpoint, quantize="int4")) as server:
        info = server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.dtype == "int4"
