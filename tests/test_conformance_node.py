"""The .proto stays usable outside Python: a grpc-js client (tests/node/conformance.js, the schema loaded at run
time) drives a real server on loopback through the lifecycle, numbering, a few errors and a same-tick cancel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from musicgen_core import MusicGen
from server.engine import EngineConfig
from server_harness import ServerThread

NODE_DIR = Path(__file__).resolve().parent / "node"
PROTO_ROOT = Path(__file__).resolve().parents[1] / "protos"
STALL_SECONDS = 1.0


@pytest.fixture(scope="module")
def node() -> str:
    """node with grpc-js installed from tests/node/package-lock.json (npm ci on first use)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the conformance test (.ci/run installs them)")
        pytest.skip("node/npm not installed (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True, timeout=300)
    return node


@pytest.fixture(scope="module")
def report(node, mono_checkpoint) -> dict:
    model = MusicGen.from_pretrained(mono_checkpoint)
    with ServerThread(model, EngineConfig(max_sessions=4, stall_timeout_seconds=STALL_SECONDS)) as server:
        done = subprocess.run([node, str(NODE_DIR / "conformance.js"), str(server.running.port), str(PROTO_ROOT)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_model_info_reads_as_documented(report):
    assert report["info"] == {"sample_rate": 32000, "num_codebooks": 4, "dtype": "float32",
                              "stall_timeout_seconds": STALL_SECONDS, "max_duration_seconds": 86400}


def test_a_session_runs_start_to_finish(report):
    lifecycle = report["lifecycle"]
    assert lifecycle["code"] == 0 and lifecycle["first"] == "started" and lifecycle["last"] == "finished"
    assert lifecycle["reason"] == "FINISH_REASON_COMPLETED"


def test_chunk_numbering_holds_in_javascript(report):
    numbering = report["lifecycle"]["numbering"]
    assert numbering["ok"], numbering["problems"]
    assert numbering["chunks"] == 10 and numbering["totalsMatch"]


def test_the_server_picked_seed_survives_a_javascript_number(report):
    assert report["lifecycle"]["seedExactAsNumber"]


def test_stop_ends_with_stopped_and_ok(report):
    assert report["stop"] == {"code": 0, "reason": "FINISH_REASON_STOPPED"}


def test_errors_name_their_field(report):
    errors = report["errors"]
    assert errors["topKMinusOne"]["code"] == 3 and errors["topKMinusOne"]["details"].startswith("start.sampling.top_k: ")
    assert errors["firstNotStart"]["code"] == 9 and errors["firstNotStart"]["details"].startswith("ack: ")
    assert errors["emptyFirst"]["code"] == 3 and errors["emptyFirst"]["details"].startswith("request: ")
    assert all(error["events"] == 0 for error in errors.values())


def test_a_cancel_in_the_same_tick_as_start_does_not_hold_a_session(report):
    """grpc-js never sends this cancel: the server sees a client that does not ack, and frees the session after
    its stall timeout (before the fix it stayed until the client process exited)."""
    cancel = report["cancelInSameTick"]
    assert cancel["mostActive"] == 3  # the server really was left holding them
    assert cancel["active"] == 0 and cancel["seconds"] < STALL_SECONDS + 5
