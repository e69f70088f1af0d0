"""Overlap teacher requests with student training steps: ``Prefetcher`` and ``align_images``.

A remote teacher costs X seconds per batch, a student step Y seconds. Asked synchronously, every
step costs X + Y; with the next ``depth`` batches' requests in flight while the current step
trains, a step costs about max(X, Y). The prefetcher keeps that pipeline honest:

* batches come out in the order the source produced them, each with its own targets;
* at most ``depth`` batches are pulled ahead of the one being trained (bounded memory);
* a failure (teacher, source iterator, ``make_request``) is raised from ``__next__`` at the batch
  it belongs to, and every wait has a timeout, so a broken teacher never hangs the training loop.

How deep: to never wait, a request must be answered within the ``depth`` steps between its
submission and its batch's turn, so ``depth`` must cover the round trip R (the teacher's forward
plus the transport, without its queue) over the step time S: Little's law, R / S requests in
flight. ``depth="auto"`` measures both as it goes and keeps ``1 + ceil(R / S)`` in flight (between
2 and ``max_depth``): the one beyond R / S absorbs jitter, and when the teacher falls behind (its
forward alone takes about S: R ~ S), lets two of the student's requests queue at once, which the
teacher's batcher then serves in one forward, so it catches up. At depth 2 and R ~ S only one
request ever waits, every forward serves one, and the teacher, not the student, sets the pace
(``python -m bench --only P1``: 0.86-0.97 of 1 / max(X, S) at teacher latency X = S at depth 2,
lower under more load).
"""
from __future__ import annotations

import concurrent.futures
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch
import torch.nn.functional as F

from kdserve.v1 import teacher_pb2 as pb

Request = tuple  # (inputs: dict[str, Tensor], spec[, sample_keys])
AUTO_MIN_DEPTH = 2
AUTO_MAX_DEPTH = 4  # x workers x experiments: well under a teacher's max_requests_per_experiment (32)
AUTO_WINDOW = 8  # recent round trips and steps whose medians set the depth


class Submitter(Protocol):
    """What the prefetcher needs from a client: ``SyncTeacherClient`` is one."""

    def submit(self, inputs: Mapping[str, torch.Tensor], spec: Any, *args: Any) -> concurrent.futures.Future: ...


@dataclass
class _Slot:
    """A batch pulled from the source, with its request in flight (or the error that stopped it)."""

    index: int
    batch: Any = None
    future: concurrent.futures.Future | None = None
    error: BaseException | None = None
    submitted: float = 0.0
    answered: float | None = None  # when the future completed (its round trip: answered - submitted)


