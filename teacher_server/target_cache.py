"""A teacher-side cache of computed targets, shared by every experiment: a hit skips the forward.

Wrong reuse is the danger, so the key covers everything the outputs depend on: each input
tensor's name, dtype, shape and bytes (the final tensors, i.e. after whatever preprocessing and
augmentation the client applied), the resolved TargetSpec, and the teacher's fingerprint (weights
and server-side preprocessing). Values are the engine's per-request outputs, kept as computed, so
a hit is bit-identical to the forward that filled it. Bounded by bytes, least recently used out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from typing import Callable

import torch

from teacher_server.engine import Quantized, Work
from teacher_server.spec import TargetSpec


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def cache_key(inputs: dict[str, torch.Tensor], spec: TargetSpec, fingerprint: str) -> str:
    """sha256 over the inputs (name, dtype, shape, bytes), the spec and the teacher fingerprint."""
    h = hashlib.sha256()
    h.update(f"fingerprint={fingerprint}\n".encode())
    h.update(f"spec={dataclasses.astuple(spec)!r}\n".encode())
    for name in sorted(inputs):
        t = inputs[name]
        h.update(f"input={name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def outputs_nbytes(outputs: dict) -> int:
    n = 0
    for v in outputs.values():
        if isinstance(v, Quantized):
            n += v.q.numel() * v.q.element_size() + v.scales.numel() * v.scales.element_size()
        else:
            n += v.numel() * v.element_size()
    return n


class TargetCache:
    """LRU of request outputs bounded by ``max_bytes``; thread-safe.

    ``on_event(kind, n)`` is told of every "hit", "miss" and "eviction" (n of them), and of the
    new size after each put ("bytes", n): for metrics.
    """

    def __init__(self, max_bytes: int, fingerprint: str, on_event: Callable[[str, int], None] | None = None):
        if max_bytes <= 0:
            raise ValueError("a TargetCache needs max_bytes > 0 (0 means no cache: do not build one)")
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self._on_event = on_event
        self._lru: OrderedDict[str, tuple[dict, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def key(self, work: Work) -> str:
        return cache_key(work.inputs, work.spec, self.fingerprint)

    def get(self, key: str) -> dict | None:
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        self._event("hit" if hit is not None else "miss")
        return None if hit is None else hit[0]

    def put(self, key: str, outputs: dict) -> None:
        size = outputs_nbytes(outputs)
        if size > self.max_bytes:  # would evict everything and still not fit
            return
        evicted = 0
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._lru[key] = (outputs, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, s) = self._lru.popitem(last=False)
                self.bytes -= s
                evicted += 1
            self.evictions += evicted
        if evicted:
            self._event("eviction", evicted)
        self._event("bytes", self.bytes)

    def __len__(self) -> int:
        return len(self._lru)

    def _event(self, kind: str, n: int = 1) -> None:
        if self._on_event is not None:
            self._on_event(kind, n)
