"""Bounded resources of a shared teacher: per-experiment caps and StreamTargets flow control.

* The Coalescer admits at most ``max_requests`` requests / ``max_queued_bytes`` of inputs per
  experiment in flight; more get Overloaded (RESOURCE_EXHAUSTED on the wire), others still pass.
* An unread stream makes the plain server encode only as many chunks as the transport takes
  (counted, not timed), and a reader that stalls past ``stream_stall_timeout_s`` is cancelled.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from kdserve import wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import grpc_server
from teacher_server.coalesce import Coalescer, Overloaded, work_bytes
from teacher_server.engine import BatchStats, TeacherEngine, Work
from teacher_server.grpc_server import run_server
from teacher_server.service import TeacherService, status_of
from teacher_server.spec import TargetSpec
from tests.conftest import minilm_config, tiny_vit_config


def work(exp: str, n: int = 1, tag: float = 0.0) -> Work:
    w = Work({"x": torch.full((n, 4), float(tag))}, TargetSpec(logits=True))  # float32
    w.experiment = exp
    return w


class GatedEngine:
    """Each forward waits until the test opens the gate: requests stay "in flight" meanwhile."""

    def __init__(self):
        self.gate = threading.Event()
        self.busy = threading.Event()

    def run(self, works):
        self.busy.set()
        assert self.gate.wait(30)
        n = sum(w.inputs["x"].shape[0] for w in works)
        return [{"y": w.inputs["x"] + 1} for w in works], BatchStats(len(works), n, 0.0)


@pytest.mark.unit
def test_request_cap_is_per_experiment_and_frees_on_answer():
    engine = GatedEngine()
    c = Coalescer(engine.run, max_samples=64, max_requests=2)

    async def main():
        a = [asyncio.create_task(c.submit([work("a", tag=i)])) for i in range(2)]
        await asyncio.sleep(0)  # both admitted (admission is synchronous in submit)
        with pytest.raises(Overloaded) as over:
            await c.submit([work("a", tag=9)])
        b = asyncio.create_task(c.submit([work("b", tag=5)]))  # another experiment is not affected
        await asyncio.sleep(0)
        assert c.in_flight == {"a": [2, 32], "b": [1, 16]}  # 1 x 4 float32 = 16 bytes each
        engine.gate.set()
        done = await asyncio.gather(*a, b)
        assert c.in_flight == {}  # answered: slots and bytes released
        again = await c.submit([work("a", tag=7)])
        return over.value, done, again

    over, done, again = asyncio.run(main())
    assert [float(r[0][0]["y"][0, 0]) for r in done] == [1.0, 2.0, 6.0]
    assert float(again[0][0]["y"][0, 0]) == 8.0
    code, msg = status_of(over)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert msg == "experiment 'a' has 2 requests in flight, the teacher's cap is 2: send fewer at once (prefetch depth, clients)"


@pytest.mark.unit
def test_byte_cap_counts_decoded_inputs_and_cancelled_requests_free_their_share():
    engine = GatedEngine()
    one = work("a", n=4)
    assert work_bytes(one) == 4 * 4 * 4
    c = Coalescer(engine.run, max_samples=64, max_queued_bytes=2 * work_bytes(one))

    async def main():
        first = asyncio.create_task(c.submit([work("a", n=4)]))
        second = asyncio.create_task(c.submit([work("a", n=4)]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match=r"over the teacher's cap of 0.0 MiB"):
            await c.submit([work("a", n=1)])  # 16 more bytes than the 128 allowed
        second.cancel()  # a client that went away frees its bytes at once
        await asyncio.gather(second, return_exceptions=True)
        assert c.in_flight == {"a": [1, 64]}
        third = asyncio.create_task(c.submit([work("a", n=4)]))
        await asyncio.sleep(0)
        engine.gate.set()
        return await asyncio.gather(first, third)

    results = asyncio.run(main())
    assert len(results) == 2 and c.in_flight == {}


def test_cap_over_grpc_is_resource_exhausted_and_other_experiments_pass():
    """Real server: the engine's forward lock is held, so the first request stays computing."""
    engine = TeacherEngine.from_config(tiny_vit_config(sharing={"max_requests_per_experiment": 1}))
    x = torch.rand(1, 3, 32, 32)
    spec = wire.target_spec(logits=True)
    with run_server(engine) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        engine._lock.acquire()
        try:
            first = stub.GetTargets.future(wire.build_request({"pixel_values": x}, spec, "exp-a"), timeout=30)
            other = stub.GetTargets.future(wire.build_request({"pixel_values": x}, spec, "exp-b"), timeout=30)
            deadline = time.monotonic() + 20
            while not _in_flight() and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetTargets(wire.build_request({"pixel_values": x}, spec, "exp-a"), timeout=30)
        finally:
            engine._lock.release()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == ("experiment 'exp-a' has 1 requests in flight, the teacher's cap is 1: "
                                       "send fewer at once (prefetch depth, clients)")
        assert first.result().fingerprint == other.result().fingerprint == engine.fingerprint


