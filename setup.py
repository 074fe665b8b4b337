"""Build hook: generate the gRPC stubs of protos/musicgen/v1/musicgen.proto into the musicgen/v1 package.

Project metadata lives in pyproject.toml; this file only adds the hook. The generated modules
(musicgen/v1/musicgen_pb2.py, .pyi, musicgen_pb2_grpc.py) are written into the source tree, where an
editable install imports them and from where a regular build copies them into the wheel; git ignores them.

- `pip install .` / wheel builds: `build_py` generates, then copies the package including the new files.
- `pip install -e .`: setuptools' `editable_wheel` runs `build_py` too, but swallows errors of a customised
  `build_py` (a warning only), so `editable_wheel` generates first, where a failure stops the install.
- sdists carry the .proto so a wheel built from one can generate again.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ["musicgen/v1/musicgen.proto"]  # relative to PROTO_ROOT, mirroring the Python package path

_generated = False


def generate_stubs() -> None:
    """Run grpc_tools.protoc once per build: messages, .pyi and service stubs, into ROOT/<package>/."""
    global _generated
    if _generated:
        return
    from grpc_tools import protoc  # a build requirement (pyproject [build-system] requires)

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    for proto in PROTOS:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={ROOT}",
                f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}", str(PROTO_ROOT / proto)]
        print("generating gRPC stubs:", " ".join(args[1:]))
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {proto}")
    _generated = True


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()  # before build_py lists the package's modules, so the new files are copied
        super().run()


class EditableWheelWithStubs(editable_wheel):
    def run(self) -> None:
        generate_stubs()
        super().run()


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        for proto in PROTOS:
            self.mkpath(str(Path(base_dir, "protos", proto).parent))
            self.copy_file(str(PROTO_ROOT / proto), str(Path(base_dir, "protos", proto)))


setup(cmdclass={"build_py": BuildPyWithStubs, "editable_wheel": EditableWheelWithStubs, "sdist": SdistWithProtos})
