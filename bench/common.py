"""Pieces shared by the figures of ``python -m bench``: a teacher in a child process, closed-loop
client windows, and the record every figure produces (measured beside its baseline)."""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from kdserve.net import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    """One headline number: ``measured / baseline`` from the same run, plus its detail rows."""

    key: str
    baseline: float
    measured: float
    what: str
    unit: str = ""
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.measured / self.baseline if self.baseline else float("nan")

    def as_json(self) -> dict:
        return {"baseline": self.baseline, "measured": self.measured, "ratio": self.ratio, "what": self.what,
                "unit": self.unit, "rows": self.rows, "notes": self.notes, **self.extra}


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


class ChildTeacher:
    """``python -m teacher_server --backend grpc`` on a free loopback port, in its own process
    (a teacher in this process would share the benchmark's GIL, which a remote teacher never does)."""

    def __init__(self, model: str, *sets: str, threads: int = 1):
        self.port = free_port()
        self.address = f"grpc://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "teacher_server", "--backend", "grpc", "--model", model,
               "--host", "127.0.0.1", "--port", str(self.port), "--set", "device=cpu",
               *[a for s in sets for a in ("--set", s)]]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 180.0) -> "ChildTeacher":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"teacher exited: {self.proc.stderr.read().decode()[-2000:]}")
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=1.0)
                    return self
                except grpc.FutureTimeoutError:
                    pass
        raise TimeoutError(f"teacher on port {self.port} not ready within {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def closed_loop(calls: list[Callable[[], Awaitable[int]]], seconds: float) -> dict:
    """Each client repeats its call (returning bytes received) until ``seconds`` pass.

    One warm-up call per client first (connections, batch queues). Returns req/s, MB/s, p50 ms.
    """
    await asyncio.gather(*(c() for c in calls))
    start = time.perf_counter()
    deadline = start + seconds

    async def client(call):
        lat, nbytes = [], 0
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            nbytes += await call()
            lat.append(time.perf_counter() - t)
        return lat, nbytes

    per = await asyncio.gather(*(client(c) for c in calls))
    elapsed = time.perf_counter() - start
    lat = [x for l, _ in per for x in l]
    return {"seconds": elapsed, "requests": len(lat), "req_s": len(lat) / elapsed,
            "mb_s": sum(n for _, n in per) / elapsed / 1e6, "p50_ms": statistics.median(lat) * 1e3}


async def teacher_window(address: str, request, clients: int, seconds: float, decode: bool = True,
                         depth: int = 1, direct: bool = False) -> dict:
    """Closed-loop GetTargets through the client's transport (one TCP connection per client),
    decoding every reply as ``TeacherClient`` does. MB/s counts the whole reply message.
    ``depth``: requests each client keeps in flight on its connection (a Prefetcher's depth).
    ``direct``: Describe first, so a Ray Serve teacher's replica endpoints are used (else the proxy).

    The reply's size is taken once (replies to one request differ only in a few varint bytes of
    timings): with upb, ``ByteSize()`` serialises the message, a cost the echo does not pay."""
    from kdserve import codec
    from student_workers.client.transport import make_transport

    transports = [make_transport(address) for _ in range(clients)]
    if direct:
        await asyncio.gather(*(t.describe(60.0) for t in transports))
        assert all(t._replicas for t in transports), f"{address} lists no replica endpoints"

    def make(t):
        size: list[int] = []

        async def call() -> int:
            reply = await t.get_targets(request, 300.0)
            if decode:
                codec.decode_map(reply.outputs)
            if not size:
                size.append(reply.ByteSize())
            return size[0]
        return call

    try:
        return await closed_loop([make(t) for t in transports for _ in range(depth)], seconds)
    finally:
        await asyncio.gather(*(t.close() for t in transports))


async def echo_window(port: int, reply_bytes: int, request_bytes: int, clients: int, seconds: float) -> dict:
    """The same closed loop against the bare grpc.aio bytes echo of ``bench/echo.py``."""
    import struct

    from bench.echo import ECHO_METHOD, ECHO_SERVICE, LOCAL_POOL, identity
    from kdserve.wire import CHANNEL_OPTIONS

    request = struct.pack("<Q", reply_bytes) + bytes(max(0, request_bytes - 8))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS + LOCAL_POOL)
                for _ in range(clients)]

    def make(ch):
        rpc = ch.unary_unary(f"/{ECHO_SERVICE}/{ECHO_METHOD}", request_serializer=identity,
                             response_deserializer=identity)

        async def call() -> int:
            return len(await rpc(request))
        return call

    try:
        return await closed_loop([make(ch) for ch in channels], seconds)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return statistics.geometric_mean(xs) if xs else float("nan")