_SERVICERS: list = []


def _in_flight() -> bool:
    """Both first requests admitted by the server's Coalescer (the one run_server just built)."""
    return any({"exp-a", "exp-b"} <= set(s.coalescer.in_flight) for s in _SERVICERS)


@pytest.fixture(autouse=True)
def _track_servicers(monkeypatch):
    """Record the Servicers run_server builds (to read their Coalescer's state, nothing replaced)."""
    real = grpc_server.Servicer

    class Tracked(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            _SERVICERS.append(self)

    monkeypatch.setattr(grpc_server, "Servicer", Tracked)
    yield
    _SERVICERS.clear()


# -- StreamTargets flow control ----------------------------------------------------------------
class CountingService(TeacherService):
    """The real TeacherService; counts the chunks it encodes and notes when the stream is closed."""

    produced = 0
    closed = threading.Event()

    def chunks(self, *args, **kwargs):
        try:
            for chunk in super().chunks(*args, **kwargs):
                type(self).produced += 1
                yield chunk
        finally:
            type(self).closed.set()


def _wait_stable(read, settle_s: float = 1.5, limit_s: float = 30.0) -> int:
    """``read()`` once it stopped changing for ``settle_s`` (the server blocked on flow control)."""
    last, since, end = read(), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            break
    return last


def _transport_capacity_chunks(chunk_bytes: int) -> int:
    """Chunks a stalled loopback stream can hold: the kernel's largest TCP receive and send buffers
    (autotuning grows them up to these), 8 MiB of HTTP/2 windows, one chunk being encoded and one
    in gRPC's hands. 16 MiB of socket buffers where /proc is not readable."""
    try:
        rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        rmem, wmem = 12 << 20, 4 << 20
    return (rmem + wmem + (8 << 20)) // chunk_bytes + 2


def test_unread_stream_encodes_a_bounded_number_of_chunks_then_is_cancelled(monkeypatch):
    chunk_bytes = 1 << 20
    cfg = minilm_config(stream_chunk_bytes=chunk_bytes, grpc={"stream_stall_timeout_s": 3.0})
    engine = TeacherEngine.from_config(cfg)
    monkeypatch.setattr(grpc_server, "TeacherService", CountingService)
    CountingService.produced = 0
    CountingService.closed.clear()
    b, t = 64, 128
    ids = torch.randint(1000, 5000, (b, t))
    # 6 layers x 128 tokens x 384 float32 = 1.18 MB per sample > chunk_bytes: one sample per chunk
    spec = wire.target_spec(hidden={"text": [1, 2, 3, 4, 5, 6]})
    per_sample = 6 * t * 384 * 4
    total_chunks = b
    with run_server(engine) as port, grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        stream = stub.StreamTargets(wire.build_request({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, spec))
        first = next(stream)  # the forward ran; now the client stops reading
        assert first.num_chunks == total_chunks
        produced = _wait_stable(lambda: CountingService.produced)
        # What the transport took plus the chunk waiting to be sent: bounded by the loopback socket
        # buffers (TCP autotuning grows them up to the kernel's maxima) and the HTTP/2 windows, well
        # below every chunk. Encoding all at once would make this 64.
        cap = _transport_capacity_chunks(per_sample)
        assert cap < total_chunks, "the kernel's socket buffers hold every chunk: the test cannot tell"
        outstanding_bytes = produced * per_sample
        assert produced <= cap, (produced, cap, outstanding_bytes)
        assert CountingService.closed.wait(30)  # the stall watchdog cancelled the call
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.CANCELLED
        # nothing more than the flow-control window was ever encoded (a loaded machine may still have
        # been finishing one when the count looked stable)
        assert CountingService.produced <= cap, (CountingService.produced, cap)
        # the server is still serving
        assert stub.Describe(pb.DescribeRequest()).fingerprint == engine.fingerprint
    print(f"\nunread stream: {produced} of {total_chunks} chunks encoded ({outstanding_bytes / 2**20:.1f} MiB "
          f"of {total_chunks * per_sample / 2**20:.0f} MiB), chunk {per_sample / 2**20:.2f} MiB")

