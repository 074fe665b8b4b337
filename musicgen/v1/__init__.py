"""musicgen.v1 protocol stubs: ``musicgen_pb2`` (messages), ``musicgen_pb2_grpc`` (stub and servicer).

The stubs are generated, not committed: ``pip install [-e] .`` writes them here (setup.py). Run straight
from a source checkout, this module writes them on first import, and rewrites them when the .proto is
newer, which needs grpcio-tools.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_GENERATED = ("musicgen_pb2.py", "musicgen_pb2.pyi", "musicgen_pb2_grpc.py")
_PROTO_ROOT = _PACKAGE_DIR.parent.parent / "protos"  # present in a source checkout only
_PROTO = _PROTO_ROOT / "musicgen" / "v1" / "musicgen.proto"


def generate(out_root: Path) -> None:
    """Compile the .proto into ``out_root/musicgen/v1/`` with grpc_tools (messages, service, .pyi)."""
    from grpc_tools import protoc  # imported here: only generation needs grpcio-tools

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{_PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", f"--pyi_out={out_root}", str(_PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {_PROTO} (its errors are printed above)")


def _regenerate_in_place() -> None:
    """Generate into a temporary folder beside this one, then move each file in atomically, so a
    concurrent import never reads a half-written module."""
    with tempfile.TemporaryDirectory(dir=_PACKAGE_DIR, prefix=".protoc-") as tmp:
        generate(Path(tmp))
        for name in _GENERATED:
            os.replace(Path(tmp) / "musicgen" / "v1" / name, _PACKAGE_DIR / name)


def _ensure_generated() -> None:
    paths = [_PACKAGE_DIR / name for name in _GENERATED]
    missing = [path.name for path in paths if not path.exists()]
    if not _PROTO.exists():
        if missing:  # an installed copy without its stubs: nothing to generate them from
            raise ImportError(f"musicgen.v1: generated modules {missing} are missing and {_PROTO} is not "
                              "there to generate them from; reinstall the package (pip install .)")
        return
    stale = not missing and _PROTO.stat().st_mtime > min(path.stat().st_mtime for path in paths)
    if not (missing or stale):
        return
    if not _have_grpc_tools():
        if missing:
            raise ImportError(f"musicgen.v1: generated modules {missing} are missing and grpcio-tools is not "
                              "installed to generate them; run `pip install -e .` (or `pip install "
                              "grpcio-tools`) in the source checkout")
        warnings.warn(f"musicgen.v1: {_PROTO.name} is newer than its generated modules and grpcio-tools is not "
                      "installed to regenerate them; using the old ones", stacklevel=3)
        return
    try:
        _regenerate_in_place()
    except OSError as error:  # e.g. a read-only checkout
        raise ImportError(f"musicgen.v1: cannot write the generated modules into {_PACKAGE_DIR}: {error}") from error


def _have_grpc_tools() -> bool:
    try:
        import grpc_tools.protoc  # noqa: F401
    except ImportError:
        return False
    return True


_ensure_generated()
