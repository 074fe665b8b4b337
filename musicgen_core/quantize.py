"""Int8 weights for the decoder's linear layers (dynamic int8 activations, fbgemm on x86 / qnnpack on Arm).

The decoder step is bound by reading its weights (1.7 GB in fp32 for musicgen-small); int8 weights read a
quarter of that. Only the decoder LM is quantized: the text encoder runs once per prompt and the codec is small.
"""

from __future__ import annotations

import platform
import warnings

import torch
from torch import nn

from .decoder import FastLinear, MusicgenDecoder

QUANTIZATIONS = ("int8",)


def quantize_decoder(decoder: MusicgenDecoder, scheme: str) -> None:
    """Replace the decoder's linear layers in place. CPU only (the quantized kernels are CPU kernels)."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {scheme!r}")
    if decoder.layer_norm.weight.device.type != "cpu":
        raise ValueError("int8 quantization runs on the CPU; on a GPU use --dtype bfloat16 or float16")
    if decoder.layer_norm.weight.dtype != torch.float32:
        raise ValueError("int8 quantization starts from float32 weights (load with dtype float32)")
    engine = "qnnpack" if platform.machine().lower() in ("arm64", "aarch64") else "fbgemm"
    torch.backends.quantized.engine = engine
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    targets = [(name, module) for name, module in decoder.named_modules() if isinstance(module, FastLinear)]
    with warnings.catch_warnings():  # torch.ao's eager quantization warns that it moves to torchao
        warnings.simplefilter("ignore")
        for name, module in targets:
            plain = nn.Linear(module.in_features, module.out_features, bias=False)
            plain.weight = module.weight
            plain.qconfig = default_dynamic_qconfig  # per-tensor int8 weights, dynamic int8 activations
            parent_name, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent_name) if parent_name else decoder, child,
                    DynamicInt8Linear.from_float(plain))


def is_quantized(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())
