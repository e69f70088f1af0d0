"""Prefetcher: order, overlap (step time -> max(X, Y)), errors and timeouts surface, bounded pull-ahead.

Most tests use ``SleepyTeacher``: a real thread pool whose ``submit`` returns real futures after a
chosen latency. It stands in for the teacher's latency only; one test runs the whole path against
a real gRPC teacher. The overlap itself is checked on a fake clock (``ClockTeacher``): exact step
counts and ready targets, no wall time (the measured overlap is P1 of ``python -m bench``).
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Iterator

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from kdserve import wire
from kdserve.v1 import teacher_pb2 as pb
from student_workers.client.sync_client import SyncTeacherClient
from student_workers.client.prefetch import Prefetcher, align_images, teacher_image_size
from teacher_server.engine import Work
from teacher_server.grpc_server import run_server
from teacher_server.service import TeacherService
from teacher_server.spec import resolve_spec


class SleepyTeacher:
    """Answers ``{"y": 2 * x}`` after ``latency(i)`` seconds, ``i`` being the batch's index."""

    address = "sleepy://test"

    def __init__(self, latency: Callable[[int], float], workers: int = 1, fail_at: int | None = None):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        self.latency = latency
        self.fail_at = fail_at
        self.submitted: list[concurrent.futures.Future] = []

    def _answer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        i = int(inputs["i"])
        time.sleep(self.latency(i))
        if i == self.fail_at:
            raise RuntimeError(f"teacher failed on batch {i}")
        return {"y": inputs["x"] * 2}

    def submit(self, inputs: dict[str, torch.Tensor], spec: Any) -> concurrent.futures.Future:
        fut = self.pool.submit(self._answer, inputs)
        self.submitted.append(fut)
        return fut

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def batches(n: int) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(n):
        yield {"i": torch.tensor(i), "x": torch.full((2, 3), float(i))}  # (B, D)


def request(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], None]:
    return {"i": batch["i"], "x": batch["x"]}, None


def test_order_preserved_with_varying_latency():
    """Later batches often finish first (4 workers, latencies 0-40 ms); output stays in order."""
    teacher = SleepyTeacher(lambda i: (7 * i % 5) * 0.01, workers=4)
    seen = []
    with Prefetcher(batches(20), request, teacher, depth=4, timeout=5) as pf:
        for batch, targets in pf:
            seen.append(int(batch["i"]))
            assert torch.equal(targets["y"], batch["x"] * 2)
    teacher.close()
    assert seen == list(range(20))
    assert pf.steps == 20


class AnsweredOnWait(concurrent.futures.Future):
    """A request of ``LateFirstTeacher``: waiting on it makes the teacher answer what is in flight."""

    def __init__(self, teacher: "LateFirstTeacher"):
        super().__init__()
        self.teacher = teacher

    def result(self, timeout: float | None = None) -> Any:
        self.teacher.answer_in_flight()
        return super().result(timeout=0)


class LateFirstTeacher:
    """Answers out of order without threads or sleeps: whenever the loop waits for a request, every
    request still in flight is answered, the newest first (later batches finish first)."""

    address = "late-first://test"

    def __init__(self) -> None:
        self.in_flight: list[tuple[int, AnsweredOnWait, torch.Tensor]] = []
        self.answered: list[int] = []

    def submit(self, inputs: dict[str, torch.Tensor], spec: Any) -> AnsweredOnWait:
        fut = AnsweredOnWait(self)
        self.in_flight.append((int(inputs["i"]), fut, inputs["x"]))
        return fut

    def answer_in_flight(self) -> None:
        while self.in_flight:
            i, fut, x = self.in_flight.pop()
            fut.set_result({"y": x * 2})
            self.answered.append(i)


@pytest.mark.unit
def test_order_preserved_when_later_batches_are_answered_first():
    teacher = LateFirstTeacher()
    seen = []
    for batch, targets in Prefetcher(batches(8), request, teacher, depth=3, timeout=5):
        seen.append(int(batch["i"]))
        assert torch.equal(targets["y"], batch["x"] * 2)  # its own targets, not a neighbour's
    # waiting for batch 0 found 0, 1 and 2 in flight and they were answered 2, 1, 0; from then on
    # each wait finds only the one batch pulled after the previous step
    assert teacher.answered == [2, 1, 0, 3, 4, 5, 6, 7]
    assert seen == list(range(8))


