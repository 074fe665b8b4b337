"""Our int8 matrix-vector kernel for the decoder's few-row steps, and the module that uses it.

The decoder step reads every weight once for a handful of rows, so its speed is the speed of streaming the
weights. fbgemm's dynamic int8 linear reaches 8-15 GB/s here at 2 rows; `kernels/int8_gemv.cpp` (AVX-512 VNNI,
or AVX2 + FMA on CPUs without it) reaches 16-21 GB/s with VNNI, near the machine's read bandwidth, and quantizes
activations per row and weights per output channel, which halves the error of fbgemm's per-tensor scheme. Both
instruction sets compute the same int32 sums, so both equal `reference_linear` bit for bit.

The C++ source is compiled on first use with the machine's own instruction set (torch.utils.cpp_extension,
which needs a C++ compiler and ninja) into a cache directory keyed by the source, torch and the CPU.
Where that is impossible (no compiler, neither AVX2 nor AVX-512 VNNI) `load_int8_kernel` returns None and says why, and
`quantize_decoder` falls back to fbgemm.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from .cpu import cpu_flags
from .threads import KERNEL_BURST_SPIN_US, KERNEL_SPIN_US

SOURCE = Path(__file__).resolve().parent / "kernels" / "int8_gemv.cpp"
# The kernel's instruction sets, best first, with the CPU flags each needs (compiled with -march=native, the
# build uses the best one the machine has).
KERNEL_ISAS = {"avx512-vnni": ("avx512f", "avx512bw", "avx512_vnni"), "avx2": ("avx2", "fma")}
OUTPUT_BLOCK, INPUT_BLOCK = 16, 8  # the packed layout pads outputs and inputs to these
# -ffp-contract=off: a multiply then an add stays two roundings (the int4 kernel's group sums are specified that
# way, and reference_linear_int4 computes them so), never an FMA the compiler chose.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")
# A build for an instruction set below the CPU's best (the tests run the AVX2 kernels on an AVX-512 machine too):
# -march=native without these extensions.
ISA_CFLAGS = {"avx512-vnni": (), "avx2": ("-mno-avx512f",)}
STALE_LOCK_SECONDS = 600  # a build takes ~30 s; a lock this old was left by a process that died building

log = logging.getLogger(__name__)
_kernel = None
_failure: str | None = None


def kernel_build_directory(cflags: tuple[str, ...] = CFLAGS) -> Path:
    """One directory per (source, torch, flags, CPU): a kernel built with -march=native must not meet another CPU."""
    identity = hashlib.sha256()
    for source in sorted(SOURCE.parent.iterdir()):  # the .cpp and the headers it includes
        if source.suffix in (".cpp", ".h"):
            identity.update(source.name.encode() + source.read_bytes())
    identity.update(torch.__version__.encode())
    identity.update(" ".join(cflags).encode())
    identity.update(" ".join(sorted(cpu_flags())).encode())
    root = Path(os.environ.get("MUSICGEN_KERNEL_DIR", Path.home() / ".cache" / "musicgen-live" / "kernels"))
    return root / identity.hexdigest()[:16]


def load_int8_kernel(isa: str | None = None):
    """The compiled kernel module, or None (see `int8_kernel_failure` for why). Compiles once per machine
    (about 30 s), then loads from the cache. isa: a build for that instruction set rather than the CPU's best
    (one of `runnable_isas()`; the tests hold every kernel the CPU can run to the reference); only the default
    build is the process's kernel (`loaded_int8_kernel`)."""
    global _kernel, _failure
    if isa is not None and isa != kernel_isa(cpu_flags()):
        return _load_variant(isa)
    if _kernel is not None or _failure is not None:
        return _kernel
    isa = kernel_isa(cpu_flags()) if platform.machine().lower() in ("x86_64", "amd64") else None
    if isa is None:
        _failure = f"this CPU lacks {', '.join(KERNEL_ISAS['avx2'])} (and AVX-512 VNNI)"
        return None
    try:
        module = _import_or_build(CFLAGS)
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, and say so
        _failure = f"building {SOURCE.name} failed: {str(error).strip().splitlines()[-1] if str(error) else error!r}"
        log.warning("our kernel is unavailable (%s): int8 uses fbgemm, float decoders step through torch", _failure)
        return None
    if module.isa() != isa:
        _failure = f"the compiler built the {module.isa()} kernel where this CPU has {isa}"
        return None
    log.info("int8 kernel: %s", isa)
    module.set_parallel(torch.get_num_threads(), KERNEL_SPIN_US, False, burst_spin_us=KERNEL_BURST_SPIN_US)
    _kernel = module
    return _kernel


