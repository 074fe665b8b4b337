"""Session-wide pytest fixtures: tiny random-weight MusicGen checkpoints in the published layout.

Built once per test session under ``tmp_path_factory`` by ``tests/checkpoints.py`` (nothing is downloaded).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# No network in tests: everything is built locally. Set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402
import torch  # noqa: E402

from checkpoints import make_checkpoint, train_spiece_model  # noqa: E402

torch.set_num_threads(2)


def _runnable_isas() -> list[str]:
    from musicgen_core.cpu import cpu_flags
    from musicgen_core.int8_kernel import runnable_isas
    return runnable_isas(cpu_flags())


@pytest.fixture(scope="module", params=_runnable_isas() or [None])
def isa_kernel(request):
    """The kernel extension built for each instruction set this CPU can run, best first: on the AVX-512 Xeon
    the AVX2 build as well, so every x86 machine of the project tests the AVX2 kernels."""
    from musicgen_core.int8_kernel import load_int8_kernel
    if request.param is None:
        pytest.skip("neither AVX2 nor AVX-512 VNNI on this CPU")
    module = load_int8_kernel(request.param)
    assert module.isa() == request.param
    return module


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("musicgen_checkpoints")


@pytest.fixture(scope="session")
def spiece_model(checkpoint_root) -> Path:
    """The tiny T5 sentencepiece model shared by every checkpoint of the session."""
    return train_spiece_model(checkpoint_root / "spiece" / "spiece.model")


@pytest.fixture(scope="session")
def checkpoint_factory(checkpoint_root, spiece_model):
    """``factory(name, **make_checkpoint_kwargs) -> Path``; built once per name for the whole session."""
    built: dict[str, tuple[dict, Path]] = {}

    def factory(name: str, **kwargs) -> Path:
        if name in built:
            if built[name][0] != kwargs:
                raise ValueError(f"checkpoint {name!r} already built with {built[name][0]}, asked for {kwargs}")
            return built[name][1]
        path = make_checkpoint(checkpoint_root / name, spiece_model=spiece_model, **kwargs)
        built[name] = (kwargs, path)
        return path

    return factory


@pytest.fixture(scope="session")
def mono_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("mono")


@pytest.fixture(scope="module")
def mono_model(mono_checkpoint):
    """The mono checkpoint loaded (float32), once per test module."""
    from musicgen_core import MusicGen
    return MusicGen.from_pretrained(mono_checkpoint)


@pytest.fixture(scope="module")
def mono_server(mono_model):
    """A real gRPC server on loopback serving `mono_model`, once per test module."""
    from server.engine import EngineConfig
    from server_harness import ServerThread
    with ServerThread(mono_model, EngineConfig(max_sessions=8)) as running:
        yield running


@pytest.fixture(scope="session")
def stereo_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("stereo", stereo=True)


@pytest.fixture(scope="session")
def weight_g_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("weight_g", weight_norm_names="weight_g")


@pytest.fixture(scope="session")
def proj_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("proj", text_width=32, decoder_width=48)


@pytest.fixture(scope="session")
def wide_ffn_checkpoint(checkpoint_factory) -> Path:
    """A feed-forward as wide as a published model's decoder layers take the float kernel (ffn_dim >= 1024)."""
    return checkpoint_factory("wide_ffn", ffn_dim=1024)


@pytest.fixture(scope="session")
def sharded_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("sharded", sharded=True)