class ClockFuture(concurrent.futures.Future):
    """A future whose answer is due at ``done_at`` on a fake clock; waiting moves the clock there."""

    def __init__(self, clock: "FakeClock", done_at: float, value: Any):
        super().__init__()
        self.clock, self.done_at, self.value = clock, done_at, value
        self.ready_when_asked: bool | None = None

    def result(self, timeout: float | None = None) -> Any:
        self.ready_when_asked = self.clock.now >= self.done_at
        self.clock.now = max(self.clock.now, self.done_at)
        return self.value


class FakeClock:
    now = 0.0


class ClockTeacher:
    """A serial teacher on a fake clock: request i starts when submitted (or when the teacher is
    free) and is answered ``x`` time units later. No real time passes."""

    address = "clock://test"

    def __init__(self, clock: FakeClock, x: float):
        self.clock, self.x, self.free_at = clock, x, 0.0
        self.futures: list[ClockFuture] = []

    def submit(self, inputs: dict[str, torch.Tensor], spec: Any) -> ClockFuture:
        self.free_at = max(self.clock.now, self.free_at) + self.x
        self.futures.append(ClockFuture(self.clock, self.free_at, {"y": inputs["x"] * 2}))
        return self.futures[-1]


def simulate(depth: int, x: float, y: float, steps: int = 20) -> tuple[float, int, Prefetcher]:
    """Fake-clock time of ``steps`` training steps of ``y`` units; and how many targets were
    already answered when the loop asked for them."""
    clock = FakeClock()
    teacher = ClockTeacher(clock, x)
    pf = Prefetcher(batches(steps), request, teacher, depth=depth, timeout=5)
    for batch, targets in pf:
        assert torch.equal(targets["y"], batch["x"] * 2)
        clock.now += y  # the student's training step
    ready = sum(bool(f.ready_when_asked) for f in teacher.futures)
    return clock.now, ready, pf


@pytest.mark.unit
@pytest.mark.parametrize("x,y", [(0.6, 1.0), (1.0, 1.0)])
def test_prefetch_overlaps_teacher_and_training(x, y):
    """Teacher no slower than the step: with prefetch only the first batch waits (X + N*Y in all,
    about max(X, Y) per step); without, every step costs X + Y and no target is ever ready."""
    n = 20
    total, ready, pf = simulate(depth=2, x=x, y=y, steps=n)
    assert total == pytest.approx(x + n * y)
    assert ready == n - 1 and pf.steps == n
    total0, ready0, pf0 = simulate(depth=0, x=x, y=y, steps=n)
    assert total0 == pytest.approx(n * (x + y))
    assert ready0 == 0 and pf0.steps == n


@pytest.mark.unit
def test_prefetch_is_teacher_bound_when_the_teacher_is_slower():
    """X > Y: the serial teacher is busy from the start, so N steps end at N*X + Y; nothing is ready."""
    n = 20
    total, ready, _ = simulate(depth=3, x=1.5, y=1.0, steps=n)
    assert total == pytest.approx(n * 1.5 + 1.0)
    assert ready == 0
    # depth 1 already overlaps one request with each step when X <= Y
    total1, ready1, _ = simulate(depth=1, x=0.5, y=1.0, steps=n)
    assert total1 == pytest.approx(0.5 + n * 1.0) and ready1 == n - 1


class StatsTeacher(SleepyTeacher):
    """A SleepyTeacher whose ``stats`` say each request queued ``queue_ms`` at the teacher."""

    def __init__(self, latency, queue_ms: float, **kw):
        super().__init__(latency, **kw)
        self.stats = type("Stats", (), {"requests": 0, "teacher_queue_ms": 0.0})()
        self.queue_ms = queue_ms

    def _answer(self, inputs):
        out = super()._answer(inputs)
        self.stats.requests += 1
        self.stats.teacher_queue_ms += self.queue_ms
        return out


