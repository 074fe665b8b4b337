"""Int8 or int4 weights for the decoder's linear layers, with dynamic int8 activations.

The decoder step is bound by reading its weights (1.7 GB in fp32 for musicgen-small); int8 weights read a
quarter of that, int4 an eighth (plus a scale per group). Only the decoder LM is quantized: the text encoder
runs once per prompt and the codec is small.

Schemes:
- "int8": our kernel (int8_kernel.py: per-channel weights, per-row activations; AVX-512 VNNI or AVX2 + FMA)
  where this CPU and a compiler allow it, otherwise fbgemm (logged once).
- "int8-fbgemm": torch.ao's dynamic quantized Linear (fbgemm on x86, qnnpack on Arm; per-tensor scales).
- "int4-g32", "int4-g64", "int4-g128": our kernel's int4 weights with a bfloat16 scale per 32/64/128 inputs of
  each output (int8_kernel.Int4Linear; AVX2 + FMA). "int4" is int4-g64. No fallback: without the kernel,
  loading fails and says why.
"""

from __future__ import annotations

import logging
import platform
import warnings

import torch
from torch import nn

from .decoder import FastLinear, MusicgenDecoder
from .int8_kernel import Int4Linear, Int8Linear, int8_kernel_failure, load_int8_kernel

INT4_SCHEMES = {"int4": 64, "int4-g32": 32, "int4-g64": 64, "int4-g128": 128}  # scheme -> inputs per scale
QUANTIZATIONS = ("int8", "int8-fbgemm", *INT4_SCHEMES)
log = logging.getLogger(__name__)


def quantize_decoder(decoder: MusicgenDecoder, scheme: str) -> None:
    """Replace the decoder's linear layers in place. CPU only (the quantized kernels are CPU kernels)."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {scheme!r}")
    if decoder.layer_norm.weight.device.type != "cpu":
        raise ValueError("int8 quantization runs on the CPU; on a GPU use --dtype bfloat16 or float16")
    if decoder.layer_norm.weight.dtype != torch.float32:
        raise ValueError("int8 quantization starts from float32 weights (load with dtype float32)")
    # Names only, and each float layer dropped as soon as its int8 copy is in: holding every float weight
    # until the end would keep fp32 and int8 decoders in memory at once (+0.4 GB at musicgen-small's peak).
    targets = [name for name, module in decoder.named_modules() if isinstance(module, FastLinear)]
    kernel = load_int8_kernel() if scheme != "int8-fbgemm" else None
    group = INT4_SCHEMES.get(scheme)
    if group is not None and kernel is None:  # a kernel that loads has AVX2 (load_int8_kernel), so int4 too
        raise ValueError(f"quantize={scheme} needs our int4 kernel, which is unavailable here: "
                         f"{int8_kernel_failure()}")
    if scheme == "int8" and kernel is None:
        log.warning("int8: our kernel is unavailable (%s); using fbgemm", int8_kernel_failure())
    if kernel is not None:
        for name in targets:  # each layer's fc1 is followed by GELU: the kernel applies it
            weight = decoder.get_submodule(name).weight
            gelu = name.endswith(".fc1")
            _replace(decoder, name, Int8Linear(weight, kernel, applies_gelu=gelu) if group is None
                     else Int4Linear(weight, kernel, group, applies_gelu=gelu))
            del weight
        build_layer_steps(decoder, kernel)
        return
    engine = "qnnpack" if platform.machine().lower() in ("arm64", "aarch64") else "fbgemm"
    torch.backends.quantized.engine = engine
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    with warnings.catch_warnings():  # torch.ao's eager quantization warns that it moves to torchao
        warnings.simplefilter("ignore")
        for name in targets:
            module = decoder.get_submodule(name)
            plain = nn.Linear(module.in_features, module.out_features, bias=False)
            plain.weight = module.weight
            plain.qconfig = default_dynamic_qconfig  # per-tensor int8 weights, dynamic int8 activations
            _replace(decoder, name, DynamicInt8Linear.from_float(plain))


def build_layer_steps(decoder: MusicgenDecoder, kernel) -> None:
    """Give a quantized decoder the kernel's C++ one-column step and its Python layers the kernel's attention,
    layer norm and int8 cache quantizer (MusicgenDecoder.use_kernel_layers)."""
    decoder.use_kernel_layers(kernel)


def _replace(root: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, replacement)


def quantization_backend(module: nn.Module) -> str | None:
    """'int8-vnni' (our int8 kernel, either instruction set), 'int4-g<group>' (our int4 kernel), 'int8-fbgemm'
    (torch.ao; qnnpack on Arm) or None for float weights."""
    kinds = {type(m) for m in module.modules()}
    groups = {m.group for m in module.modules() if isinstance(m, Int4Linear)}
    if groups:
        return "int4-g" + "/".join(str(g) for g in sorted(groups))
    if Int8Linear in kinds:
        return "int8-vnni"
    if any(kind.__module__.startswith("torch.ao.nn.quantized") for kind in kinds):
        return "int8-fbgemm"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantization_backend(module) is not None
