"""Coalescer: requests that queue while a forward runs share the next forward (no Ray needed)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from teacher_server.coalesce import Coalescer
from teacher_server.engine import BatchStats, Work
from teacher_server.spec import TargetSpec


def work(n: int, tag: float) -> Work:
    return Work({"x": torch.full((n, 1), tag)}, TargetSpec(logits=True))


class SlowEngine:
    """Records the requests of each forward; answers each request with its own input doubled.

    With ``hold_first`` the first forward waits for ``gate``: a test queues what must arrive
    "mid-forward" and then opens it, so no scheduling delay of a busy machine can end the forward
    before the requests are queued (a timed window alone made these tests flaky under load).
    """

    def __init__(self, seconds: float = 0.2, fail_on: float | None = None, hold_first: bool = False):
        self.seconds, self.fail_on, self.forwards = seconds, fail_on, []
        self.busy = threading.Event()  # set once the first forward has started; never cleared
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()

    def run(self, works):
        self.forwards.append([float(w.inputs["x"][0, 0]) for w in works])
        self.busy.set()
        assert self.gate.wait(60)
        time.sleep(self.seconds)
        if self.fail_on is not None and any(float(w.inputs["x"][0, 0]) == self.fail_on for w in works):
            raise RuntimeError("forward failed")
        samples = sum(w.inputs["x"].shape[0] for w in works)
        return [{"y": w.inputs["x"] * 2} for w in works], BatchStats(len(works), samples, self.seconds * 1e3)


async def _wait_busy(engine: SlowEngine):
    while not engine.busy.is_set():
        await asyncio.sleep(0.005)


async def _open(engine: SlowEngine):
    """Let the tasks created so far queue their requests (admission is synchronous), then end the held forward."""
    await asyncio.sleep(0)
    engine.gate.set()


def test_requests_arriving_mid_forward_share_the_next_forward():
    engine = SlowEngine(hold_first=True)
    seen = []
    c = Coalescer(engine.run, max_samples=64, on_batch=lambda s: seen.append(s.requests))

    async def main():
        first = asyncio.create_task(c.submit([work(1, 0.0)]))
        await _wait_busy(engine)
        rest = [asyncio.create_task(c.submit([work(1, float(i))])) for i in range(1, 6)]
        await _open(engine)
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert engine.forwards == [[0.0], [1.0, 2.0, 3.0, 4.0, 5.0]]
    assert seen == [1, 5]
    for i, ((out, stats, queue_ms),) in enumerate(rest, start=1):
        assert torch.equal(out["y"], torch.full((1, 1), 2.0 * i))  # each gets its own answer
        assert stats.requests == 5 and queue_ms > 0


def test_max_samples_splits_forwards_in_arrival_order():
    engine = SlowEngine(seconds=0.05)
    c = Coalescer(engine.run, max_samples=4)

    async def main():
        return await c.submit([work(3, 1.0), work(2, 2.0), work(2, 3.0), work(5, 4.0)])

    asyncio.run(main())
    # 3+2 > 4 -> split; a request larger than the cap still runs, alone
    assert engine.forwards == [[1.0], [2.0, 3.0], [4.0]]


def test_a_failed_forward_fails_its_requests_only():
    engine = SlowEngine(seconds=0.05, fail_on=1.0, hold_first=True)
    c = Coalescer(engine.run, max_samples=64)

    async def main():
        bad = asyncio.create_task(c.submit([work(1, 1.0)]))
        await _wait_busy(engine)
        good = asyncio.create_task(c.submit([work(1, 2.0)]))
        await _open(engine)
        with pytest.raises(RuntimeError, match="forward failed"):
            await bad
        return await good

    ((out, _, _),) = asyncio.run(main())
    assert torch.equal(out["y"], torch.full((1, 1), 4.0))


def xwork(n: int, tag: float, experiment: str, tokens: int = 1) -> Work:
    return Work({"x": torch.full((n, tokens), tag)}, TargetSpec(logits=True), experiment=experiment)


def test_light_experiment_gets_into_the_next_forward_under_a_flood():
    """Counts only: which forward the light request lands in, fair vs FIFO."""

    def forwards_until_light(scheduler: str) -> int:
        engine = SlowEngine(seconds=0.02, hold_first=True)
        c = Coalescer(engine.run, max_samples=64, scheduler=scheduler)

        async def main():
            first = asyncio.create_task(c.submit([xwork(32, -1.0, "flood")]))
            await _wait_busy(engine)
            flood = [asyncio.create_task(c.submit([xwork(32, float(i), "flood")])) for i in range(20)]
            await asyncio.sleep(0)  # all flood requests queued before the light one
            light = asyncio.create_task(c.submit([xwork(2, 100.0, "light")]))
            await _open(engine)
            await asyncio.gather(first, light, *flood)

        asyncio.run(main())
        return next(i for i, f in enumerate(engine.forwards) if 100.0 in f)

    assert forwards_until_light("fair") == 1  # the forward right after the one running
    assert forwards_until_light("fifo") == 11  # behind 20 flood requests, 2 per forward


def test_cancelled_work_is_never_computed():
    engine = SlowEngine(seconds=0.05, hold_first=True)
    c = Coalescer(engine.run, max_samples=64)

    async def main():
        first = asyncio.create_task(c.submit([xwork(1, 0.0, "a")]))
        await _wait_busy(engine)
        gone = asyncio.create_task(c.submit([xwork(1, 1.0, "b")]))
        kept = asyncio.create_task(c.submit([xwork(1, 2.0, "a")]))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away while queued
        await _open(engine)
        await asyncio.gather(first, kept)
        assert gone.cancelled()

    asyncio.run(main())
    assert engine.forwards == [[0.0], [2.0]]


class BadInputEngine(SlowEngine):
    """Fails any forward containing the input tagged -1 (as a model would on a bad token id)."""

    def run(self, works):
        self.forwards.append([float(w.inputs["x"][0, 0]) for w in works])
        if any(float(w.inputs["x"][0, 0]) == -1.0 for w in works):
            raise IndexError("index out of range in self")
        return [{"y": w.inputs["x"] * 2} for w in works], BatchStats(len(works), len(works), 1.0)


@pytest.mark.unit
def test_a_bad_request_fails_alone_and_the_others_of_its_batch_succeed():
    from teacher_server.coalesce import InputRejected
    from teacher_server.spec import SpecError

    engine = BadInputEngine()
    c = Coalescer(engine.run, max_samples=64)

    async def main():
        works = [xwork(1, 1.0, "a"), xwork(1, -1.0, "b"), xwork(1, 3.0, "c")]
        return await asyncio.gather(*(c.submit([w]) for w in works), return_exceptions=True)

    good1, bad, good2 = asyncio.run(main())
    assert engine.forwards == [[1.0, -1.0, 3.0], [1.0], [-1.0], [3.0]]  # batched, then one by one
    assert isinstance(bad, InputRejected) and isinstance(bad, SpecError)  # -> INVALID_ARGUMENT
    assert isinstance(bad.__cause__, IndexError)
    assert torch.equal(good1[0][0]["y"], torch.full((1, 1), 2.0))
    assert torch.equal(good2[0][0]["y"], torch.full((1, 1), 6.0))


@pytest.mark.unit
def test_cache_hit_skips_the_forward():
    from teacher_server.target_cache import TargetCache

    engine = SlowEngine(seconds=0.0)
    c = Coalescer(engine.run, max_samples=64, cache=TargetCache(1 << 20, "fp"))

    async def main():
        (a,) = await c.submit([xwork(2, 5.0, "exp1")])
        (b,) = await c.submit([xwork(2, 5.0, "exp2")])  # another experiment, same inputs and spec
        (d,) = await c.submit([xwork(2, 6.0, "exp2")])
        return a, b, d

    a, b, d = asyncio.run(main())
    assert engine.forwards == [[5.0], [6.0]]
    assert b[1].forwards == 0 and b[0]["y"] is a[0]["y"]
    assert torch.equal(d[0]["y"], torch.full((2, 1), 12.0))
    assert (c.cache.hits, c.cache.misses) == (1, 2)


class TimedEngine:
    """Answers at once, reporting ``compute_ms`` per forward; records the thread each forward ran on."""

    def __init__(self, compute_ms: float, fail_on: float | None = None):
        self.compute_ms, self.fail_on, self.threads = compute_ms, fail_on, []

    def run(self, works):
        self.threads.append(threading.get_ident())
        if any(float(w.inputs["x"][0, 0]) == self.fail_on for w in works):
            raise RuntimeError("forward failed")
        samples = sum(w.inputs["x"].shape[0] for w in works)
        return [{"y": w.inputs["x"] * 2} for w in works], BatchStats(len(works), samples, self.compute_ms)


def _one_by_one(engine: TimedEngine, sizes: list[int], inline_forward_ms: float) -> tuple[int, list]:
    """Each request alone (the previous one answered first); returns the loop's thread and the answers."""

    async def main():
        c = Coalescer(engine.run, max_samples=64, inline_forward_ms=inline_forward_ms)
        answers = []
        for i, n in enumerate(sizes):
            try:
                answers.append(await c.submit([work(n, float(i))]))
            except RuntimeError as e:
                answers.append(e)
        return threading.get_ident(), answers

    return asyncio.run(main())


