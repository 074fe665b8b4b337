"""The kernel's one-query attention (kernels/attention_one.h), which a decode step of an int8 or int4 decoder uses
for its self- and cross-attention: scaled_dot_product_attention's values to float rounding, each (row, head)
computed on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from musicgen_core import MusicGen, int8_kernel
from musicgen_core.int8_kernel import load_int8_kernel

MINIMUM = torch.finfo(torch.float32).min  # how the model masks a text position


@pytest.fixture(scope="module")
def kernel():
    module = load_int8_kernel()
    assert module is not None, int8_kernel.int8_kernel_failure()
    return module


def cache_slice(rows: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, seed: int):
    """Keys and values as a step sees them: the first `length` positions of a larger preallocated cache."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(rows, heads, length + 37, head_dim, generator=generator).to(dtype) for _ in range(2))
    query = torch.randn(rows, heads, 1, head_dim, generator=generator)
    return query, keys[:, :, :length], values[:, :, :length]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 3, 8, 13, 600])
def test_it_equals_sdpa_to_float_rounding(isa_kernel, dtype, length):
    query, keys, values = cache_slice(2, 16, length, 64, dtype, length)
    expected = F.scaled_dot_product_attention(query.to(dtype).float(), keys.float(), values.float())
    got = isa_kernel.attend_one(query, keys, values)
    assert got.dtype == torch.float32 and got.shape == (2, 16, 1, 64)
    assert (got - expected).abs().max() < 2e-6


def test_masked_keys_weigh_nothing_and_a_fully_masked_row_attends_evenly(isa_kernel):
    """The unconditional row of guidance is fully masked (transformers' null conditioning): it averages the
    values evenly, as sdpa does with the mask at float's minimum."""
    query, keys, values = cache_slice(2, 4, 11, 32, torch.float32, 0)
    mask = torch.zeros(2, 1, 1, 11)
    mask[0, ..., 8:] = MINIMUM
    mask[1] = MINIMUM
    got = isa_kernel.attend_one(query, keys, values, mask)
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
    assert (got - expected).abs().max() < 2e-6
    alone = isa_kernel.attend_one(query[:1], keys[:1, :, :8], values[:1, :, :8])
    assert (got[:1] - alone).abs().max() < 2e-6
    assert torch.allclose(got[1], values[1].mean(dim=1, keepdim=True), atol=2e-6)


def test_a_per_head_mask_is_applied_per_head(isa_kernel):
    query, keys, values = cache_slice(1, 4, 9, 16, torch.float32, 1)
    mask = torch.zeros(1, 4, 1, 9)
    mask[0, 2, 0, :5] = MINIMUM
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
    assert (isa_kernel.attend_one(query, keys, values, mask) - expected).abs().max() < 2e-6


def test_any_slice_of_rows_and_heads_gives_the_same_bits(isa_kernel):
    """The C++ layer cuts a step's attention by rows or heads across its threads."""
    query, keys, values = cache_slice(2, 8, 301, 64, torch.float32, 2)
    whole = isa_kernel.attend_one(query, keys, values)
    for rows, heads in ((slice(0, 1), slice(0, 8)), (slice(1, 2), slice(3, 6)), (slice(0, 2), slice(7, 8))):
        part = isa_kernel.attend_one(query[rows, heads], keys[rows, heads], values[rows, heads])
        assert torch.equal(part, whole[rows, heads])


def test_a_head_dim_it_does_not_vectorize_runs_through_sdpa(kernel):
    query, keys, values = cache_slice(2, 3, 7, 12, torch.float32, 3)
    expected = F.scaled_dot_product_attention(query, keys, values)
    assert torch.equal(kernel.attend_one(query, keys, values), expected)


def test_mismatched_shapes_are_refused(kernel):
    query, keys, values = cache_slice(2, 4, 5, 16, torch.float32, 4)
    with pytest.raises(RuntimeError, match="attend_one: query"):
        kernel.attend_one(query, keys, values[:, :, :4])


def test_a_quantized_decoder_steps_through_it_and_a_float_decoder_does_not(mono_checkpoint, kernel):
    assert MusicGen.from_pretrained(mono_checkpoint, quantize="int8").decoder.one_query_attention is not None
    assert MusicGen.from_pretrained(mono_checkpoint).decoder.one_query_attention is None  # transformers' sdpa


def test_an_int8_cache_vector_is_within_half_a_step_of_its_floats(isa_kernel):
    x = torch.randn(2, 3, 5, 64) * torch.logspace(-3, 1, 5)[:, None]  # vectors five decades apart
    x[0, 0, 0] = 0  # a zero vector: scale 0, all zeros
    q, scales = isa_kernel.quantize_kv(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scales.shape == x.shape[:3]
    assert q.abs().amax(dim=-1)[x.abs().amax(dim=-1) > 0].eq(127).all()  # each vector's extreme maps to 127
    assert scales[0, 0, 0] == 0 and q[0, 0, 0].eq(0).all()
    assert ((q.float() * scales[..., None] - x).abs() <= scales[..., None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("length", [1, 5, 37, 600])
def test_it_attends_over_an_int8_cache_as_sdpa_over_the_dequantized_one(isa_kernel, length):
    query, keys, values = cache_slice(2, 16, length, 64, torch.float32, length)
    (k8, key_scales), (v8, value_scales) = isa_kernel.quantize_kv(keys), isa_kernel.quantize_kv(values)
    expected = F.scaled_dot_product_attention(query, k8.float() * key_scales[..., None],
                                              v8.float() * value_scales[..., None])
    got = isa_kernel.attend_one(query, k8, v8, key_scales=key_scales, value_scales=value_scales)
    assert (got - expected).abs().max() < 2e-6


def test_an_int8_cache_comes_with_both_scales(kernel):
    query, keys, values = cache_slice(1, 2, 4, 16, torch.float32, 5)
    k8, key_scales = kernel.quantize_kv(keys)
    with pytest.raises(RuntimeError, match="int8 cache takes key_scales and value_scales"):
        kernel.attend_one(query, k8, k8)
