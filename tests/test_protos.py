"""The committed gRPC stubs are what `grpc_tools.protoc` makes from the committed .proto today."""

from __future__ import annotations

import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO = "protos/specdec/v1/specdec.proto"
GENERATED = ["specdec_pb2.py", "specdec_pb2.pyi", "specdec_pb2_grpc.py"]


def test_stubs_are_fresh(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / "protos/specdec/v1").mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    args = ["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(tmp_path / PROTO)]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "protos/specdec/v1" / name).read_text()
        committed = (ROOT / "protos/specdec/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate with the command at the top of {PROTO}"


def test_stub_imports_are_package_qualified():
    grpc_stub = (ROOT / "protos/specdec/v1/specdec_pb2_grpc.py").read_text()
    assert "from protos.specdec.v1 import specdec_pb2" in grpc_stub