_variants: dict[str, object] = {}


def _load_variant(isa: str):
    """A build for `isa` below the CPU's best (raises where the CPU cannot run it or the build fails)."""
    if isa not in runnable_isas(cpu_flags()):
        raise ValueError(f"this CPU cannot run the {isa} kernel (it runs {runnable_isas(cpu_flags())})")
    if isa not in _variants:
        module = _import_or_build(CFLAGS + ISA_CFLAGS[isa])
        if module.isa() != isa:
            raise RuntimeError(f"the {isa} build came out {module.isa()}")
        module.set_parallel(torch.get_num_threads(), KERNEL_SPIN_US, False, burst_spin_us=KERNEL_BURST_SPIN_US)
        _variants[isa] = module
    return _variants[isa]


def _import_or_build(cflags: tuple[str, ...]):
    directory = kernel_build_directory(cflags)
    name = f"musicgen_int8_{directory.name}"
    return _import_built(name, directory / f"{name}.so") or _build(name, directory, cflags)


def loaded_int8_kernel():
    """The kernel module if this process has loaded it (nothing is built or loaded here)."""
    return _kernel


def kernel_isa(flags: frozenset[str] | set[str]) -> str | None:
    """The kernel's instruction set for a CPU with these flags (the best it has), or None."""
    runnable = runnable_isas(flags)
    return runnable[0] if runnable else None


def runnable_isas(flags: frozenset[str] | set[str]) -> list[str]:
    """Every kernel instruction set a CPU with these flags can run, best first."""
    return [isa for isa, needed in KERNEL_ISAS.items() if all(flag in flags for flag in needed)]


def _import_built(name: str, library: Path):
    """A finished build of this very source (the directory is keyed by it): imported without ninja or the
    build lock. None when there is none, or it does not load (a build cut short)."""
    if not library.exists():
        return None
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError as error:
        log.warning("int8: %s does not load (%s); building it again", library, error)
        library.unlink(missing_ok=True)
        return None


def _build(name: str, directory: Path, cflags: tuple[str, ...]):
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"  # torch's build lock; it waits for it to go, without a time limit
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        log.warning("int8: removing %s, left by a build that did not finish", lock)
        lock.unlink(missing_ok=True)
    log.warning("int8: compiling the kernel for this CPU, once (about 30 s), into %s", directory)
    return load(name=name, sources=[str(SOURCE)], build_directory=str(directory),
                extra_cflags=list(cflags), verbose=False)


def int8_kernel_failure() -> str | None:
    return _failure


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values in [-127, 127] and one float32 scale per output row (max |w| / 127)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.empty(weight.shape, dtype=torch.int8)
    for start in range(0, weight.shape[0], 256):  # in slices: no full-size float temporaries
        rows = slice(start, start + 256)
        values[rows] = torch.round(weight[rows] / scale[rows, None]).clamp_(-127, 127)
    return values, scale


