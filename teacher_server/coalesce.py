"""Continuous batching in front of the engine: whatever queued while a forward ran goes into the next.

``@serve.batch`` closes a batch after ``batch_wait_timeout_s`` even while the previous forward is
still running, so under load requests arriving mid-forward become one-request batches queued
behind it. The Serve deployment therefore hands every ``@serve.batch`` batch to one Coalescer:
a single drain loop takes ALL waiting requests (up to ``max_samples``) for each forward.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from teacher_server.engine import BatchStats, Work


def _samples(w: Work) -> int:
    return next(iter(w.inputs.values())).shape[0]


class Coalescer:
    """``await submit(works)`` -> [(outputs, stats, queue_ms)] in order; one forward at a time."""

    def __init__(
        self,
        run: Callable[[list[Work]], tuple[list, BatchStats]],
        max_samples: int,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        self._run = run
        self.max_samples = max_samples
        self._on_batch = on_batch
        self._pending: list[tuple[Work, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def submit(self, works: list[Work]) -> list[tuple]:
        loop = asyncio.get_running_loop()
        futures = []
        for w in works:
            f = loop.create_future()
            self._pending.append((w, f))
            futures.append(f)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    def _take(self) -> list[tuple[Work, asyncio.Future]]:
        """Oldest first, as many as fit in max_samples (always at least one)."""
        take, n = [], 0
        while self._pending:
            w, f = self._pending[0]
            if f.cancelled():  # the caller went away: no forward for it
                self._pending.pop(0)
                continue
            if take and n + _samples(w) > self.max_samples:
                break
            take.append(self._pending.pop(0))
            n += _samples(w)
        return take

    async def _drain(self) -> None:
        while self._pending:
            take = self._take()
            if not take:
                continue
            start = time.perf_counter()
            try:
                # In a thread: the event loop keeps accepting requests during the forward.
                results, stats = await asyncio.to_thread(self._run, [w for w, _ in take])
            except Exception as e:  # every request of the forward gets the error, the loop goes on
                for _, f in take:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self._on_batch:
                self._on_batch(stats)
            for (w, f), r in zip(take, results):
                if not f.done():
                    f.set_result((r, stats, (start - w.enqueued) * 1e3))
