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


# -- one coalescer for all clients: isolation, cancellation, bounded metrics ---------------------------

import contextlib  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from teacher_server.grpc_server import serving  # noqa: E402
from teacher_server.metrics import ExperimentLabels, sanitize  # noqa: E402
from kdserve.net import free_port  # noqa: E402


@contextlib.contextmanager
def _servicer_server(engine):
    """run_server, keeping a handle on the servicer to see its queue."""
    with serving(engine) as (port, servicer):
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
            yield servicer, pb_grpc.TeacherServiceStub(ch)


def _until(cond, what: str, limit: float = 20.0):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


POISON = 4242  # a valid token id that the patched adapter refuses


def _text(seed: int, T: int):
    return torch.randint(1000, 5000, (2, T), generator=torch.Generator().manual_seed(seed))


def _call(stub, req, out: dict, name: str, **kw):
    try:
        out[name] = stub.GetTargets(req, **kw)
    except grpc.RpcError as e:
        out[name] = e


@contextlib.contextmanager
def _held(engine, servicer, stub, results):
    """Hold the engine: a blocker request is taken into a forward that waits for the engine lock,
    so what is sent meanwhile queues and forms the next forward together."""
    engine._lock.acquire()
    spec = wire.target_spec(hidden={"text": [1]})
    blocker = threading.Thread(target=_call, args=(stub, wire.build_request(
        {"input_ids": _text(9, 4)}, spec, experiment_id="blocker"), results, "blocker"))
    blocker.start()
    _until(lambda: servicer.coalescer.queue.served_samples().get("blocker"), "the blocker's forward")
    try:
        yield
    finally:
        engine._lock.release()
        blocker.join()


def test_bad_request_fails_alone_with_invalid_argument(minilm_engine, monkeypatch):
    """Validation catches what it can before a request joins a batch; a sample that still breaks
    the forward (here: the adapter refuses a poisoned token, as a model bug would) must fail only
    its own request."""
    forwards = []
    forward = minilm_engine.adapter.forward

    def poisoned_forward(inputs, *a, **k):
        forwards.append(inputs["input_ids"].shape)
        if bool((inputs["input_ids"] == POISON).any()):
            raise IndexError("poisoned sample in the batch")
        return forward(inputs, *a, **k)

    monkeypatch.setattr(minilm_engine.adapter, "forward", poisoned_forward)
    spec = wire.target_spec(hidden={"text": [6]})
    poisoned = _text(2, 7)
    poisoned[0, 3] = POISON
    reqs = {
        "good-a": wire.build_request({"input_ids": _text(1, 5)}, spec, experiment_id="exp-a"),
        "bad": wire.build_request({"input_ids": poisoned}, spec, experiment_id="exp-b"),
        "good-c": wire.build_request({"input_ids": _text(3, 11)}, spec, experiment_id="exp-c"),
    }
    results: dict = {}
    with _servicer_server(minilm_engine) as (servicer, stub):
        with _held(minilm_engine, servicer, stub, results):
            threads = [threading.Thread(target=_call, args=(stub, r, results, n)) for n, r in reqs.items()]
            for t in threads:
                t.start()
            _until(lambda: len(servicer.coalescer.queue) == 3, "three queued requests")
        for t in threads:
            t.join()
        assert stub.Describe(pb.DescribeRequest()).fingerprint == minilm_engine.fingerprint  # still up
    assert (6, 11) in forwards  # the three shared one padded forward (2 samples each, longest 11) first
    bad = results["bad"]
    assert isinstance(bad, grpc.RpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert "poisoned" in bad.details()
    for name, seed, T in (("good-a", 1, 5), ("good-c", 3, 11)):
        got = codec.decode(results[name].outputs["hidden.text.6"])
        (ref,), _ = minilm_engine.run([Work({"input_ids": _text(seed, T)}, TargetSpec(hidden=(("text", (6,)),)))])
        torch.testing.assert_close(got, ref["hidden.text.6"], rtol=1e-4, atol=1e-4)


def test_request_past_its_deadline_is_never_computed(minilm_engine, monkeypatch):
    forwards = []
    forward = minilm_engine.adapter.forward
    monkeypatch.setattr(minilm_engine.adapter, "forward",
                        lambda inputs, *a, **k: (forwards.append(inputs["input_ids"].shape), forward(inputs, *a, **k))[1])
    spec = wire.target_spec(hidden={"text": [1]})
    results: dict = {}
    with _servicer_server(minilm_engine) as (servicer, stub):
        forwards.clear()  # the health probe's forward at start
        with _held(minilm_engine, servicer, stub, results):
            late = wire.build_request({"input_ids": _text(5, 13)}, spec, experiment_id="late")
            _call(stub, late, results, "late", timeout=0.3)  # gives up while queued
        ok = stub.GetTargets(wire.build_request({"input_ids": _text(6, 3)}, spec, experiment_id="after"))
    assert results["late"].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert codec.decode(ok.outputs["hidden.text.1"]).shape == (2, 3, 384)
    assert [s[1] for s in forwards] == [4, 3]  # the blocker and the one after; no 13-token forward


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def test_metrics_endpoint_counts_a_stream_once():
    mport = free_port()
    exp = "metrics test/é"  # sanitized to metrics_test__
    x = torch.rand(4, 3, 32, 32)
    req = wire.build_request({"pixel_values": x}, wire.target_spec(hidden={"vision": [1, 2]}), experiment_id=exp)
    engine = TeacherEngine.from_config(tiny_vit_config(stream_chunk_bytes=4096))
    with run_server(engine, metrics_port=mport) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        before = _scrape(mport)
        chunks = list(stub.StreamTargets(req))
        stub.GetTargets(req)
        after = _scrape(mport)
    assert len(chunks) == 4  # 2 x 17 x 32 x 4 B = 4352 B per sample: one sample per chunk
    label = sanitize(exp)
    assert label == "metrics_test__"
    delta = lambda name: _value(after, name, experiment=label) - _value(before, name, experiment=label)  # noqa: E731
    assert delta("kdserve_teacher_requests_total") == 2  # one stream of 4 chunks + one unary
    assert delta("kdserve_teacher_samples_total") == 8
    assert delta("kdserve_teacher_served_samples_total") == 8


@pytest.mark.unit
def test_experiment_labels_are_sanitized_and_capped():
    labels = ExperimentLabels(cap=3)
    assert labels("run/7 ü") == "run_7__"
    assert labels("x" * 100) == "x" * 64
    assert labels("") == "default"
    assert labels("late-comer") == "other"  # over the cap
    assert labels("run/7 ü") == "run_7__"  # a known one keeps its label
    assert labels("run:7 ?") == "run_7__"  # sanitizes onto a known label: no new series


def test_a_second_teacher_on_a_busy_port_fails_to_bind(vit_engine):
    """gRPC binds with SO_REUSEPORT by default: two teachers would share one port and students would
    get either one's targets. The plain server refuses instead."""
    with run_server(vit_engine) as port:
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
            with run_server(vit_engine, port=port):
                pass
