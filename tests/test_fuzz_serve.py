"""The seeded fuzzer of tests/test_fuzz.py against the Ray Serve gRPC proxy (the session's apps:
tiny ViT "teacher", MiniLM "minilm"): the proxy and the replicas turn every malformed request
into OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a short, printable, traceback-free message,
and the apps still answer a good request afterwards."""
from __future__ import annotations

import collections
import random

import grpc
import pytest

from kdserve import wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.spec import MESSAGE_CHARS
from tests.test_fuzz import ALLOWED, _valid, generate

pytestmark = pytest.mark.cluster
# Fewer than the plain server's run: every call crosses the proxy and a replica actor.
CASES = [("teacher", 50, 10), ("minilm", 30, 11)]


def _call(stub, req: pb.TargetsRequest, app: str, stream: bool) -> tuple[grpc.StatusCode, str]:
    md = (("application", app),)
    try:
        if stream:
            list(stub.StreamTargets(req, timeout=60, metadata=md))
        else:
            stub.GetTargets(req, timeout=60, metadata=md)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


@pytest.mark.parametrize("app,n,seed", CASES)
def test_fuzz_serve_no_internal_and_apps_live(serve_teachers, app, n, seed):
    text = app == "minilm"
    counts: collections.Counter = collections.Counter()
    failures = []
    with grpc.insecure_channel(f"127.0.0.1:{serve_teachers['port']}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        fingerprint = stub.Describe(pb.DescribeRequest(), timeout=60, metadata=(("application", app),)).fingerprint
        for i, (name, req) in enumerate(generate(seed, n, text=text)):
            code, msg = _call(stub, req, app, stream=i % 4 == 3)
            counts[code.name] += 1
            if code not in ALLOWED or len(msg) > MESSAGE_CHARS or not msg.isprintable() or "Traceback" in msg:
                failures.append((i, name, code.name, msg[:300]))
        reply = stub.GetTargets(_valid(random.Random(99), text=text), timeout=60, metadata=(("application", app),))
        assert reply.fingerprint == fingerprint and reply.outputs
    print(f"\nfuzz serve {app}: {n} requests -> {dict(sorted(counts.items()))}")
    assert not failures, failures[:10]
    assert counts["INVALID_ARGUMENT"] > n // 2  # the generator really produces bad requests


@pytest.mark.parametrize("app,seed", [("teacher", 12), ("minilm", 13)])
def test_raw_bytes_through_the_proxy_never_unknown(serve_teachers, app, seed):
    """Raw bytes through Serve's gRPC proxy (kdserve.methods parses them there): INVALID_ARGUMENT
    with our fixed line, never UNKNOWN; the app answers a good request after."""
    from tests.test_fuzz import check_raw

    text = app == "minilm"
    rng = random.Random(seed)
    valid = [_valid(rng, text=text).SerializeToString() for _ in range(8)]
    md = (("application", app),)
    with grpc.insecure_channel(f"127.0.0.1:{serve_teachers['port']}", options=wire.CHANNEL_OPTIONS) as ch:
        counts = check_raw(ch, valid, 80, seed, metadata=md)
        reply = pb_grpc.TeacherServiceStub(ch).GetTargets(pb.TargetsRequest.FromString(valid[0]), timeout=60, metadata=md)
        assert reply.outputs
    print(f"\nraw fuzz serve {app}: 80 requests -> {dict(sorted(counts.items()))}")
    assert counts["INVALID_ARGUMENT"] > 40
