"""teacher_server.malloc: applied to a fresh process on glibc, left alone when the operator set MALLOC_*;
the idle trimmer hands freed heap back to the OS."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

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


TRIM_SCRIPT = r"""
import ctypes, time
from teacher_server import malloc

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

assert malloc.tune()  # reply-sized blocks stay in the heap: without trimming, freed memory stays too
base = rss_mb()
blocks = [ctypes.create_string_buffer(16 << 20) for _ in range(40)]  # 640 MB of heap, touched
del blocks
held = rss_mb()
trimmer = malloc.start_trimmer(idle_s=0.05, period_s=3600)
malloc.note_activity()  # a request came, then none: the teacher is idle
for _ in range(400):
    if trimmer.trims:
        break
    time.sleep(0.05)
print(round(base), round(held), round(rss_mb()), trimmer.trims)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_idle_trimmer_returns_freed_heap_to_the_os():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    base, held, after, trims = map(int, out)
    assert held - base > 500  # the thresholds kept the freed blocks: RSS stayed up
    assert trims == 1 and after - base < 100  # one idle trim gave them back
