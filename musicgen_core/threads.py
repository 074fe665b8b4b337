"""How the decoder's threads share a CPU that is never idle (a DAW, a browser, another server beside us).

Measured on the 2-core AVX2 EPYC (BENCHMARKS.md, "Shared CPU"): with OpenMP's fixed shares and libgomp's
default spinning, one busy process beside the server made an int8 step 4-5x slower. The policy here:

- The int8 kernel's linears and the C++ layer's attention run on the kernel's elastic pool
  (kernels/elastic_pool.h): a thread that is descheduled just does less work, nobody waits for it.
  `KERNEL_SPIN_US` is how long its idle threads spin before they sleep; during a step (a burst of ~150
  regions, `pooled_step`) they spin up to `KERNEL_BURST_SPIN_US` between regions unless one of them has lately
  been preempted while spinning (another process wants the core): sleeping and waking per region cost the
  2-core Xeon 3-4 ms of a 25 ms step.
- During a one-column step torch runs single-threaded on the stepping thread (`pooled_step`), so no OpenMP
  team of torch's competes with the pool for the cores.
- libgomp, which still runs everything else (codec, text encoder, prefill), spins `GOMP_SPINCOUNT` times after
  a parallel region instead of its default 300,000 (milliseconds of a core taken from whoever else needs it).
  libgomp reads it once, when torch loads it: `apply_gomp_policy` must run before the first `import torch`;
  `musicgen_core` calls it on import, and the entry points import `musicgen_core` first. A value the user
  set in the environment is kept.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

GOMP_SPINCOUNT = "10000"
KERNEL_SPIN_US = 20
KERNEL_BURST_SPIN_US = 1000

_gomp_policy: dict[str, str | bool] | None = None


def apply_gomp_policy() -> dict[str, str | bool]:
    """Set libgomp's spin count for this process unless torch (and so libgomp) is already loaded; what
    libgomp runs under, and whether we set it in time."""
    global _gomp_policy
    if _gomp_policy is None:
        in_time = "torch" not in sys.modules
        if in_time:
            os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
        _gomp_policy = {"gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "libgomp default"),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
                        "set_before_torch": in_time}
    return _gomp_policy


def set_threads(threads: int) -> None:
    """Threads for torch and for the int8 kernel's pool (the caller included)."""
    import torch

    from .int8_kernel import loaded_int8_kernel

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    kernel = loaded_int8_kernel()
    if kernel is not None:
        kernel.set_parallel(threads, KERNEL_SPIN_US, False, burst_spin_us=KERNEL_BURST_SPIN_US)


def thread_policy() -> dict[str, object]:
    """The policy in effect, read back from torch and the kernel (for the log, ModelInfo and the tests)."""
    import torch

    from .int8_kernel import loaded_int8_kernel

    kernel = loaded_int8_kernel()
    policy: dict[str, object] = {"torch_threads": torch.get_num_threads(), **apply_gomp_policy()}
    if kernel is not None:
        pool_threads, spin_us, uses_openmp, _, burst_spin_us = kernel.parallel()
        policy.update(kernel_threads=pool_threads, kernel_spin_us=spin_us, kernel_burst_spin_us=burst_spin_us,
                      kernel_parallel="openmp" if uses_openmp else "elastic pool")
    return policy


@contextlib.contextmanager
def torch_single_threaded() -> Iterator[None]:
    """torch at one thread on this thread (restored after), for work too small to share: a team woken for it
    spins on (GOMP_SPINCOUNT) on the core the kernel's pool needs for the next step."""
    import torch

    saved = torch.get_num_threads()
    if saved == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def pooled_step() -> Iterator[None]:
    """A one-column step (or a short prefill chunk) that the kernel's pool runs: torch at one thread on this
    thread (a team of torch's would spin on the cores the pool works on) and the pool in a burst (its helpers
    stay hot between the step's regions), both undone after."""
    import torch

    from .int8_kernel import loaded_int8_kernel

    kernel = loaded_int8_kernel()
    saved = torch.get_num_threads()
    if kernel is None or kernel.parallel()[2]:  # (an A/B run on OpenMP keeps torch's threads)
        yield
        return
    if saved != 1:
        torch.set_num_threads(1)
    kernel.begin_burst()
    try:
        yield
    finally:
        kernel.end_burst()
        if saved != 1:
            torch.set_num_threads(saved)