def pack(values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 (out, in) -> (packed [out/16, in/4, 16, 4], rowsum int32 [out padded], scale [out padded]), zero-padded
    to whole blocks: the order in which vpdpbusd reads 4 inputs for each of 16 outputs."""
    out, width = values.shape
    out_padded = -(-out // OUTPUT_BLOCK) * OUTPUT_BLOCK
    in_padded = -(-width // INPUT_BLOCK) * INPUT_BLOCK
    padded = torch.zeros(out_padded, in_padded, dtype=torch.int8)
    padded[:out, :width] = values
    packed = padded.view(out_padded // 16, 16, in_padded // 4, 4).permute(0, 2, 1, 3).contiguous()
    scales = torch.ones(out_padded, dtype=torch.float32)
    scales[:out] = scale
    return packed, padded.sum(dim=1, dtype=torch.int32), scales


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization: (..., in) float -> (rows, in) int64 in [-127, 127] and the
    per-row scale (max |x| / 127, or 1 for a zero row; NaN for a row holding a NaN or an infinity, whose
    outputs then all come out NaN)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    finite = torch.isfinite(flat).all(dim=1)
    peak = flat.abs().amax(dim=1)
    row_scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    row_scale = torch.where(finite, row_scale, torch.full_like(row_scale, float("nan")))
    quantized = torch.round(flat * (1 / row_scale)[:, None])
    return torch.where(finite[:, None], quantized, torch.zeros_like(quantized)).to(torch.int64), row_scale


def reference_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch, operation for operation (the specification the tests hold it to):
    per-row int8 activations, exact integer dot products, then the weight scale, then the row scale."""
    quantized, row_scale = quantize_rows_reference(x)
    dots = quantized @ values.to(torch.int64).T
    y = dots.float() * scale[None, :] * row_scale[:, None]
    return y.reshape(*x.shape[:-1], values.shape[0])


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights (per output channel) run by our kernel. applies_gelu: the
    kernel applies GELU to the outputs too (erf form, a rational erf within ~1e-7 of torch's), on the thread
    that computed them: 1.4 ms less per musicgen-small step than a separate F.gelu on the dev box."""

    def __init__(self, weight: torch.Tensor, kernel, applies_gelu: bool = False):
        super().__init__()
        self.applies_gelu = applies_gelu
        self.out_features, self.in_features = weight.shape
        values, scale = quantize_weight(weight)
        packed, rowsum, scales = pack(values, scale)
        self.register_buffer("packed", packed)
        self.register_buffer("rowsum", rowsum)
        self.register_buffer("scale", scales)
        self._kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel.linear(x, self.packed, self.rowsum, self.scale, self.in_features, self.out_features,
                                   self.applies_gelu)

    def extra_repr(self) -> str:
        gelu = ", then GELU" if self.applies_gelu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel{gelu}"


# -- int4 weights ------------------------------------------------------------------------------------------

INT4_GROUPS = (32, 64, 128)  # inputs per weight scale


def quantize_weight_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int4 values in [-8, 7] (int8 storage) and one bfloat16 scale per `group` inputs of each
    output row, (out, ceil(in / group)); the last group is zero-padded. Per group the value of largest
    magnitude maps to -8 (scale = that value / -8, rounded to bfloat16: the extreme comes back within 0.4%), so
    all 16 levels are used; every value rounds to the nearest level of the stored scale. bfloat16 scales are
    half the bytes of float32 ones (at group 64, 5% of what a step reads) and keep float32's range (a group
    whose scale rounds to 0, all below ~1e-39, gets scale 1 and values 0, as an all-zero group does)."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {group}")
    weight = weight.detach().float()
    out, width = weight.shape
    groups = -(-width // group)
    values = torch.empty(out, groups * group, dtype=torch.int8)
    scales = torch.empty(out, groups, dtype=torch.bfloat16)
    for start in range(0, out, 256):  # in slices: no full-size float temporaries
        rows = weight[start: start + 256]
        padded = torch.zeros(rows.shape[0], groups * group)
        padded[:, :width] = rows
        grouped = padded.view(rows.shape[0], groups, group)
        extreme = grouped.gather(2, grouped.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        rounded = (extreme / -8).to(torch.bfloat16).float()  # tested after rounding: below ~1e-39 it is 0
        scale = torch.where(rounded != 0, rounded, torch.ones_like(rounded))
        values[start: start + 256] = torch.round(grouped / scale[..., None]).clamp_(-8, 7).view(rows.shape[0], -1)
        scales[start: start + 256] = scale
    return values[:, :width].contiguous(), scales


def pack_int4(values: torch.Tensor, scales: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 values (out, in) in [-8, 7] and scales (out, groups) -> (packed uint8 [out/16, in/8, 16, 4], scales
    [out/16, groups, 16]): per 16 outputs and 8 inputs, byte j of an output holds input j (low nibble) and
    j + 4 (high) as value + 8. Outputs padded to 16 (scale 1), inputs to the group (value 0)."""
    out, width = values.shape
    groups = scales.shape[1]
    out_padded, in_padded = -(-out // OUTPUT_BLOCK) * OUTPUT_BLOCK, groups * group
    if in_padded < width or in_padded - width >= group:
        raise ValueError(f"scales have {groups} groups of {group}, the values {width} inputs")
    unsigned = torch.full((out_padded, in_padded), 8, dtype=torch.uint8)
    unsigned[:out, :width] = (values + 8).to(torch.uint8)
    halves = unsigned.view(out_padded // 16, 16, in_padded // 8, 2, 4)
    packed = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
    padded_scales = torch.ones(out_padded, groups, dtype=torch.bfloat16)
    padded_scales[:out] = scales
    return packed, padded_scales.view(out_padded // 16, 16, groups).permute(0, 2, 1).contiguous()


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, out: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_int4: -> (values (out, in) int8 in [-8, 7], scales (out, groups))."""
    blocks, eighths = packed.shape[:2]
    halves = torch.stack([packed & 0x0F, packed >> 4], dim=3)  # [out/16, in/8, 16, 2, 4]
    values = halves.permute(0, 2, 1, 3, 4).reshape(blocks * 16, eighths * 8).to(torch.int8) - 8
    return values[:out, :width], scales.permute(0, 2, 1).reshape(blocks * 16, -1)[:out]


def reference_linear_int4(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The int4 kernel's arithmetic in PyTorch (kernels/int4_gemv.h): per-row int8 activations as for int8, an
    exact integer dot product per group, then per group in order `acc = acc + float(dot) * scale`, then the
    row scale."""
    quantized, row_scale = quantize_rows_reference(x)
    out, width = values.shape
    groups = scales.shape[1]
    padded_q = torch.zeros(quantized.shape[0], groups * group, dtype=torch.int64)
    padded_q[:, :width] = quantized
    padded_w = torch.zeros(out, groups * group, dtype=torch.int64)
    padded_w[:, :width] = values.to(torch.int64)
    dots = torch.einsum("mgk,ogk->mog", padded_q.view(-1, groups, group), padded_w.view(out, groups, group))
    acc = torch.zeros(quantized.shape[0], out, dtype=torch.float32)
    for g in range(groups):
        acc = acc + dots[:, :, g].float() * scales[None, :, g].float()
    y = acc * row_scale[:, None]
    return y.reshape(*x.shape[:-1], out)


class Int4Linear(nn.Module):
    """A bias-free linear layer with int4 weights (a bfloat16 scale per `group` inputs of each output) run by our
    kernel; activations per row in int8 as for Int8Linear. applies_gelu as there."""

    def __init__(self, weight: torch.Tensor, kernel, group: int, applies_gelu: bool = False):
        super().__init__()
        self.applies_gelu, self.group = applies_gelu, group
        self.out_features, self.in_features = weight.shape
        packed, scales = pack_int4(*quantize_weight_int4(weight, group), group)
        self.register_buffer("packed", packed)
        self.register_buffer("rowsum", torch.zeros(0, dtype=torch.int32))  # the C++ layer's slot: unused by int4
        self.register_buffer("scale", scales)
        self._kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel.linear4(x, self.packed, self.scale, self.in_features, self.out_features, self.group,
                                    self.applies_gelu)

    def extra_repr(self) -> str:
        gelu = ", then GELU" if self.applies_gelu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}{gelu}"