@pytest.mark.unit
@pytest.mark.parametrize("latency,queue_ms,want", [(0.0, 0.0, {2}), (0.025, 0.0, {3, 4}), (0.025, 22.0, {2})])
def test_auto_depth_covers_the_round_trip(latency, queue_ms, want):
    """depth="auto": 1 + ceil(R / S), R the round trip less the teacher's queue, S the step (10 ms
    here), within [2, max_depth]: an instant teacher keeps 2; one of 25 ms per request needs 3 or 4 so the
    loop never waits (after the first batches); time the teacher says a request queued is not latency
    to cover (it would grow the depth that makes it)."""
    teacher = (StatsTeacher(lambda i: latency, queue_ms, workers=8) if queue_ms
               else SleepyTeacher(lambda i: latency, workers=8))
    depths, waits = [], []
    with Prefetcher(batches(30), request, teacher, depth="auto", timeout=5) as pf:
        for batch, targets in pf:
            assert torch.equal(targets["y"], batch["x"] * 2)
            depths.append(pf.depth)
            waits.append(pf.wait_s)
            time.sleep(0.010)
    teacher.close()
    assert pf.steps == 30 and set(depths) <= {2, 3, 4}
    assert depths[-1] in want, depths
    if want == {3, 4}:
        assert sum(waits[-10:]) < 0.02, waits  # the pipeline covers the teacher


@pytest.mark.unit
def test_auto_depth_is_checked():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(batches(1), request, SleepyTeacher(lambda i: 0.0), depth="deep")
    with pytest.raises(ValueError, match="max_depth"):
        Prefetcher(batches(1), request, SleepyTeacher(lambda i: 0.0), depth="auto", max_depth=1)


@pytest.mark.unit
def test_teacher_error_surfaces_at_its_batch():
    teacher = SleepyTeacher(lambda i: 0.0, workers=2, fail_at=5)
    seen = []
    pf = Prefetcher(batches(20), request, teacher, depth=3, timeout=5)
    with pytest.raises(RuntimeError, match="teacher failed on batch 5") as err:
        for batch, _ in pf:
            seen.append(int(batch["i"]))
    teacher.close()
    assert seen == [0, 1, 2, 3, 4]
    assert any("batch 5" in n for n in err.value.__notes__)
    assert list(pf) == []  # closed after the error


@pytest.mark.unit
def test_source_error_surfaces_in_order():
    def broken() -> Iterator[dict[str, torch.Tensor]]:
        yield from batches(3)
        raise OSError("corrupt shard")

    teacher = SleepyTeacher(lambda i: 0.0)
    seen = []
    with pytest.raises(OSError, match="corrupt shard"):
        # depth 5: the error is hit while prefetching, but raised only after batches 0-2
        for batch, _ in Prefetcher(broken(), request, teacher, depth=5, timeout=5):
            seen.append(int(batch["i"]))
    teacher.close()
    assert seen == [0, 1, 2]


@pytest.mark.unit
def test_make_request_error_surfaces():
    def bad_request(batch):
        if int(batch["i"]) == 2:
            raise KeyError("pixel_values")
        return request(batch)

    teacher = SleepyTeacher(lambda i: 0.0)
    seen = []
    with pytest.raises(KeyError):
        for batch, _ in Prefetcher(batches(6), bad_request, teacher, depth=2, timeout=5):
            seen.append(int(batch["i"]))
    teacher.close()
    assert seen == [0, 1]


class NeverFuture(concurrent.futures.Future):
    """A request that is never answered: waiting on it times out at once (no real wait), after
    recording the timeout it was waited with."""

    def __init__(self) -> None:
        super().__init__()
        self.waited_with: list[float | None] = []

    def result(self, timeout: float | None = None) -> Any:
        self.waited_with.append(timeout)
        raise concurrent.futures.TimeoutError()