class Prefetcher(Iterator[tuple[Any, dict[str, torch.Tensor]]]):
    """Yields ``(batch, targets)`` in order, keeping ``depth`` teacher requests in flight.

    ``make_request(batch) -> (inputs, spec)`` (optionally ``(inputs, spec, sample_keys)``) builds
    what ``client.submit`` takes. ``depth=0`` asks synchronously (the no-prefetch baseline);
    ``depth="auto"`` keeps ``1 + ceil(R / S)`` in flight, R the measured round trip less the
    teacher's queue, S the caller's time between batches, within [2, ``max_depth``] (see the module
    docstring); ``self.depth`` is the current depth.
    ``timeout``: the longest the training loop waits for one batch's targets.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        make_request: Callable[[Any], Request],
        client: Submitter,
        depth: int | str = 2,
        timeout: float = 120.0,
        name: str | None = None,
        max_depth: int = AUTO_MAX_DEPTH,
    ):
        self.auto = depth == "auto"
        if self.auto:
            if max_depth < AUTO_MIN_DEPTH:
                raise ValueError(f"max_depth must be >= {AUTO_MIN_DEPTH}, got {max_depth}")
            depth = AUTO_MIN_DEPTH
        elif not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an int >= 0 or 'auto', got {depth!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._source = iter(batches)
        self.make_request = make_request
        self.client = client
        self.depth = int(depth)
        self.timeout = float(timeout)
        self.name = name or str(getattr(client, "address", type(client).__name__))
        self._queue: deque[_Slot] = deque()
        self._pulled = 0
        self._source_done = False
        self._closed = False
        self.steps = 0
        self.wait_s = 0.0  # last step's wait for targets
        self.total_wait_s = 0.0
        self.max_depth = int(max_depth)
        self._round_trips: deque[float] = deque(maxlen=AUTO_WINDOW)  # s, the teacher's queue excluded
        self._step_s: deque[float] = deque(maxlen=AUTO_WINDOW)  # the caller's time between batches
        self._returned: float | None = None  # when __next__ last handed a batch out
        self._stats_seen: tuple[int, float] | None = None  # (requests, teacher queue ms) of client.stats

    # -- pipeline --------------------------------------------------------------------------
    def _pull(self) -> _Slot | None:
        """Next batch with its request started; None at the end of the source."""
        index = self._pulled
        try:
            batch = next(self._source)
        except StopIteration:
            self._source_done = True
            return None
        except Exception as e:  # surfaces when the loop reaches this batch
            self._source_done = True
            return _Slot(index, error=e)
        self._pulled += 1
        submitted = time.perf_counter()
        try:
            future = self.client.submit(*self.make_request(batch))
        except Exception as e:
            self._source_done = True
            return _Slot(index, batch, error=e)
        slot = _Slot(index, batch, future, submitted=submitted)
        if self.auto:  # runs in the thread that completes the future: one timestamp, nothing more
            future.add_done_callback(lambda _f, s=slot: setattr(s, "answered", time.perf_counter()))
        return slot

    def _fill(self, n: int) -> None:
        while len(self._queue) < n and not self._source_done:
            slot = self._pull()
            if slot is not None:
                self._queue.append(slot)

    def _wait(self, slot: _Slot) -> dict[str, torch.Tensor]:
        assert slot.future is not None
        t0 = time.perf_counter()
        try:
            return slot.future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"no targets from teacher {self.name} for batch {slot.index} within {self.timeout:g} s "
                f"(prefetch depth {self.depth}); is the teacher overloaded or stuck?"
            ) from None
        finally:
            self.wait_s = time.perf_counter() - t0
            self.total_wait_s += self.wait_s

    def __iter__(self) -> "Prefetcher":
        return self

    def _teacher_queue_s(self) -> float:
        """Mean time the requests answered since the last call queued at the teacher (its Timings,
        summed in ``client.stats``); 0 for a client without them."""
        stats = getattr(self.client, "stats", None)
        if stats is None or not hasattr(stats, "teacher_queue_ms"):
            return 0.0
        now = (stats.requests, stats.teacher_queue_ms)
        seen, self._stats_seen = self._stats_seen, now
        if seen is None or now[0] <= seen[0]:
            return 0.0
        return (now[1] - seen[1]) / (now[0] - seen[0]) / 1e3

    def _adapt(self, slot: _Slot) -> None:
        """Depth from the medians of recent round trips (less the teacher's queue) and steps."""
        queue_s = self._teacher_queue_s()
        if slot.answered is not None:
            self._round_trips.append(max(0.0, slot.answered - slot.submitted - queue_s))
        if self._round_trips and self._step_s:
            step = max(statistics.median(self._step_s), 1e-4)
            need = 1 + math.ceil(statistics.median(self._round_trips) / step)
            self.depth = min(self.max_depth, max(AUTO_MIN_DEPTH, need))

    def __next__(self) -> tuple[Any, dict[str, torch.Tensor]]:
        if self._closed:
            raise StopIteration
        if self.auto and self._returned is not None:
            self._step_s.append(time.perf_counter() - self._returned)
        self._fill(max(1, self.depth))
        if not self._queue:
            self.close()
            raise StopIteration
        slot = self._queue.popleft()
        try:
            if slot.error is not None:
                raise slot.error
            targets = self._wait(slot)
        except BaseException as e:
            if slot.future is not None:
                slot.future.cancel()  # a timed-out request must not stay pending either
            self.close()
            if isinstance(e, Exception):
                e.add_note(f"(kdserve prefetcher: batch {slot.index}, teacher {self.name})")
            raise
        if self.auto:
            self._adapt(slot)
        self._fill(self.depth)  # the next requests run while the caller trains on this batch
        self.steps += 1
        self._returned = time.perf_counter()
        return slot.batch, targets

    # -- reporting and teardown ------------------------------------------------------------
    @property
    def mean_wait_s(self) -> float:
        return self.total_wait_s / self.steps if self.steps else 0.0

    def line(self) -> str:
        """For the progress line: how long training blocked on the teacher."""
        return f"teacher wait {self.wait_s * 1e3:.1f} ms (mean {self.mean_wait_s * 1e3:.1f} ms, total {self.total_wait_s:.1f} s)"

    def close(self) -> None:
        """Cancel requests still in flight and stop; idempotent."""
        self._closed = True
        while self._queue:
            slot = self._queue.popleft()
            if slot.future is not None:
                slot.future.cancel()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- input alignment ---------------------------------------------------------------------------
def teacher_image_size(info: pb.TeacherInfo, input_name: str = "pixel_values") -> tuple[int, int] | None:
    """(H, W) the teacher takes for ``input_name`` per Describe, or None if not a fixed image input."""
    for i in info.inputs:
        if i.name == input_name and len(i.shape) == 4 and i.shape[2] > 0 and i.shape[3] > 0:
            return int(i.shape[2]), int(i.shape[3])
    return None


def align_images(pixel_values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the student's augmented view (B, 3, H, W), floats in [0, 1], to the teacher's size.

    The teacher must see exactly the view the student trains on (same crop, flip, colour jitter),
    only resampled; at equal size the tensor is returned as is. Bilinear with antialiasing keeps
    values inside [0, 1] (non-negative weights) and avoids aliasing when shrinking.
    """
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (B, C, H, W), got shape {list(pixel_values.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(pixel_values.shape[-2:]) == size:
        return pixel_values
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floats in [0, 1], got {pixel_values.dtype}")
    return F.interpolate(pixel_values, size=size, mode="bilinear", antialias=True, align_corners=False)  # (B, 3, h, w)


__all__ = ["Prefetcher", "Submitter", "align_images", "teacher_image_size"]
