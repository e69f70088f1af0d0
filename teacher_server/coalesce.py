"""Continuous batching in front of the engine: whatever queued while a forward ran goes into the next.

``@serve.batch`` closes a batch after ``batch_wait_timeout_s`` even while the previous forward is
still running, so under load requests arriving mid-forward become one-request batches queued
behind it. Both frontends (the Ray Serve deployment and the plain gRPC server) therefore hand
their requests to one Coalescer per engine: a single drain loop forms each next forward from
everything waiting (up to ``max_samples``), picked by a ``FairQueue`` (fair across experiments,
or FIFO), after dropping work whose caller went away and answering cache hits without a forward:
first the in-memory TargetCache, then the persistent target store (``target_store``, TeacherConfig
``store``), asked in a worker thread; what a forward computes goes to both.

Where a forward runs: on a worker thread, so the loop keeps taking requests meanwhile; but one
predicted (from the last forward, scaled by samples x tokens) to take under ``inline_forward_ms``
runs on the loop itself, and a lone request meeting an idle queue is run to completion in its own
handler, because a thread hand-off costs more CPU than such a forward.

Isolation: if a batched forward raises, its members are retried one by one, so only the request
that breaks the forward fails. When it fails alone while others of the same batch succeed, the
fault lies with its inputs: it is refused as InputRejected (a SpecError: INVALID_ARGUMENT).

Bounded resources: each experiment may have at most ``max_requests`` requests and
``max_queued_bytes`` of decoded inputs waiting or computing at once (TeacherConfig
``max_requests_per_experiment`` / ``max_queued_bytes_per_experiment``); beyond that ``submit``
raises ``Overloaded`` (RESOURCE_EXHAUSTED) before anything is queued, so one experiment cannot
fill a shared teacher's memory or handlers.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from teacher_server import malloc
from teacher_server.engine import BatchStats, Work
from teacher_server.fair_queue import FairQueue, Policy
from teacher_server.spec import SpecError, TooLarge, shown
from teacher_server.target_cache import TargetCache
from teacher_server import target_store


class InputRejected(SpecError):
    """The teacher's forward failed on this request alone, while other requests ran fine."""


class Overloaded(TooLarge):
    """An experiment is over its cap of concurrent requests or queued bytes: RESOURCE_EXHAUSTED."""


def work_bytes(w: Work) -> int:
    """Decoded input bytes of ``w``: what holding it in the queue costs."""
    return sum(t.numel() * t.element_size() for t in w.inputs.values())


def work_cost(w: Work) -> int:
    """What serving ``w`` is charged: samples x tokens (tokens = 1 for fixed-size inputs)."""
    ids = w.inputs.get("input_ids")
    return w.samples * (int(ids.shape[1]) if ids is not None and ids.dim() > 1 else 1)