class SilentTeacher:
    """Accepts requests and never answers (a stuck teacher)."""

    address = "grpc://stuck:50051"

    def __init__(self) -> None:
        self.futures: list[NeverFuture] = []

    def submit(self, inputs, spec) -> concurrent.futures.Future:
        self.futures.append(NeverFuture())
        return self.futures[-1]


@pytest.mark.unit
def test_silent_teacher_times_out():
    teacher = SilentTeacher()
    pf = Prefetcher(batches(10), request, teacher, depth=3, timeout=0.3)
    with pytest.raises(TimeoutError, match=r"no targets from teacher grpc://stuck:50051 for batch 0 within 0\.3 s"):
        next(pf)
    # the loop waited for batch 0 only, and with the prefetcher's timeout (not forever)
    assert [f.waited_with for f in teacher.futures] == [[0.3], [], []]
    assert len(teacher.futures) == 3 and all(f.cancelled() for f in teacher.futures)  # nothing left pending
    assert list(pf) == []  # closed after the timeout


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_source_never_more_than_depth_plus_one_ahead(depth):
    pulled = 0
    ahead = []
    consumed = 0

    def counting() -> Iterator[dict[str, torch.Tensor]]:
        nonlocal pulled
        for b in batches(12):
            pulled += 1
            ahead.append(pulled - consumed)  # batches pulled but not yet handed to the loop
            yield b

    teacher = SleepyTeacher(lambda i: 0.001, workers=2)
    for batch, _ in Prefetcher(counting(), request, teacher, depth=depth, timeout=5):
        consumed += 1
        assert int(batch["i"]) == consumed - 1
    teacher.close()
    assert consumed == 12
    assert max(ahead) <= depth + 1
    assert max(ahead) == depth + 1  # and it does prefetch that far (no idle teacher)


def test_prefetch_against_real_teacher(vit_engine):
    """The whole path: augmented views -> aligned -> gRPC teacher -> in-order targets."""
    info = TeacherService(vit_engine).describe()
    size = teacher_image_size(info)
    spec = wire.target_spec(hidden={"vision": [-1]}, logits=True)
    g = torch.Generator().manual_seed(0)
    views = [torch.rand(2, 3, 48, 48, generator=g) for _ in range(6)]  # student trains at 48 px

    def make(batch: torch.Tensor):
        return {"pixel_values": align_images(batch, size)}, spec

    with run_server(vit_engine) as port, SyncTeacherClient(f"grpc://127.0.0.1:{port}", timeout=5, max_retries=1) as c:
        got = [(b, t) for b, t in Prefetcher(views, make, c, depth=2, timeout=10)]
    assert len(got) == 6
    for view, (batch, targets) in zip(views, got):
        assert batch is view
        x = align_images(view, size)
        (want,), _ = vit_engine.run([Work({"pixel_values": x}, resolve_spec(spec, vit_engine.modules, 10))])
        assert torch.equal(targets["logits"], want["logits"])
        assert torch.equal(targets["hidden.vision.3"], want["hidden.vision.3"])


@pytest.mark.unit
def test_align_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 48, generator=g)  # (B, 3, H, W)
    assert align_images(x, (64, 48)) is x  # identity at equal size: no resampling at all
    y = align_images(x, (32, 32))
    assert y.shape == (2, 3, 32, 32)
    # the same resampling torchvision's Resize applies to a student's view
    ref = TF.resize(x, [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    assert torch.allclose(y, ref, atol=1e-6)
    assert 0.0 <= y.min() and y.max() <= 1.0
    flat = torch.full((1, 3, 40, 40), 0.25)
    assert torch.allclose(align_images(flat, (32, 32)), torch.full((1, 3, 32, 32), 0.25))
    up = align_images(x, (96, 72))
    assert up.shape == (2, 3, 96, 72)
    with pytest.raises(ValueError):
        align_images(x[0], (32, 32))


@pytest.mark.unit
def test_teacher_image_size(vit_engine):
    assert teacher_image_size(TeacherService(vit_engine).describe()) == (32, 32)
    text = pb.TeacherInfo(inputs=[pb.InputInfo(name="input_ids", dtype="int64", shape=[-1, -1])])
    assert teacher_image_size(text) is None  # a text teacher takes no images
