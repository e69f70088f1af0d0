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
    """Records the requests of each forward; answers each request with its own input doubled."""

    def __init__(self, seconds: float = 0.2, fail_on: float | None = None):
        self.seconds, self.fail_on, self.forwards = seconds, fail_on, []
        self.busy = threading.Event()

    def run(self, works):
        self.forwards.append([float(w.inputs["x"][0, 0]) for w in works])
        self.busy.set()
        time.sleep(self.seconds)
        self.busy.clear()
        if self.fail_on is not None and any(float(w.inputs["x"][0, 0]) == self.fail_on for w in works):
            raise RuntimeError("forward failed")
        samples = sum(w.inputs["x"].shape[0] for w in works)
        return [{"y": w.inputs["x"] * 2} for w in works], BatchStats(len(works), samples, self.seconds * 1e3)


async def _wait_busy(engine: SlowEngine):
    while not engine.busy.is_set():
        await asyncio.sleep(0.005)


def test_requests_arriving_mid_forward_share_the_next_forward():
    engine = SlowEngine()
    seen = []
    c = Coalescer(engine.run, max_samples=64, on_batch=lambda s: seen.append(s.requests))

    async def main():
        first = asyncio.create_task(c.submit([work(1, 0.0)]))
        await _wait_busy(engine)
        rest = [asyncio.create_task(c.submit([work(1, float(i))])) for i in range(1, 6)]
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
    engine = SlowEngine(seconds=0.05, fail_on=1.0)
    c = Coalescer(engine.run, max_samples=64)

    async def main():
        bad = asyncio.create_task(c.submit([work(1, 1.0)]))
        await _wait_busy(engine)
        good = asyncio.create_task(c.submit([work(1, 2.0)]))
        with pytest.raises(RuntimeError, match="forward failed"):
            await bad
        return await good

    ((out, _, _),) = asyncio.run(main())
    assert torch.equal(out["y"], torch.full((1, 1), 4.0))
