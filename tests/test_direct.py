"""Ray Serve replicas' own endpoints (teacher_server/direct.py) on the session's real cluster: Describe
through the proxy lists them, they answer what the proxy answers, under the same token; the client
spreads its requests over them, and a replica that goes away costs it nothing but a retry."""
from __future__ import annotations

import time

import grpc
import pytest
import torch

from kdserve import codec, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import direct

pytestmark = pytest.mark.cluster
TOKEN = "d1rect-token"
SPEC = wire.target_spec(hidden={"vision": [1, 3]}, logits=True)


def describe(port: int, app: str, token: str | None = None) -> pb.TeacherInfo:
    md = (("application", app), *((("authorization", f"Bearer {token}"),) if token else ()))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest(), metadata=md)


def until(pred, timeout_s: float = 120.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"not within {timeout_s:g} s: {what}")


def test_each_replica_answers_what_the_proxy_answers(serve_teachers):
    port = serve_teachers["port"]
    (endpoint,) = until(lambda: list(describe(port, "teacher").replica_endpoints), what="the replica's endpoint")
    req = wire.build_request({"pixel_values": torch.rand(3, 3, 32, 32)}, SPEC, "direct")
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as proxy, \
            grpc.insecure_channel(endpoint, options=wire.CHANNEL_OPTIONS) as mine:
        via_proxy = pb_grpc.TeacherServiceStub(proxy).GetTargets(req, metadata=(("application", "teacher"),))
        via_replica = pb_grpc.TeacherServiceStub(mine).GetTargets(req)
    a, b = codec.decode_map(via_proxy.outputs), codec.decode_map(via_replica.outputs)
    assert a.keys() == b.keys() == {"hidden.vision.1", "hidden.vision.3", "logits"}
    for k in a:
        torch.testing.assert_close(a[k], b[k])  # one engine, one batcher: the same forward's numbers
    assert via_replica.fingerprint == via_proxy.fingerprint


@pytest.fixture(scope="module")
def two_replicas(serve_teachers, tmp_path_factory):
    from ray import serve

    from teacher_server.serve_app import build_app
    from tests.conftest import tiny_vit_config

    token_file = tmp_path_factory.mktemp("direct") / "token"
    token_file.write_text(TOKEN + "\n")

    def run(replicas: int):
        cfg = tiny_vit_config(serve={"num_cpus": 0.25, "num_replicas": replicas, "auth_token_file": str(token_file)})
        serve.run(build_app(cfg.model_dump()), name="direct2", route_prefix="/direct2")

    run(2)
    yield serve_teachers["port"], run
    serve.delete("direct2")


def test_client_spreads_over_replicas_and_rides_out_one_leaving(two_replicas):
    from student_workers.client.sync_client import SyncTeacherClient

    port, redeploy = two_replicas
    endpoints = until(lambda: len(describe(port, "direct2", TOKEN).replica_endpoints) == 2
                      and list(describe(port, "direct2", TOKEN).replica_endpoints), what="two endpoints")
    for _ in range(4):  # each Describe lists each live replica once (answers are not accumulated)
        assert sorted(describe(port, "direct2", TOKEN).replica_endpoints) == sorted(endpoints)
    for e in endpoints:  # the same token guards the replicas' own ports
        with grpc.insecure_channel(e) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    x = torch.rand(2, 3, 32, 32)
    with SyncTeacherClient(f"grpc://127.0.0.1:{port}/direct2", auth_token=TOKEN, experiment_id="spread",
                           timeout=30, retry_budget_s=60) as c:
        c.describe()
        for _ in range(12):
            c.get_targets({"pixel_values": x}, SPEC)
        sent = c.client.transport.sent
        # one call at a time: the fewest-in-flight choice alternates, so each replica takes half
        assert sorted(sent.get(e, 0) for e in endpoints) == [6, 6], sent
        redeploy(1)  # Serve stops one replica: its endpoint leaves the registry as it stops
        until(lambda: len(describe(port, "direct2", TOKEN).replica_endpoints) == 1, what="one endpoint left")
        outs = [c.get_targets({"pixel_values": x}, SPEC) for _ in range(12)]  # none fails
    assert all(o["hidden.vision.1"].shape == (2, 17, 32) for o in outs)


@pytest.mark.unit
def test_registry_entries_expire():
    now = 1000.0
    entries = [b'{"endpoint": "10.0.0.2:4000", "t": 999.0}', b'{"endpoint": "10.0.0.3:4000", "t": 980.0}',
               b'{"endpoint": "10.0.0.4:4000", "t": 990.0}', b"not json", None, b'{"t": 999}']
    assert direct.fresh(entries, now, ttl_s=15.0) == ["10.0.0.2:4000", "10.0.0.4:4000"]
    assert direct.fresh(entries, now, ttl_s=5.0) == ["10.0.0.2:4000"]