@pytest.mark.unit
def test_short_forwards_run_on_the_loop_and_long_ones_on_a_thread():
    fast = TimedEngine(compute_ms=0.2)
    loop, answers = _one_by_one(fast, [1, 1, 1], inline_forward_ms=1.0)
    # no estimate before the first forward: a thread; then 0.2 ms < 1 ms predicted: on the loop
    assert fast.threads[0] != loop and fast.threads[1:] == [loop, loop]
    assert [float(a[0][0]["y"][0, 0]) for a in answers] == [0.0, 2.0, 4.0]  # answered by the fast path

    slow = TimedEngine(compute_ms=5.0)
    loop, _ = _one_by_one(slow, [1, 1, 1], inline_forward_ms=1.0)
    assert loop not in slow.threads

    off = TimedEngine(compute_ms=0.0)  # the default (0) never blocks the loop
    loop, _ = _one_by_one(off, [1, 1, 1], inline_forward_ms=0.0)
    assert loop not in off.threads


@pytest.mark.unit
def test_the_inline_estimate_scales_with_cost_and_forgets_failures():
    # 0.4 ms for 1 sample predicts 1.6 ms for 4 samples: over 1 ms, so a thread
    e = TimedEngine(compute_ms=0.4)
    loop, _ = _one_by_one(e, [1, 1, 4], inline_forward_ms=1.0)
    assert [t == loop for t in e.threads] == [False, True, False]
    # a failed forward leaves no estimate: the next one goes to a thread again
    e = TimedEngine(compute_ms=0.1, fail_on=1.0)
    loop, answers = _one_by_one(e, [1, 1, 1, 1], inline_forward_ms=1.0)
    assert isinstance(answers[1], RuntimeError)
    assert [t == loop for t in e.threads] == [False, True, False, True]


@pytest.mark.unit
def test_inline_forward_ms_comes_from_the_teacher_config():
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.engine import TeacherEngine

    cfg = TeacherConfig(model="synthetic:layers=2,tokens=4,dim=8,heads=2,classes=0,image_size=8,latency_ms=0",
                        device="cpu", sharing={"inline_forward_ms": 0.5})
    assert Coalescer.from_config(TeacherEngine.from_config(cfg), cfg).inline_forward_ms == 0.5
    assert TeacherConfig(model="synthetic:").sharing.inline_forward_ms == 1.0
