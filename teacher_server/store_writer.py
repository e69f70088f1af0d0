"""The served teacher's store upkeep thread: write-back, timed flushes, refreshes.

The event loop only appends a forward's outputs to a queue bounded by bytes (``store.queue_bytes``:
past it, rows are dropped and counted, never blocking a request); this thread splits them into rows
and ``put``s them into their spec's store, which flushes a shard at ``store.shard_bytes``; a store
with rows buffered for ``store.flush_s`` is flushed, and every store is re-listed each
``store.refresh_s`` (shards other replicas, restarts or jobs committed). ``close`` writes what is
queued and flushes everything: the frontends call it at shutdown, and ``atexit`` does in case they
did not get to.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque

from kdserve.errors import one_line

log = logging.getLogger("kdserve.teacher.store")
TICK_S = 1.0  # the thread wakes at least this often to check flush and refresh deadlines


class WriteBack:
    """Owned by a ``target_store.TeacherStore`` (``front``), whose ``store_for`` opens spec stores."""

    def __init__(self, front, opts, rows_of):
        self.front, self.opts, self.rows_of = front, opts, rows_of  # rows_of(outputs, n): target_store's
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self.pending = 0  # bytes queued and not yet put
        self._closed = False
        self._dirty: dict[int, tuple[float, object]] = {}  # id(store) -> (first unflushed put, store)
        self._refreshed = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kdserve-store-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def submit(self, spec_text: str, keys: list[str], outputs: dict, nbytes: int) -> bool:
        """Queue one request's outputs; False (rows dropped) when the queue is full or closed."""
        with self._cv:
            if self._closed or self.pending + nbytes > self.opts.queue_bytes:
                self.front.event("drop", len(keys))
                return False
            self._queue.append((spec_text, keys, outputs, nbytes))
            self.pending += nbytes
            self._cv.notify()
        return True

    def close(self, timeout_s: float = 120.0) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout_s)
        atexit.unregister(self.close)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closed, timeout=TICK_S)
                items, closing = list(self._queue), self._closed
                self._queue.clear()
            for item in items:
                self._put(*item)
            self._upkeep(closing)
            if closing:
                return

    def _put(self, spec_text: str, keys: list[str], outputs: dict, nbytes: int) -> None:
        try:
            store = self.front.store_for(spec_text)
            if store is None:
                self.front.event("drop", len(keys))
                return
            flushed = store.put(keys, self.rows_of(outputs, len(keys)))
            self.front.event("write", len(keys))
            if flushed is None:
                self._dirty.setdefault(id(store), (time.monotonic(), store))
            else:
                self._dirty.pop(id(store), None)
        except Exception as e:  # the store is down: this forward's rows are lost, the teacher is not
            log.warning("target store %s: write-back failed: %s", self.front.uri, one_line(e))
            self.front.event("error")
        finally:
            with self._cv:
                self.pending -= nbytes

    def _upkeep(self, closing: bool) -> None:
        """Flush stores whose oldest buffered row is ``flush_s`` old (all of them when closing), and
        re-list every store each ``refresh_s``."""
        now = time.monotonic()
        for key, (since, store) in list(self._dirty.items()):
            if closing or now - since >= self.opts.flush_s:
                self._dirty.pop(key, None)
                self._guard(store.flush, "flush")
        if not closing and now - self._refreshed >= self.opts.refresh_s:
            self._refreshed = now
            for store in self.front.open_stores():
                self._guard(store.refresh, "refresh")

    def _guard(self, call, what: str) -> None:
        try:
            call()
        except Exception as e:
            log.warning("target store %s: %s failed: %s", self.front.uri, what, one_line(e))
            self.front.event("error")