@pytest.mark.unit
def test_transport_picks_the_least_busy_replica_and_drops_a_lost_one():
    import asyncio

    from student_workers.client.grpc_transport import GrpcTransport

    async def main():
        t = GrpcTransport.from_address("grpc://127.0.0.1:9/app")
        assert t._pick().target == "127.0.0.1:9"  # no replicas listed: the address given
        t._replicas, t._listed_at = ["10.0.0.2:4000", "10.0.0.3:4000"], 1e18  # (no relisting in this test)
        a = t._pick()
        a.in_flight = 2
        b = t._pick()
        assert {a.target, b.target} == set(t._replicas)  # the idle one, while the other has calls in flight
        b.in_flight = 3
        assert t._pick() is a
        t._drop(a)  # it answered UNAVAILABLE
        assert t._replicas == [b.target] and t._pick() is b
        t._drop(b)
        assert t._pick().target == "127.0.0.1:9"  # none left: back to the proxy
        await t.close()
        assert not GrpcTransport.from_address("grpcs://127.0.0.1:9").direct  # never plaintext beside TLS

    asyncio.run(main())


@pytest.mark.unit
def test_caps_split_over_replicas():
    # written out: the floor of cap / replicas, at least 1; 0 ("no cap") stays 0
    cases = {(6, 3): 2, (6, 4): 1, (7, 3): 2, (2, 3): 1, (5, 1): 5, (0, 3): 0, (32, 0): 32}
    assert {k: direct.split_cap(*k) for k in cases} == cases


@pytest.mark.unit
def test_content_routing_keeps_keys_where_they_were():
    from student_workers.client.grpc_transport import content_key, owner

    x = torch.rand(2, 3, 32, 32)
    a = wire.build_request({"pixel_values": x}, SPEC, "exp-a")
    assert content_key(a) == content_key(wire.build_request({"pixel_values": x}, SPEC, "exp-b"))  # any experiment
    assert content_key(a) != content_key(wire.build_request({"pixel_values": x}, wire.target_spec(logits=True), "e"))
    assert content_key(a) != content_key(wire.build_request({"pixel_values": x + 1}, SPEC, "exp-a"))
    three = ["10.0.0.2:4000", "10.0.0.3:4000", "10.0.0.4:4000"]
    keys = [bytes([i % 256, i // 256]) * 8 for i in range(3000)]
    before = {k: owner(k, three) for k in keys}
    counts = {e: sum(v == e for v in before.values()) for e in three}
    assert all(800 < n < 1200 for n in counts.values()), counts  # about a third each
    after = {k: owner(k, three[:2]) for k in keys}  # the third replica leaves
    assert all(after[k] == before[k] for k in keys if before[k] != three[2])  # only its keys move


@pytest.fixture(scope="module")
def three_replicas(serve_teachers, tmp_path_factory):
    """A synthetic teacher (2 s per forward, no CPU) on 3 replicas, capped at 6 requests in flight per
    experiment, with a target cache."""
    from ray import serve

    from kdserve.teacher_config import TeacherConfig
    from teacher_server.serve_app import build_app

    cfg = TeacherConfig(model="synthetic:layers=2,tokens=4,dim=8,heads=2,classes=0,image_size=8,latency_ms=2000",
                        device="cpu", serve={"num_cpus": 0.1, "num_replicas": 3},
                        sharing={"max_requests_per_experiment": 6, "cache_bytes": 1 << 20})
    serve.run(build_app(cfg.model_dump()), name="three", route_prefix="/three")
    port = serve_teachers["port"]
    until(lambda: len(describe(port, "three").replica_endpoints) == 3, what="three endpoints")
    time.sleep(2 * direct.HEARTBEAT_S + 1)  # every replica has counted the three at a heartbeat since
    yield port, list(describe(port, "three").replica_endpoints)
    serve.delete("three")


def test_a_capped_experiment_stays_under_its_cap_across_replicas(three_replicas):
    _, endpoints = three_replicas
    req = wire.build_request({"pixel_values": torch.rand(1, 3, 8, 8)}, wire.target_spec(hidden={"vision": [2]}), "capped")
    channels = [grpc.insecure_channel(e) for e in endpoints]
    try:
        # 4 at once on each replica, 12 in all, while each forward takes 2 s: a replica admits 6 // 3
        calls = [pb_grpc.TeacherServiceStub(ch).GetTargets.future(req, timeout=60) for ch in channels for _ in range(4)]
        codes = [c.exception().code() if c.exception() else grpc.StatusCode.OK for c in calls]
    finally:
        for ch in channels:
            ch.close()
    assert codes.count(grpc.StatusCode.OK) == 6, codes  # the experiment's cap, not 3 x the cap
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6, codes


def test_a_repeated_experiment_finds_its_targets_on_any_replica_set(three_replicas):
    import asyncio

    from student_workers.client.grpc_transport import GrpcTransport

    port, _ = three_replicas
    batches = [wire.build_request({"pixel_values": torch.rand(2, 3, 8, 8)}, wire.target_spec(hidden={"vision": [2]}),
                                  "first") for _ in range(6)]

    async def run(experiment: str) -> list[float]:
        t = GrpcTransport.from_address(f"grpc://127.0.0.1:{port}/three")
        await t.describe(30)
        assert len(t._replicas) == 3 and t._by_content
        out = []
        for b in batches:
            b.experiment_id = experiment
            out.append((await t.get_targets(b, 60)).timings.compute_ms)
        await t.close()
        return out

    first, second = asyncio.run(run("first")), asyncio.run(run("second"))
    assert all(ms > 0 for ms in first)  # six forwards
    assert second == [0.0] * 6  # the same six, each at the replica that computed it: no forward
