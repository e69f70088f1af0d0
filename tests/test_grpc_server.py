"""The plain gRPC frontend on loopback: real channel, real statuses, server still up after."""
from __future__ import annotations

import grpc
import pytest
import torch

from kdserve import codec, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine import TeacherEngine, Work
from teacher_server.grpc_server import run_server
from teacher_server.spec import TargetSpec
from tests import bad_inputs
from tests.conftest import tiny_vit_config


@pytest.fixture(scope="module")
def server():
    engine = TeacherEngine.from_config(
        tiny_vit_config(max_batch_size=8, max_request_bytes=1 << 20, stream_chunk_bytes=4096, max_reply_bytes=64 << 10)
    )
    with run_server(engine) as port:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS)
        yield engine, pb_grpc.TeacherServiceStub(channel)
        channel.close()


def test_describe(server):
    engine, stub = server
    info = stub.Describe(pb.DescribeRequest())
    assert info.fingerprint == engine.fingerprint
    assert [(m.name, m.num_layers, m.hidden_size, m.num_heads, m.num_tokens) for m in info.modules] == [
        ("vision", 3, 32, 2, 17)
    ]
    assert [(i.name, i.dtype, list(i.shape)) for i in info.inputs] == [("pixel_values", "float32", [-1, 3, 32, 32])]
    assert info.num_classes == 10 and info.max_batch_size == 8


def test_get_targets_equals_engine(server):
    engine, stub = server
    x = torch.rand(3, 3, 32, 32)
    reply = stub.GetTargets(wire.build_request({"pixel_values": x}, wire.target_spec(
        hidden={"vision": [1, -1]}, attention={"vision": [2]}, logits=True), sample_keys=["a", "b", "c"]))
    (ref,), _ = engine.run([Work({"pixel_values": x}, TargetSpec(
        hidden=(("vision", (1, 3)),), attention=(("vision", (2,)),), logits=True))])
    got = codec.decode_map(reply.outputs)
    assert set(got) == set(ref) == {"hidden.vision.1", "hidden.vision.3", "attention.vision.2", "logits"}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    assert list(reply.sample_keys) == ["a", "b", "c"]
    assert reply.fingerprint == engine.fingerprint
    assert reply.timings.batch_samples == 3


def test_stream_equals_unary_in_several_chunks(server):
    _, stub = server
    x = torch.rand(6, 3, 32, 32)
    req = wire.build_request({"pixel_values": x}, wire.target_spec(hidden={"vision": [1, 2]}, logits=True))
    unary = codec.decode_map(stub.GetTargets(req).outputs)
    chunks = list(stub.StreamTargets(req))
    # 4096-byte chunks, 2 layers x 17 x 32 floats per sample = 4352 B: one sample per chunk
    assert len(chunks) == 6 and all(c.num_chunks == 6 for c in chunks)
    assert [c.sample_offset for c in chunks] == list(range(6))
    merged = wire.merge_chunks(chunks)
    for k in unary:
        torch.testing.assert_close(merged[k], unary[k])


def test_reply_over_limit_is_resource_exhausted_but_streams(server):
    _, stub = server
    # 8 x 3 layers x 2 heads x 17 x 17 x 4 B = 55 KB attention + hidden 8 x 3 x 17 x 32 x 4 = 52 KB > 64 KiB
    req = wire.build_request({"pixel_values": torch.rand(8, 3, 32, 32)},
                             wire.target_spec(hidden={"vision": [1, 2, 3]}, attention={"vision": [1, 2, 3]}))
    with pytest.raises(grpc.RpcError) as e:
        stub.GetTargets(req)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "StreamTargets" in e.value.details()
    merged = wire.merge_chunks(stub.StreamTargets(req))
    assert merged["attention.vision.3"].shape == (8, 2, 17, 17)


@pytest.mark.parametrize("name,request_,code,word", bad_inputs.cases(), ids=[c[0] for c in bad_inputs.cases()])
def test_bad_input_gets_status_and_server_survives(server, name, request_, code, word):
    engine, stub = server
    for call in (stub.GetTargets, lambda r: list(stub.StreamTargets(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(request_)
        assert e.value.code() == code, e.value.details()
        assert word in e.value.details()
    assert stub.Describe(pb.DescribeRequest()).fingerprint == engine.fingerprint


def test_unknown_token_ids_are_invalid(minilm_engine):
    with run_server(minilm_engine) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        ids = torch.tensor([[101, 10**6, 102]])
        with pytest.raises(grpc.RpcError) as e:
            stub.GetTargets(wire.build_request({"input_ids": ids}, wire.target_spec(hidden={"text": [1]})))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "[0, 30522)" in e.value.details()
        ok = stub.GetTargets(wire.build_request({"input_ids": torch.tensor([[101, 2000, 102]])},
                                                wire.target_spec(hidden={"text": [6]})))
        assert codec.decode(ok.outputs["hidden.text.6"]).shape == (1, 3, 384)
