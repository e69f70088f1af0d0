"""The committed generated code must match protos/: regenerate into a temp dir and compare."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["teacher_pb2.py", "teacher_pb2_grpc.py", "teacher_pb2.pyi"]


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(ROOT / "protos/kdserve/v1/teacher.proto")],
        check=True,
    )
    stale = [f for f in GENERATED
             if (tmp_path / "kdserve/v1" / f).read_text() != (ROOT / "kdserve/v1" / f).read_text()]
    assert not stale, f"regenerate with `python -m kdserve.gen_proto`: stale {stale}"
