"""glibc malloc settings for a teacher process: reply-sized buffers stay in the heap.

A teacher allocates and frees buffers the size of its replies on every request (the forward's
outputs, the reply's bytes). glibc serves blocks above its mmap threshold with fresh mmaps and
trims freed memory at the top of the heap back to the OS, so with its defaults each request
page-faults megabytes in again. Fixed thresholds keep such blocks in the heap for reuse: the
plain gRPC teacher with 16 MB replies x 4 clients moved 550 -> 711-771 MB/s (A/B, 5 alternating
rounds). A bare gRPC echo gains from them too, so ``python -m bench`` gives its echo the same
settings and P4's ratios do not count them. The price: the heap keeps up to ``TRIM_THRESHOLD``
of freed memory instead of returning it, per arena.

So the heap is also trimmed: ``start_trimmer()`` runs a thread that calls glibc's
``malloc_trim(0)`` (every arena's free pages back to the OS) once the teacher has been idle for
``idle_s`` after serving requests, and at most every ``period_s`` while requests keep coming. An
idle trim first runs Python's cyclic garbage collector: a refused request stays referenced from
its exception's traceback (a cycle) until a full collection, which counts objects, not bytes.
Under steady load the thresholds keep their speed; a burst (a fuzzer, an abandoned stream, a
cancelled giant request) leaves no lasting RSS behind. ``note_activity()`` (called for every
request by teacher_server.service) is what tells idle from busy.

``tune()`` applies them to the running process (the plain gRPC server's CLI and each Ray Serve
replica call it); ``ENV`` passes them to processes started with them (tritonserver and its Python
stubs, see teacher_server/triton/launch.py; ``k8s/triton-deployment.yaml`` sets the same). A
``MALLOC_*`` variable already in the environment wins: the operator chose.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import time

MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before returning it to the OS
TOP_PAD = 64 << 20  # extra memory asked for each time the heap grows

ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h


def _libc():
    """glibc's handle, or None (not Linux, or a libc without mallopt/malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # glibc's soname first: find_library runs /sbin/ldconfig in a subprocess, on the trim thread
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
        except (OSError, TypeError):
            return None
    try:
        libc.mallopt, libc.malloc_trim  # noqa: B018  (musl and others have neither)
    except AttributeError:
        return None
    return libc


def tune() -> bool:
    """Apply the settings to this process; False where they do not apply (not glibc, or the
    environment already sets a ``MALLOC_*`` variable)."""
    libc = _libc()
    if libc is None or any(k in os.environ for k in ENV):
        return False
    return all(libc.mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))


_activity = 0  # requests seen by this process (a plain int: += under the GIL is enough here)


def note_activity() -> None:
    """One request more: the trimmer waits for the teacher to be idle."""
    global _activity
    _activity += 1


def trim() -> bool:
    """Give every arena's free memory back to the OS now; False where glibc is absent."""
    libc = _libc()
    return libc is not None and libc.malloc_trim(0) in (0, 1)


class Trimmer:
    """The thread behind ``start_trimmer``: trims after ``idle_s`` without a new request (once
    per burst), or after ``period_s`` of steady load. ``trims`` counts them (tests, logs)."""

    def __init__(self, idle_s: float, period_s: float):
        self.idle_s, self.period_s = idle_s, period_s
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdserve-malloc-trim", daemon=True)

    def start(self) -> "Trimmer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        seen = trimmed = _activity
        last_trim = time.monotonic()
        while not self._stop.wait(self.idle_s):
            now = _activity
            idle = now == seen  # no request for a whole interval
            if now != trimmed and (idle or time.monotonic() - last_trim >= self.period_s):
                if idle:  # a failed request's buffers may sit in a cycle (exception -> traceback -> frame)
                    gc.collect()
                trim()
                self.trims += 1
                trimmed, last_trim = now, time.monotonic()
            seen = now


_trimmer: tuple[int, Trimmer] | None = None  # (pid, thread): one per process, none inherited by a fork


def start_trimmer(idle_s: float = 0.5, period_s: float = 30.0) -> Trimmer | None:
    """Start this process's trimmer (once; later calls return it); None without glibc."""
    global _trimmer
    if _libc() is None:
        return None
    if _trimmer is None or _trimmer[0] != os.getpid():
        _trimmer = (os.getpid(), Trimmer(idle_s, period_s).start())
    return _trimmer[1]


__all__ = ["ENV", "Trimmer", "note_activity", "start_trimmer", "trim", "tune"]
