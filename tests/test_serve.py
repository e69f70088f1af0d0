"""The Ray Serve frontend over the real gRPC proxy on loopback (one shared cluster per session)."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch

from kdserve import codec, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine import TeacherEngine, Work
from teacher_server.spec import TargetSpec
from tests import bad_inputs

pytestmark = pytest.mark.cluster
MINILM = (("application", "minilm"),)
VIT = (("application", "teacher"),)


class AppStub:
    """A stub whose calls name a Serve application (required once two apps share the proxy)."""

    def __init__(self, channel, app_metadata):
        self._stub = pb_grpc.TeacherServiceStub(channel)
        self._md = app_metadata

    def __getattr__(self, rpc):
        method = getattr(self._stub, rpc)

        def call(request, metadata=None, **kw):
            return method(request, metadata=metadata or self._md, **kw)

        call.future = lambda request, **kw: method.future(request, metadata=self._md, **kw)
        return call


@pytest.fixture(scope="module")
def stub(serve_teachers):
    channel = grpc.insecure_channel(f"127.0.0.1:{serve_teachers['port']}", options=wire.CHANNEL_OPTIONS)
    yield AppStub(channel, VIT)
    channel.close()


@pytest.fixture(scope="module")
def local_vit(serve_teachers):
    """The same teacher built in the test process: Serve must answer exactly what it computes."""
    return TeacherEngine.from_config(serve_teachers["vit"])


def test_describe_both_apps(stub, local_vit):
    vit = stub.Describe(pb.DescribeRequest())
    assert vit.fingerprint == local_vit.fingerprint
    assert vit.modules[0].num_layers == 3 and vit.max_batch_size == 8
    mini = stub.Describe(pb.DescribeRequest(), metadata=MINILM)
    assert mini.model_name.startswith("minilm")
    assert [(m.name, m.num_layers, m.hidden_size, m.num_heads) for m in mini.modules] == [("text", 6, 384, 12)]


def test_get_targets_equal_local_engine(stub, local_vit):
    x = torch.rand(2, 3, 32, 32)
    reply = stub.GetTargets(wire.build_request({"pixel_values": x}, wire.target_spec(
        hidden={"vision": [2]}, hidden_reduction="data2vec", attention={"vision": [3]}, logits=True, logits_top_k=4)))
    (ref,), _ = local_vit.run([Work({"pixel_values": x}, TargetSpec(
        hidden=(("vision", (2,)),), hidden_reduction="data2vec", attention=(("vision", (3,)),),
        logits=True, logits_top_k=4))])
    got = codec.decode_map(reply.outputs)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)
    assert reply.fingerprint == local_vit.fingerprint


def test_minilm_targets(stub):
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2204, 2851, 2000, 102]])
    mask = (ids != 0).long()
    reply = stub.GetTargets(wire.build_request({"input_ids": ids, "attention_mask": mask}, wire.target_spec(
        hidden={"text": [-1]}, attention={"text": [6]}, attention_reduction="head_mean", dtype="float16")),
        metadata=MINILM)
    out = codec.decode_map(reply.outputs)
    assert out["hidden.text.6"].shape == (2, 5, 384) and out["hidden.text.6"].dtype == torch.float16
    rows = out["attention.text.6"].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_stream_targets_chunks_merge_to_unary(stub):
    req = wire.build_request({"pixel_values": torch.rand(4, 3, 32, 32)},
                             wire.target_spec(hidden={"vision": [1, 3]}, dtype="int8"))
    chunks = list(stub.StreamTargets(req))
    assert len(chunks) > 1
    merged = wire.merge_chunks(chunks)
    unary = codec.decode_map(stub.GetTargets(req).outputs)
    for k in unary:
        torch.testing.assert_close(merged[k], unary[k])


def test_concurrent_clients_share_batches(serve_teachers):
    """4 clients (4 experiments) at once: the server must merge their requests into batches."""
    port = serve_teachers["port"]
    seen: list[pb.Timings] = []
    errors: list[Exception] = []

    def client(i: int) -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
                s = AppStub(ch, VIT)
                futures = [s.GetTargets.future(wire.build_request(
                    {"pixel_values": torch.rand(1, 3, 32, 32)}, wire.target_spec(hidden={"vision": [i % 3 + 1]}),
                    experiment_id=f"exp-{i}")) for _ in range(6)]
                seen.extend(f.result().timings for f in futures)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(seen) == 24
    assert max(t.batch_requests for t in seen) > 1
    assert max(t.batch_samples for t in seen) > 1


@pytest.mark.parametrize("name,request_,code,word", bad_inputs.cases(), ids=[c[0] for c in bad_inputs.cases()])
def test_bad_input_gets_status_and_server_survives(stub, local_vit, name, request_, code, word):
    with pytest.raises(grpc.RpcError) as e:
        stub.GetTargets(request_)
    assert e.value.code() == code, e.value.details()
    assert word in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamTargets(request_))
    assert e.value.code() == code, e.value.details()
    assert stub.Describe(pb.DescribeRequest()).fingerprint == local_vit.fingerprint


@pytest.fixture(scope="module")
def secured(serve_teachers, tmp_path_factory):
    """A third app whose replicas need a bearer token (TeacherConfig.serve.auth_token_file), cap bytes
    and take streams of at most 4 KiB through the proxy."""
    from ray import serve

    from tests.conftest import tiny_vit_config
    from teacher_server.serve_app import build_app

    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text("s3cret-serve\n")
    cfg = tiny_vit_config(serve={"num_cpus": 0.25, "auth_token_file": str(token_file), "proxy_stream_max_bytes": 4096},
                          sharing={"max_queued_bytes_per_experiment": 64 << 10})
    serve.run(build_app(cfg.model_dump()), name="secured", route_prefix="/secured")
    channel = grpc.insecure_channel(f"127.0.0.1:{serve_teachers['port']}", options=wire.CHANNEL_OPTIONS)
    yield pb_grpc.TeacherServiceStub(channel), TeacherEngine.from_config(cfg)
    channel.close()


SECURED = ("application", "secured")


def test_serve_proxy_forwards_the_token_and_replicas_check_it(secured):
    from kdserve import auth

    stub, engine = secured
    req = wire.build_request({"pixel_values": torch.rand(1, 3, 32, 32)}, wire.target_spec(logits=True), "ünï-実験")
    good = (SECURED, *auth.metadata("s3cret-serve"))
    for md, msg in (((SECURED,), auth.MISSING), ((SECURED, *auth.metadata("wrong")), auth.WRONG)):
        for call in (lambda: stub.GetTargets(req, metadata=md), lambda: list(stub.StreamTargets(req, metadata=md)),
                     lambda: stub.Describe(pb.DescribeRequest(), metadata=md)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, msg)
    reply = stub.GetTargets(req, metadata=good)  # a non-ASCII experiment id is served
    (ref,), _ = engine.run([Work({"pixel_values": codec.decode(req.inputs["pixel_values"])}, TargetSpec(logits=True))])
    torch.testing.assert_close(codec.decode_map(reply.outputs)["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert [c.fingerprint for c in stub.StreamTargets(req, metadata=good)] == [engine.fingerprint]
    assert stub.Describe(pb.DescribeRequest(), metadata=good).fingerprint == engine.fingerprint


def test_serve_byte_cap_is_resource_exhausted(secured):
    from kdserve import auth

    stub, _ = secured
    big = wire.build_request({"pixel_values": torch.rand(8, 3, 32, 32)}, wire.target_spec(logits=True), "cap")  # 96 KiB
    md = (SECURED, *auth.metadata("s3cret-serve"))
    for call in (lambda: stub.GetTargets(big, metadata=md), lambda: list(stub.StreamTargets(big, metadata=md))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == ("experiment 'cap' has 0.0 MiB of requests in flight; 0.1 MiB more is over "
                                     "the teacher's cap of 0.1 MiB")


def test_a_big_stream_is_refused_by_the_proxy_and_served_by_the_replica(secured):
    """The proxy buffers a stream whole (no flow control): over serve.proxy_stream_max_bytes it is
    RESOURCE_EXHAUSTED before any forward, and the replica's own endpoint streams it."""
    from kdserve import auth, limits

    stub, engine = secured
    x = torch.rand(4, 3, 32, 32)
    req = wire.build_request({"pixel_values": x}, wire.target_spec(hidden={"vision": [1, 2, 3]}), "big-stream")
    md = (SECURED, *auth.metadata("s3cret-serve"))
    info = stub.Describe(pb.DescribeRequest(), metadata=md)
    size = limits.estimate_reply_bytes(info, 4, 0, req.spec)
    assert size > 4096  # the case under test
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamTargets(req, metadata=md))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details().startswith(f"a stream of {size} bytes through Ray Serve's gRPC proxy is over "
                                        "serve.proxy_stream_max_bytes (4096;")
    small = wire.build_request({"pixel_values": x[:1]}, wire.target_spec(logits=True), "small-stream")
    assert len(list(stub.StreamTargets(small, metadata=md))) == 1  # under the bound: still served
    (endpoint, *_) = info.replica_endpoints
    with grpc.insecure_channel(endpoint, options=wire.CHANNEL_OPTIONS) as ch:
        chunks = list(pb_grpc.TeacherServiceStub(ch).StreamTargets(req, metadata=auth.metadata("s3cret-serve")))
    got = {k: torch.cat([codec.decode(c.outputs[k]) for c in chunks]) for k in chunks[0].outputs}
    (ref,), _ = engine.run([Work({"pixel_values": x}, TargetSpec(hidden=(("vision", (1, 2, 3)),)))])
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)
