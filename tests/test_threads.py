"""The thread policy for a shared CPU (musicgen_core/threads.py) is in effect in fresh processes, read back from
the runtime: libgomp's spin count set before torch loaded it, the int8 kernel's elastic pool with the requested
threads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from musicgen_core.int8_kernel import load_int8_kernel
from musicgen_core.threads import GOMP_SPINCOUNT, KERNEL_BURST_SPIN_US, KERNEL_SPIN_US, pooled_step


@pytest.fixture(scope="module")
def kernel():
    module = load_int8_kernel()  # built once here, so the fresh processes below load it from the cache
    if module is None:
        pytest.skip("no int8 kernel on this CPU")
    return module


def fresh_env() -> dict:
    return {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def test_musicgen_generate_runs_under_the_policy(mono_checkpoint, kernel, tmp_path):
    result = subprocess.run([sys.executable, "-m", "musicgen_cli.generate", "--model", str(mono_checkpoint),
                             "--quantize", "int8", "--threads", "2", "--frames", "3",
                             "--out", str(tmp_path / "x.wav")], capture_output=True, text=True, timeout=300,
                            env=fresh_env())
    assert result.returncode == 0, result.stderr
    stats = fields([line for line in result.stderr.splitlines() if line.startswith("frames=")][-1])
    assert stats["gomp_spincount"] == GOMP_SPINCOUNT and stats["set_before_torch"] == "True"
    assert stats["kernel_parallel"] == "elastic-pool"
    assert stats["kernel_threads"] == "2" and stats["torch_threads"] == "2"
    assert stats["kernel_spin_us"] == str(KERNEL_SPIN_US)
    assert stats["kernel_burst_spin_us"] == str(KERNEL_BURST_SPIN_US)


def test_a_spin_count_the_user_set_is_kept(mono_checkpoint, kernel, tmp_path):
    result = subprocess.run([sys.executable, "-m", "musicgen_cli.generate", "--model", str(mono_checkpoint),
                             "--quantize", "int8", "--frames", "2", "--out", str(tmp_path / "x.wav")],
                            capture_output=True, text=True, timeout=300, env={**fresh_env(), "GOMP_SPINCOUNT": "77"})
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("frames=")][-1]
    assert fields(stats)["gomp_spincount"] == "77"


def test_musicgen_server_logs_the_policy_it_runs_under(mono_checkpoint, kernel):
    server = subprocess.Popen([sys.executable, "-m", "server.main", "--model", str(mono_checkpoint), "--quantize",
                               "int8", "--threads", "2", "--port", "0"], stderr=subprocess.PIPE, text=True,
                              env=fresh_env())
    try:
        deadline, line = time.monotonic() + 240, ""
        while time.monotonic() < deadline and "event=threads" not in line:
            line = server.stderr.readline()
            assert line or server.poll() is None, "the server exited before logging its thread policy"
        policy = fields(line.split("event=threads", 1)[1])
        assert policy["gomp_spincount"] == GOMP_SPINCOUNT and policy["set_before_torch"] == "True"
        assert policy["kernel_parallel"] == "elastic-pool" and policy["kernel_threads"] == "2"
    finally:
        server.kill()
        server.wait()


def test_a_pooled_step_runs_torch_single_threaded_in_a_burst_and_restores_both(kernel):
    import torch

    threads = torch.get_num_threads()
    with pooled_step():
        assert torch.get_num_threads() == 1 and kernel.pool_state()[0] == 1
        with pooled_step():  # a nested step keeps the burst open until the outer one ends
            assert kernel.pool_state()[0] == 2
        assert torch.get_num_threads() == 1 and kernel.pool_state()[0] == 1
    assert torch.get_num_threads() == threads and kernel.pool_state()[0] == 0


def test_a_pooled_step_closes_its_burst_when_the_step_raises(kernel):
    with pytest.raises(RuntimeError, match="boom"):
        with pooled_step():
            raise RuntimeError("boom")
    assert kernel.pool_state()[0] == 0
