"""The served teacher's persistent target store (TeacherConfig ``store``; docs/store.md).

The Coalescer asks it after its in-memory TargetCache (memory first, then the store): a request
whose EVERY sample the store holds is answered from it, its rows stacked back into the batch
outputs, bit-identical to the forward that wrote them; any miss forwards the whole request
(partial hits are not split: a forward of the missing rows alone would change the batch, the code
path and, for a text teacher, the padding) and its rows are written back by a background thread
(``store_writer.WriteBack``), off the event loop.

Layout: a served teacher answers many target specs, and a store's manifest names one, so each spec
gets its own store at ``<uri>/<spec_dir(spec)>/`` (its manifest: the teacher's fingerprint and that
``spec_repr``, exactly what a job that reads its targets from a store writes), and ``<uri>/manifest.json``
names the teacher with the spec ``ROOT_SPEC``: a teacher pointed at another teacher's store is
refused at startup (``ConfigError``, one line), before any request. Keys are
``kdserve.store.sample_keys(inputs, spec_repr(request.spec), fingerprint)``, the same a job computes.

A row holds the outputs as computed, in the wire dtype; an int8 output is two tensors, ``<name>``
(int8) and ``<name>@scales`` (float32), so the reply is rebuilt exactly.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Callable

import torch

from kdserve.config import ConfigError
from kdserve.errors import one_line
from kdserve.store.errors import StoreError
from kdserve.store.keys import sample_keys
from kdserve.store.manifest import Manifest
from teacher_server.engine import Quantized, Work
from teacher_server.store_writer import WriteBack

log = logging.getLogger("kdserve.teacher.store")
ROOT_SPEC = "served teacher: one store per target spec, at <spec_dir>/ (sha256 of its spec_repr, 16 hex)"
SCALES = "@scales"  # an int8 output's per-row scales, stored beside it


def spec_dir(spec_text: str) -> str:
    """The sub-store of one target spec: the first 16 hex of the sha256 of its ``spec_repr``."""
    return hashlib.sha256(spec_text.encode()).hexdigest()[:16]


def rows_of(outputs: dict, n: int) -> list[dict[str, torch.Tensor]]:
    """A request's outputs (batch dim 0) as ``n`` rows: views, one dict of tensors per sample."""
    rows: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, v in outputs.items():
        for i, row in enumerate(rows):
            if isinstance(v, Quantized):
                row[name], row[name + SCALES] = v.q[i], v.scales[i]
            else:
                row[name] = v[i]
    return rows


def batch_of(rows: list[dict[str, torch.Tensor]]) -> dict:
    """``rows_of`` undone: each output stacked along a new batch dim 0, int8 ones as Quantized."""
    names = [n for n in rows[0] if not n.endswith(SCALES)]
    out: dict = {}
    for name in names:
        stacked = torch.stack([r[name] for r in rows])
        if name + SCALES in rows[0]:
            out[name] = Quantized(stacked, torch.stack([r[name + SCALES] for r in rows]))
        else:
            out[name] = stacked
    return out


def nbytes_of(outputs: dict) -> int:
    return sum(t.numel() * t.element_size() for v in outputs.values()
               for t in ((v.q, v.scales) if isinstance(v, Quantized) else (v,)))


class TeacherStore:
    """One teacher's view of ``opts.uri``: a TargetStore per target spec, opened on first use.

    ``lookup`` runs in a worker thread (it hashes inputs and may read shards); ``write`` is called on
    the event loop and only queues. ``on_event(kind, n)`` counts "hit"/"miss" samples (a request
    answered from the store / forwarded after asking it), "write"/"drop" rows, and "error"s.
    """

    def __init__(self, opts, fingerprint: str, model: str = "", on_event: Callable[[str, int], None] | None = None):
        from kdserve.store.store import TargetStore  # fsspec: the "store" extra, needed only with a store

        self._open_store, self.opts, self.fingerprint = TargetStore.open, opts, fingerprint
        self.uri = opts.uri.rstrip("/")
        self._on_event = on_event
        self._mode = "read_through" if opts.write else "read"
        self._stores: dict[str, object] = {}  # spec_text -> TargetStore, or the time a read-only open missed
        self._lock = threading.Lock()
        root = Manifest(fingerprint, ROOT_SPEC, dataset={"model": model})
        try:
            self._open_store(self.uri, "write" if opts.write else "read", manifest=root, storage_options=opts.options)
        except (StoreError, OSError) as e:
            raise ConfigError(f"store.uri: {one_line(e)}") from None
        self.writer = WriteBack(self, opts, rows_of)

    # -- the stores, one per spec ------------------------------------------------------------------
    def store_for(self, spec_text: str):
        """The spec's TargetStore, opened (or created) on first use; None when it cannot be used now
        (read-only and missing: tried again after ``refresh_s``; over ``max_specs``)."""
        with self._lock:
            got = self._stores.get(spec_text)
            if got is not None and not isinstance(got, float):
                return got
            if isinstance(got, float) and time.monotonic() - got < self.opts.refresh_s:
                return None
            if got is None and len(self._stores) >= self.opts.max_specs:
                return None
            try:
                store = self._open_store(
                    f"{self.uri}/{spec_dir(spec_text)}", self._mode, manifest=Manifest(self.fingerprint, spec_text),
                    max_bytes=self.opts.max_bytes if self.opts.write else None, storage_options=self.opts.options,
                    cache_bytes=self.opts.cache_bytes, shard_bytes=self.opts.shard_bytes)
            except FileNotFoundError:  # read-only, and nobody filled this spec's store yet
                self._stores[spec_text] = time.monotonic()
                return None
            self._stores[spec_text] = store
            return store

    def open_stores(self) -> list:
        with self._lock:
            return [s for s in self._stores.values() if not isinstance(s, float)]

    # -- the Coalescer's calls ---------------------------------------------------------------------
    def lookup(self, work: Work) -> tuple[list[str] | None, dict | None]:
        """(the work's sample keys, its outputs when the store holds every sample, else None).
        Never raises: a store that fails is a miss (logged, counted as an error)."""
        if not work.spec_text:
            return None, None  # not a wire request (a health probe): no key
        try:
            keys = sample_keys(work.inputs, work.spec_text, self.fingerprint)
            store = self.store_for(work.spec_text)
            rows = store.get(keys) if store is not None and not store.missing(keys) else None
            if rows is not None and all(r is not None for r in rows):  # evicted since missing(): a miss
                self.event("hit", len(keys))
                return keys, batch_of(rows)
        except Exception as e:  # a store down or corrupt must not fail requests the teacher can compute
            log.warning("target store %s: lookup failed, forwarding: %s", self.uri, one_line(e))
            self.event("error")
            return None, None
        self.event("miss", len(keys))
        return keys, None

    def write(self, spec_text: str, keys: list[str], outputs: dict) -> None:
        """Queue a forward's outputs for the writer thread (read-only teachers: nothing)."""
        if self.opts.write:
            self.writer.submit(spec_text, keys, outputs, nbytes_of(outputs))

    def close(self) -> None:
        """Write and flush what is queued, then stop the writer thread (idempotent)."""
        self.writer.close()

    def event(self, kind: str, n: int = 1) -> None:
        if self._on_event is not None and n > 0:
            self._on_event(kind, n)


def from_config(cfg, fingerprint: str, on_event=None) -> TeacherStore | None:
    """The store TeacherConfig ``cfg.store`` asks for, or None when ``store.uri`` is empty."""
    if not cfg.store.uri:
        return None
    return TeacherStore(cfg.store, fingerprint, cfg.model, on_event)
