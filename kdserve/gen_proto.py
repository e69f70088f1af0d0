"""Regenerate kdserve/v1 from protos/: ``python -m kdserve.gen_proto`` (needs grpcio-tools)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={ROOT}",
         f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}", str(ROOT / "protos/kdserve/v1/teacher.proto")],
        check=True,
    )


if __name__ == "__main__":
    main()
