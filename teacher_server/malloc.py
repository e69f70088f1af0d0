"""glibc malloc settings for a teacher process: reply-sized buffers stay in the heap.

A teacher allocates and frees buffers the size of its replies on every request (the forward's
outputs, the reply's bytes). glibc serves blocks above its mmap threshold with fresh mmaps and
trims freed memory at the top of the heap back to the OS, so with its defaults each request
page-faults megabytes in again. Fixed thresholds keep such blocks in the heap for reuse: the
plain gRPC teacher with 16 MB replies x 4 clients moved 550 -> 711-771 MB/s (A/B, 5 alternating
rounds). A bare gRPC echo gains from them too, so ``python -m bench`` gives its echo the same
settings and P4's ratios do not count them. The price: the heap keeps up to ``TRIM_THRESHOLD``
of freed memory instead of returning it.

``tune()`` applies them to the running process (the plain gRPC server's CLI and each Ray Serve
replica call it); ``ENV`` passes them to processes started with them (tritonserver and its Python
stubs, see teacher_server/triton/launch.py; ``k8s/triton-deployment.yaml`` sets the same). A
``MALLOC_*`` variable already in the environment wins: the operator chose.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before returning it to the OS
TOP_PAD = 64 << 20  # extra memory asked for each time the heap grows

ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h


def tune() -> bool:
    """Apply the settings to this process; False where they do not apply (not glibc, or the
    environment already sets a ``MALLOC_*`` variable)."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))


__all__ = ["ENV", "tune"]
