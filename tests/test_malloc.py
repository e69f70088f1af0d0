"""teacher_server.malloc: applied to a fresh process on glibc, left alone when the operator set MALLOC_*."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tune_in_fresh_process(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", "from teacher_server import malloc; print(malloc.tune())"],
                         env={**env, **env_extra}, capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip()


def test_tune_applies_on_glibc_and_respects_the_environment():
    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert _tune_in_fresh_process({}) == expected  # mallopt accepted every setting
    assert _tune_in_fresh_process({"MALLOC_TOP_PAD_": "0"}) == "False"  # the operator's setting wins
