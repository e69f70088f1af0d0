"""``SyncTeacherClient``: the asyncio ``TeacherClient`` for plain (non-async) training code."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Awaitable, Iterable, Mapping, TypeVar

import torch

from kdserve.v1 import teacher_pb2 as pb
from student_workers.client.async_client import TeacherClient
from student_workers.client.stats import ClientStats

T = TypeVar("T")


class SyncTeacherClient:
    """``TeacherClient`` for plain (non-async) training code.

    A private event loop runs in a daemon thread, started on first use in the calling process
    (after a fork the child starts its own). ``submit`` returns a ``concurrent.futures.Future``
    so a training loop can keep requests in flight (see ``student_workers.client.prefetch``).
    """

    def __init__(self, address: str, **kwargs: Any):
        self.client = TeacherClient(address, **kwargs)
        self.address = self.client.address
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="kdserve-teacher-client", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def _run(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())  # type: ignore[arg-type]

    def _wait(self, fut: concurrent.futures.Future[T]) -> T:
        # The client's own deadlines bound the call; the slack guards against a dead loop thread.
        try:
            return fut.result(timeout=self.client.max_call_s() + 30.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer from teacher at {self.address} within {self.client.max_call_s() + 30:.0f} s") from None

    def describe(self, refresh: bool = False) -> pb.TeacherInfo:
        return self._wait(self._run(self.client.describe(refresh)))

    def submit(
        self,
        inputs: Mapping[str, torch.Tensor],
        spec: pb.TargetSpec,
        sample_keys: Iterable[str] = (),
        stream: bool | None = None,
        **text: Any,
    ) -> concurrent.futures.Future[dict[str, torch.Tensor]]:
        """Start a request now; the Future resolves to the targets (or raises TeacherError).
        ``texts=``, ``text_tokenizer=``: raw texts instead of inputs (``TeacherClient.get_targets``)."""
        return self._run(self.client.get_targets(inputs, spec, sample_keys, stream, **text))

    def get_targets(
        self,
        inputs: Mapping[str, torch.Tensor],
        spec: pb.TargetSpec,
        sample_keys: Iterable[str] = (),
        stream: bool | None = None,
        **text: Any,
    ) -> dict[str, torch.Tensor]:
        return self._wait(self.submit(inputs, spec, sample_keys, stream, **text))

    def close(self) -> None:
        """Close the channel, stop the loop and join its thread (idempotent)."""
        with self._lock:
            loop, thread, pid = self._loop, self._thread, self._pid
            self._loop = self._thread = None
        if loop is None or pid != os.getpid():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.client.close(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            if not loop.is_running():
                loop.close()

    def __enter__(self) -> "SyncTeacherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
