"""What one request, and all of them together, may make the teacher hold: checked from the spec and
shapes before any forward (``max_request_memory_bytes``), and reserved from admission to the last
byte of the reply (``max_memory_bytes``, streams included). Expected sizes are derived by hand from
the tiny ViT's shapes: 17 tokens (16 patches + cls), width 32, 2 heads, 3 blocks, 10 classes."""
from __future__ import annotations

import grpc
import pytest
import torch

from kdserve import wire
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine import TeacherEngine
from teacher_server.grpc_server import run_server
from teacher_server.service import TeacherService
from teacher_server.spec import TooLarge
from tests.conftest import tiny_vit_config

B, T, D, H, L, C = 4, 17, 32, 2, 3, 10
CAPTURE = L * B * T * D * 4 + B * C * 4  # every block's hidden states, float32, and the logits
REPLY_F16 = L * B * T * D * 2 + B * C * 2


def request(spec=None):
    spec = spec or wire.target_spec(hidden={"vision": [1, 2, 3]}, logits=True, dtype="float16")
    return wire.build_request({"pixel_values": torch.rand(B, 3, 32, 32)}, spec, "budget")


@pytest.fixture(scope="module")
def adapter():
    return TeacherEngine.from_config(tiny_vit_config()).adapter


def service(adapter, **cfg) -> TeacherService:
    return TeacherService(TeacherEngine(adapter, tiny_vit_config(**cfg)))


@pytest.mark.unit
def test_held_bytes_match_the_hand_count(adapter):
    assert service(adapter).prepare(request()).held_bytes == CAPTURE + REPLY_F16
    # a stream holds the capture and one chunk at a time
    assert service(adapter, stream_chunk_bytes=1000).prepare(request(), stream=True).held_bytes == CAPTURE + 1000
    # head-mean attention still captures every head: (B, H, T, T) float32 per block
    att = wire.target_spec(attention={"vision": [2]}, attention_reduction="head_mean")
    assert service(adapter).prepare(request(att)).held_bytes == B * H * T * T * 4 + B * T * T * 4


@pytest.mark.unit
def test_request_over_its_budget_is_refused_before_the_forward(adapter):
    exact = CAPTURE + REPLY_F16
    assert service(adapter, max_request_memory_bytes=exact).prepare(request()).held_bytes == exact
    with pytest.raises(TooLarge, match="max_request_memory_bytes"):
        service(adapter, max_request_memory_bytes=exact - 1).prepare(request())
    # streams too: StreamTargets skips max_reply_bytes, not this
    streamed = service(adapter, max_request_memory_bytes=CAPTURE + 1, stream_chunk_bytes=1)
    assert streamed.prepare(request(), stream=True).held_bytes == CAPTURE + 1
    with pytest.raises(TooLarge, match="max_request_memory_bytes"):
        service(adapter, max_request_memory_bytes=CAPTURE, stream_chunk_bytes=1).prepare(request(), stream=True)


@pytest.mark.unit
def test_requests_in_flight_share_max_memory_bytes(adapter):
    held = CAPTURE + REPLY_F16
    svc = service(adapter, max_memory_bytes=held * 2 + held // 2, max_request_memory_bytes=held * 2)
    a, b, c = (svc.prepare(request()) for _ in range(3))
    svc.reserve(a)
    svc.reserve(b)
    with pytest.raises(TooLarge, match="max_memory_bytes"):
        svc.reserve(c)
    svc.release(a)
    svc.release(a)  # idempotent
    svc.reserve(c)
    assert svc.held == 2 * held
    svc.release(b), svc.release(c)
    assert svc.held == 0


@pytest.mark.unit
def test_config_rejects_a_request_budget_over_the_total():
    with pytest.raises(ValueError, match="max_request_memory_bytes"):
        tiny_vit_config(max_request_memory_bytes=2 << 30, max_memory_bytes=1 << 30)


def test_unread_stream_holds_its_reservation_until_it_ends(adapter):
    """Over real gRPC: while a stream is open and unread, a second request that would pass
    max_memory_bytes gets RESOURCE_EXHAUSTED; once the stream is cancelled, it is answered.

    The reply (256 samples, float32: 1.6 MB) is many times the client's HTTP/2 window (64 KiB, BDP
    probing off), so the server cannot hand the whole stream to the transport and end it early: a
    reply that fits the window is gone from the handler, and its reservation with it."""
    big = 256
    spec = wire.target_spec(hidden={"vision": [1, 2, 3]}, logits=True, dtype="float32")
    msg = wire.build_request({"pixel_values": torch.rand(big, 3, 32, 32)}, spec, "budget")
    chunk = 16 << 10
    held = L * big * T * D * 4 + big * C * 4 + chunk
    cfg = tiny_vit_config(stream_chunk_bytes=chunk, max_batch_size=big, max_memory_bytes=held + held // 2,
                          max_request_memory_bytes=held)
    engine = TeacherEngine(adapter, cfg)
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 << 10)]
    with run_server(engine, health_interval_s=0) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS + window) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        stream = stub.StreamTargets(msg, timeout=60)
        next(stream)  # the first chunk: the request is admitted and its outputs held
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StreamTargets(msg, timeout=60))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_memory_bytes" in e.value.details()
        stream.cancel()
        for _ in range(200):  # the server sees the cancellation asynchronously
            try:
                assert len(list(stub.StreamTargets(msg, timeout=60))) > 1
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            pytest.fail("the cancelled stream's reservation was never released")