class Coalescer:
    """``await submit(works)`` -> [(outputs, stats, queue_ms)] in order; one forward at a time.

    ``metrics`` (optional, duck-typed like TeacherMetrics) gets ``served(experiment, samples)``
    per request sent to a forward and ``queued(lengths)`` with each experiment's queue length
    after each batch is formed.
    """

    def __init__(
        self,
        run: Callable[[list[Work]], tuple[list, BatchStats]],
        max_samples: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        scheduler: Policy = "fair",
        weights: dict[str, float] | None = None,
        cache: TargetCache | None = None,
        metrics: Any = None,
        max_requests: int = 0,
        max_queued_bytes: int = 0,
        inline_forward_ms: float = 0.0,
        store: target_store.TeacherStore | None = None,
    ):
        self._run = run
        self.max_samples = max_samples
        self._on_batch = on_batch
        self.queue = FairQueue(scheduler, weights)
        self.cache = cache
        self._metrics = metrics
        self._drainer: asyncio.Task | None = None
        self._keys: dict[int, str] = {}  # id(future) -> cache key of its work
        self.store = store
        self._store_keys: dict[int, tuple[str, list[str]]] = {}  # id(future) -> (spec_repr, sample keys)
        self.max_requests = max_requests  # per experiment, 0: no cap
        self.max_queued_bytes = max_queued_bytes
        self.inline_forward_ms = inline_forward_ms
        self._last: tuple[float, int] | None = None  # (compute ms, cost) of the last forward
        self.in_flight: dict[str, list[int]] = {}  # experiment -> [requests, bytes] waiting or computing

    @classmethod
    def from_config(cls, engine, cfg, on_batch=None, metrics=None, cache_events=None) -> "Coalescer":
        """The Coalescer a frontend puts in front of ``engine`` as ``cfg`` (TeacherConfig) says;
        raises ConfigError (one line) when ``cfg.store`` names another teacher's store."""
        sh = cfg.sharing
        cache = TargetCache(sh.cache_bytes, engine.fingerprint, cache_events) if sh.cache_bytes > 0 else None
        store = target_store.from_config(cfg, engine.fingerprint, getattr(metrics, "store_event", None))
        return cls(engine.run, cfg.max_batch_size, on_batch=on_batch, scheduler=sh.scheduler,
                   weights=sh.experiment_weights, cache=cache, metrics=metrics,
                   max_requests=sh.max_requests_per_experiment, max_queued_bytes=sh.max_queued_bytes_per_experiment,
                   inline_forward_ms=sh.inline_forward_ms, store=store)

    def close(self) -> None:
        """At the frontend's shutdown: the target store writes and flushes what it holds."""
        if self.store is not None:
            self.store.close()

    def _admit(self, works: list[Work]) -> list[tuple[str, int]]:
        """Reserve each work's slot and bytes under its experiment's caps, all or none; raises Overloaded."""
        want: dict[str, list[int]] = {}
        for w in works:
            n = want.setdefault(w.experiment, [0, 0])
            n[0] += 1
            n[1] += work_bytes(w)
        for exp, (reqs, nbytes) in want.items():
            held_reqs, held_bytes = self.in_flight.get(exp, (0, 0))
            if self.max_requests and held_reqs + reqs > self.max_requests:
                raise Overloaded(
                    f"experiment {shown(exp)} has {held_reqs} requests in flight, the teacher's cap is "
                    f"{self.max_requests}: send fewer at once (prefetch depth, clients)"
                )
            if self.max_queued_bytes and held_bytes + nbytes > self.max_queued_bytes:
                raise Overloaded(
                    f"experiment {shown(exp)} has {held_bytes / 2**20:.1f} MiB of requests in flight; "
                    f"{nbytes / 2**20:.1f} MiB more is over the teacher's cap of {self.max_queued_bytes / 2**20:.1f} MiB"
                )
        held = []
        for exp, (reqs, nbytes) in want.items():
            cur = self.in_flight.setdefault(exp, [0, 0])
            cur[0] += reqs
            cur[1] += nbytes
            held.append((exp, reqs, nbytes))
        return held

    def _release(self, held) -> None:
        for exp, reqs, nbytes in held:
            cur = self.in_flight[exp]
            cur[0] -= reqs
            cur[1] -= nbytes
            if cur[0] <= 0:
                del self.in_flight[exp]

    async def submit(self, works: list[Work]) -> list[tuple]:
        """Results in the order of ``works``; raises Overloaded when an experiment is over its caps."""
        held = self._admit(works)
        try:
            return await self._submit(works)
        finally:
            self._release(held)  # answered, failed or cancelled: the slot is free again

    async def _submit(self, works: list[Work]) -> list[tuple]:
        loop = asyncio.get_running_loop()
        futures = []
        for w in works:
            f = loop.create_future()
            futures.append(f)
            hit = await self._recall(w, f)
            if hit is not None:  # no forward: the stats say so
                f.set_result((hit, BatchStats(1, w.samples, 0.0, forwards=0), 0.0))
                continue
            self.queue.enqueue(w.experiment, (w, f), work_cost(w), w.samples)
        idle = self._drainer is None or self._drainer.done()
        if idle and len(works) == 1 and len(self.queue) == 1 and self._inline(work_cost(works[0])):
            # Nothing else waits and the forward is short: run it to completion right here, with
            # no drain task nor gather (nothing else runs on the loop meanwhile).
            await self._forward(self._take())
            return [futures[0].result()]
        if idle:
            self._drainer = asyncio.create_task(self._drain())
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def _recall(self, w: Work, f: asyncio.Future) -> dict | None:
        """``w``'s outputs from the cache, else from the store (every sample, in a thread), else None
        with ``f``'s keys noted for ``_settle`` to fill both."""
        key = self.cache.key(w) if self.cache is not None else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        if self.store is not None and w.spec_text:
            keys, hit = await asyncio.to_thread(self.store.lookup, w)
            if hit is not None:
                if key is not None:
                    self.cache.put(key, hit)
                return hit
            if keys is not None:
                self._store_keys[id(f)] = (w.spec_text, keys)
        if key is not None:
            self._keys[id(f)] = key
        return None

    def _take(self) -> list[tuple[Work, asyncio.Future]]:
        """The next forward's requests; cancelled ones (the caller went away) are dropped first."""
        self.queue.discard(lambda item: self._gone(item[1]))
        take = self.queue.next_batch(self.max_samples)
        if self._metrics is not None:
            for w, _ in take:
                self._metrics.served(w.experiment, w.samples)
            self._metrics.queued(self.queue.queue_lengths())
        return take

    def _gone(self, f: asyncio.Future) -> bool:
        if f.done():  # cancelled (or otherwise settled): never computed
            self._keys.pop(id(f), None)
            self._store_keys.pop(id(f), None)
            return True
        return False

    async def _drain(self) -> None:
        while len(self.queue):
            take = self._take()
            if take:
                await self._forward(take)

    async def _forward(self, take: list[tuple[Work, asyncio.Future]]) -> None:
        """One forward for ``take``; settles each of its futures."""
        start = time.perf_counter()
        works = [w for w, _ in take]
        cost = sum(work_cost(w) for w in works)
        try:
            if self._inline(cost):
                results, stats = self._run(works)
            else:  # in a thread: the event loop keeps accepting requests during the forward
                results, stats = await asyncio.to_thread(self._run, works)
        except Exception as e:
            malloc.note_activity()
            self._last = None  # no estimate from a failure: the next forward goes to a thread
            if len(take) == 1:
                self._settle(take[0], error=e)
            else:
                await self._isolate(take, start)
            return
        malloc.note_activity()  # a forward just ended (maybe for callers gone): not idle yet
        self._last = (stats.compute_ms, cost)  # the engine's own time: a hand-off's wait is not in it
        if self._on_batch:
            self._on_batch(stats)
        for item, r in zip(take, results):
            self._settle(item, (r, stats, (start - item[0].enqueued) * 1e3))

    def _inline(self, cost: int) -> bool:
        """Run this forward on the loop? Only when the last one, scaled to ``cost``, was short.
        A thread hand-off costs a wake-up each way plus GIL traffic with the loop: on a small
        CPU about as much as a synthetic forward of one small request, while a model's forward
        (milliseconds) must not stall the loop."""
        if self.inline_forward_ms <= 0 or self._last is None:
            return False
        ms, last_cost = self._last
        return ms * max(1.0, cost / max(1, last_cost)) < self.inline_forward_ms

    async def _isolate(self, take: list[tuple[Work, asyncio.Future]], start: float) -> None:
        """A batched forward failed: each member alone, so only the one at fault fails."""
        answers: list[tuple | BaseException] = []
        for w, f in take:
            if f.done():
                answers.append(asyncio.CancelledError())
                continue
            try:
                (r,), stats = await asyncio.to_thread(self._run, [w])
                if self._on_batch:
                    self._on_batch(stats)
                answers.append((r, stats, (start - w.enqueued) * 1e3))
            except Exception as e:
                answers.append(e)
        some_ok = any(isinstance(a, tuple) for a in answers)
        for item, a in zip(take, answers):
            if isinstance(a, tuple):
                self._settle(item, a)
            elif some_ok and not isinstance(a, SpecError):
                err = InputRejected(f"the teacher failed on this request's inputs: {type(a).__name__}: {a}")
                err.__cause__ = a
                self._settle(item, error=err)
            else:
                self._settle(item, error=a)

    def _settle(self, item: tuple[Work, asyncio.Future], result=None, error: BaseException | None = None) -> None:
        _, f = item
        key = self._keys.pop(id(f), None)
        stored = self._store_keys.pop(id(f), None)
        if f.done():
            return
        if error is not None:
            f.set_exception(error)
            return
        if key is not None and self.cache is not None:
            self.cache.put(key, result[0])
        if stored is not None and self.store is not None:
            self.store.write(*stored, result[0])
        f.set_result(result)
