"""TeacherClient over real gRPC on loopback: targets equal the engine's own, failure modes are loud.

Every server here is a real ``grpc.server`` (``teacher_server.grpc_server``); expected targets are
computed by calling the engine directly in the test, not through the client.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import re
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import torch

from kdserve import wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from student_workers.client.async_client import connect, TeacherClient
from student_workers.client.errors import FingerprintMismatch, TeacherError, TeacherUnavailable
from student_workers.client.grpc_transport import GrpcTransport
from student_workers.client.stats import estimate_reply_bytes
from student_workers.client.sync_client import SyncTeacherClient
from teacher_server.engine import Quantized, TeacherEngine, Work
from teacher_server.grpc_server import Servicer, run_server, serving
from teacher_server.spec import resolve_spec
from kdserve.net import free_port
from tests.conftest import tiny_vit_config

FAST = dict(timeout=5.0, max_retries=2, backoff_s=0.01, max_backoff_s=0.05, seed=0)


def images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


def direct(engine: TeacherEngine, inputs: dict[str, torch.Tensor], spec: pb.TargetSpec) -> dict[str, torch.Tensor]:
    """The engine's answer without any transport (int8 dequantised like the client does)."""
    (out,), _ = engine.run([Work(inputs, resolve_spec(spec, engine.modules, engine.num_classes))])
    return {k: v.q.float() * v.scales.unsqueeze(-1) if isinstance(v, Quantized) else v for k, v in out.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def vit_port(vit_engine) -> Iterator[int]:
    with run_server(vit_engine) as port:
        yield port


SPEC = wire.target_spec(hidden={"vision": [1, -1]}, attention={"vision": [2]}, logits=True)


def test_describe(vit_engine, vit_port):
    async def go():
        async with TeacherClient(f"grpc://127.0.0.1:{vit_port}", **FAST) as c:
            info = await c.describe()
            assert await c.describe() is info  # cached
            return info, c.expected_fingerprint

    info, fp = run(go())
    assert info.fingerprint == vit_engine.fingerprint == fp
    assert info.model_name == vit_engine.model_name
    assert [m.name for m in info.modules] == ["vision"]
    assert list(info.inputs[0].shape) == [-1, 3, 32, 32]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_get_targets_equal_engine(vit_engine, vit_port, dtype):
    spec = wire.target_spec(hidden={"vision": [1, -1]}, attention={"vision": [2]}, logits=True, dtype=dtype)
    x = images(4, seed=1)

    async def go():
        async with TeacherClient(f"127.0.0.1:{vit_port}", experiment_id="t", **FAST) as c:
            out = await c.get_targets({"pixel_values": x}, spec, sample_keys=[f"s{i}" for i in range(4)])
            return out, c.stats

    out, stats = run(go())
    assert sorted(out) == ["attention.vision.2", "hidden.vision.1", "hidden.vision.3", "logits"]
    assert out["hidden.vision.3"].shape == (4, 17, 32)  # (B, T, D)
    assert out["attention.vision.2"].shape == (4, 2, 17, 17)  # (B, H, T, T)
    assert_same(out, direct(vit_engine, {"pixel_values": x}, spec))
    assert stats.requests == 1 and stats.retries == 0 and stats.samples == 4
    assert stats.bytes_received > 0 and stats.wait_s > 0


def test_minilm_targets(minilm_engine):
    ids = torch.randint(1000, 2000, (3, 9), generator=torch.Generator().manual_seed(2))  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    spec = wire.target_spec(hidden={"text": [2, 6]}, hidden_reduction="data2vec")
    with run_server(minilm_engine) as port, SyncTeacherClient(f"grpc://127.0.0.1:{port}", **FAST) as c:
        out = c.get_targets(inputs, spec)
    assert out["data2vec.text"].shape == (3, 9, 384)  # (B, T, D)
    assert_same(out, direct(minilm_engine, inputs, spec))


@pytest.fixture(scope="module")
def chunky_port() -> Iterator[int]:
    """The same tiny ViT with small reply limits: streams split into several chunks."""
    engine = TeacherEngine.from_config(tiny_vit_config(stream_chunk_bytes=4096, max_reply_bytes=20_000))
    with run_server(engine) as port:
        yield port


def test_stream_equals_unary(vit_engine, vit_port, chunky_port):
    x = images(6, seed=3)
    spec = wire.target_spec(hidden={"vision": [1, 2, 3]}, logits=True)

    async def go():
        async with TeacherClient(f"grpc://127.0.0.1:{vit_port}", **FAST) as unary, \
                TeacherClient(f"grpc://127.0.0.1:{chunky_port}", stream=True, **FAST) as streamed:
            a = await unary.get_targets({"pixel_values": x}, spec, stream=False)
            b = await streamed.get_targets({"pixel_values": x}, spec, sample_keys=list("abcdef"))
            return a, b, streamed.stats

    a, b, st = run(go())
    assert st.streamed == 1 and st.chunks > 1  # really split: 6 samples x 3 layers x 2 KiB > 4 KiB
    assert_same(b, a)
    assert_same(a, direct(vit_engine, {"pixel_values": x}, spec))


def test_auto_stream_above_max_reply_bytes(chunky_port):
    """Above the teacher's max_reply_bytes the client streams by itself; forced unary is refused."""
    x = images(8, seed=4)
    spec = wire.target_spec(hidden={"vision": [1, 2, 3]})

    async def go():
        async with TeacherClient(f"grpc://127.0.0.1:{chunky_port}", **FAST) as c:
            info = await c.describe()
            assert estimate_reply_bytes(info, {"pixel_values": x}, spec) == 3 * 8 * 17 * 32 * 4 > info.max_reply_bytes
            out = await c.get_targets({"pixel_values": x}, spec)
            assert c.stats.streamed == 1
            with pytest.raises(TeacherError) as err:
                await c.get_targets({"pixel_values": x}, spec, stream=False)
            return out, err.value, c.stats.retries

    out, err, retries = run(go())
    assert out["hidden.vision.3"].shape == (8, 17, 32)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and retries == 0


def test_invalid_argument_raises_at_once(vit_port, client_clock):
    bad = wire.target_spec(hidden={"vision": [99]})
    addr = f"grpc://127.0.0.1:{vit_port}"

    async def go():
        async with TeacherClient(addr, timeout=5.0, max_retries=5, backoff_s=1.0) as c:
            with pytest.raises(TeacherError) as err:
                await c.get_targets({"pixel_values": images(2)}, bad)
            return err.value, c.stats

    err, stats = run(go())
    assert not isinstance(err, TeacherUnavailable)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err).startswith(f"teacher at {addr} answered INVALID_ARGUMENT: ")
    assert "layer 99 is out of range" in str(err) and "\n" not in str(err)
    assert stats.retries == 0 and client_clock.sleeps == []  # no 1 s backoff, not even one


def test_unreachable_raises_unavailable_bounded():
    port = free_port()  # nothing listens here
    c = SyncTeacherClient(f"grpc://127.0.0.1:{port}", timeout=1.0, max_retries=3, backoff_s=0.02, max_backoff_s=0.05)
    with pytest.raises(TeacherUnavailable) as err:
        c.get_targets({"pixel_values": images(1)}, SPEC)
    c.close()
    assert c.stats.retries == 3 and err.value.attempts == 4  # max_retries caps the count when given
    msg = str(err.value)
    assert msg.startswith(f"teacher unreachable at grpc://127.0.0.1:{port} for ")
    assert "(last status UNAVAILABLE: " in msg and "tried 4 times" in msg and "check that the teacher" in msg
    assert "\n" not in msg


def test_retry_budget_is_the_stopping_rule(caplog, client_clock):
    """Without max_retries the client retries until retry_budget_s is spent, logging the outage once
    (then at most one line per RETRY_LOG_S), not every retry.

    Real refused connections, the client's clock faked (``client_clock``): only its backoff sleeps
    move it, so the count of attempts does not depend on how fast this machine refuses them."""
    caplog.set_level(logging.WARNING, logger="kdserve.client")
    port = free_port()
    budget = 1.0
    c = SyncTeacherClient(f"grpc://127.0.0.1:{port}", timeout=1.0, retry_budget_s=budget, backoff_s=0.02,
                          max_backoff_s=0.1, seed=0)
    assert c.client.max_retries is None and c.client.max_call_s() == budget + 1.0
    with pytest.raises(TeacherUnavailable) as err:
        c.describe()
    c.close()
    e = err.value
    sleeps = client_clock.sleeps
    assert e.attempts == c.stats.retries + 1 == len(sleeps) + 1  # one backoff before each retry
    for i, s in enumerate(sleeps):  # backoff_s * 2**i, capped at max_backoff_s, jittered into [0.5, 1]
        assert 0.5 * min(0.1, 0.02 * 2**i) <= s <= min(0.1, 0.02 * 2**i)
    # every retry was decided inside the budget, and it stopped only once the next backoff (at
    # most 0.1 s) could have crossed it; at most 0.02 + 0.04 + 0.08 + 0.1 per further backoff,
    # passing 0.9 s takes at least 11 of them
    assert e.elapsed_s == pytest.approx(sum(sleeps))
    assert budget - c.client.max_backoff_s < e.elapsed_s <= budget
    assert e.attempts >= 12
    lines = [r.getMessage() for r in caplog.records if r.name == "kdserve.client"]
    assert len(lines) == 1  # RETRY_LOG_S (30 s) is longer than the whole budget
    assert re.fullmatch(r"teacher unavailable, retrying for up to 1 s \(Describe at grpc://127\.0\.0\.1:\d+ "
                        r"answered UNAVAILABLE; 0 s so far, attempt 1\)", lines[0]), lines[0]


class SilentServicer(pb_grpc.TeacherServiceServicer):
    """Accepts every call and never answers (until released): a hung teacher."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def Describe(self, request, context):
        self.calls += 1
        self.release.wait(30)
        context.abort(grpc.StatusCode.CANCELLED, "released")


def test_silent_teacher_fails_each_call_at_its_deadline_then_one_line(client_clock):
    servicer = SilentServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TeacherServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        # the count of attempts is capped by max_retries (the budget, on the fake client clock,
        # is never reached): each attempt ends at its own 0.3 s deadline, however slow the machine
        c = SyncTeacherClient(f"grpc://127.0.0.1:{port}", timeout=0.3, retry_budget_s=60.0, max_retries=2,
                              backoff_s=0.01, max_backoff_s=0.02, seed=0)
        with pytest.raises(TeacherUnavailable) as err:
            c.describe()
        c.close()
    finally:
        servicer.release.set()
        server.stop(None)
    e = err.value
    assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # every attempt reached the hung teacher and ended in DEADLINE_EXCEEDED, which was retried
    assert e.attempts == 3 == servicer.calls and len(client_clock.sleeps) == 2
    assert re.fullmatch(rf"teacher unreachable at grpc://127\.0\.0\.1:{port} for [0-9.]+ s "
                        r"\(last status DEADLINE_EXCEEDED: [^)]*\); Describe tried \d+ times; .*", str(e))
    assert "\n" not in str(e)


@pytest.mark.unit
@pytest.mark.parametrize("err", [
    TeacherError(grpc.StatusCode.INVALID_ARGUMENT, "layer 99 is out of range", "grpc://h:1"),
    FingerprintMismatch("grpc://h:1", "aaaa", "bbbb"),
    TeacherUnavailable(grpc.StatusCode.UNAVAILABLE, "down", "grpc://h:1", message="teacher unreachable at grpc://h:1"),
], ids=["TeacherError", "FingerprintMismatch", "TeacherUnavailable"])
def test_errors_survive_pickle(err):
    """Errors cross Ray (worker -> driver) by pickling; custom __init__ signatures must not break it."""
    err.elapsed_s = 12.5
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert (back.code, back.details, back.address, back.elapsed_s) == (err.code, err.details, err.address, 12.5)
    if isinstance(err, FingerprintMismatch):
        assert (back.expected, back.got) == ("aaaa", "bbbb")
    with pytest.raises(TeacherError):
        raise back


@pytest.mark.unit
def test_long_server_message_is_clipped():
    err = TeacherError(grpc.StatusCode.INVALID_ARGUMENT, "x" * 5000 + "\x00\n", "grpc://h:1")
    assert len(str(err)) < 400 and "\n" not in str(err) and "\x00" not in str(err)


def test_expected_fingerprint_mismatch(vit_engine, vit_port):
    async def go():
        async with TeacherClient(f"grpc://127.0.0.1:{vit_port}", expected_fingerprint="deadbeef", **FAST) as c:
            with pytest.raises(FingerprintMismatch) as e1:
                await c.describe()
            with pytest.raises(FingerprintMismatch):
                await c.get_targets({"pixel_values": images(2)}, SPEC, stream=False)
            return e1.value, c.stats

    err, stats = run(go())
    assert err.expected == "deadbeef" and err.got == vit_engine.fingerprint
    assert "must never" in str(err) and isinstance(err, TeacherError)
    assert stats.requests == 0  # the foreign targets were not accepted


def test_teacher_replaced_behind_the_address(vit_engine):
    """The first answer fixes the teacher: a redeploy with other weights on the same port is refused.

    Also exercises the reconnect after UNAVAILABLE (the old server is gone in between).
    """
    other = TeacherEngine.from_config(tiny_vit_config(seed=1))
    assert other.fingerprint != vit_engine.fingerprint
    port = free_port()
    c = SyncTeacherClient(f"grpc://127.0.0.1:{port}", timeout=2.0, max_retries=8, backoff_s=0.05, max_backoff_s=0.2)
    try:
        with run_server(vit_engine, port=port):
            first = c.get_targets({"pixel_values": images(2)}, SPEC)
        with pytest.raises(TeacherUnavailable):
            c.client.max_retries = 1
            c.get_targets({"pixel_values": images(2)}, SPEC)
        c.client.max_retries = 8
        with run_server(other, port=port):
            with pytest.raises(FingerprintMismatch) as err:
                c.get_targets({"pixel_values": images(2)}, SPEC)
    finally:
        c.close()
    assert first["logits"].shape == (2, 10)
    assert err.value.expected == vit_engine.fingerprint and err.value.got == other.fingerprint


class RecordingServicer(Servicer):
    """The real servicer, also recording each call's metadata and experiment_id."""

    def __init__(self, engine: TeacherEngine):
        super().__init__(engine)
        self.calls: list[tuple[str, dict[str, str], str]] = []

    def _record(self, name: str, context, experiment_id: str = "") -> None:
        self.calls.append((name, dict(context.invocation_metadata()), experiment_id))

    async def Describe(self, request, context):
        self._record("Describe", context)
        return await super().Describe(request, context)

    async def GetTargets(self, request, context):
        self._record("GetTargets", context, request.experiment_id)
        return await super().GetTargets(request, context)


@contextlib.contextmanager
def recording_server(engine: TeacherEngine) -> Iterator[tuple[int, RecordingServicer]]:
    with serving(engine, servicer_cls=RecordingServicer) as (port, servicer):
        yield port, servicer


def test_app_path_sends_application_metadata(vit_engine):
    with recording_server(vit_engine) as (port, servicer):
        with SyncTeacherClient(f"grpc://127.0.0.1:{port}/minilm", experiment_id="exp-42", **FAST) as c:
            c.get_targets({"pixel_values": images(2)}, SPEC)  # auto stream: Describe, then GetTargets
        with SyncTeacherClient(f"127.0.0.1:{port}", **FAST) as bare:
            bare.describe()
    routed, plain = servicer.calls[:2], servicer.calls[2:]
    assert [name for name, _, _ in routed] == ["Describe", "GetTargets"]
    assert all(md.get("application") == "minilm" for _, md, _ in routed)
    assert routed[1][2] == "exp-42"
    assert plain and all("application" not in md for _, md, _ in plain)


@pytest.mark.unit
def test_addresses():
    t = GrpcTransport.from_address("grpc://teacher.svc:9000/vit")
    assert (t.target, t.application, t.metadata) == ("teacher.svc:9000", "vit", (("application", "vit"),))
    t = GrpcTransport.from_address("10.0.0.2:50051")
    assert (t.target, t.application, t.metadata, t.address) == ("10.0.0.2:50051", "", (), "grpc://10.0.0.2:50051")
    assert GrpcTransport.from_address("grpc://[::1]:50051").target == "[::1]:50051"
    with pytest.raises(ValueError, match=r"scheme 'ftp' is not supported"):
        TeacherClient("ftp://host:21/model")
    with pytest.raises(ValueError, match="not supported"):
        connect("http://host:8000")
    with pytest.raises(ValueError, match="needs a host and a port"):
        connect("grpc://host")


def test_a_scheme_loads_its_transport_where_nothing_imported_it():
    """A Ray Train worker imports the client and nothing else: the address's scheme alone must
    bring in its transport."""
    code = ("from student_workers.client.sync_client import SyncTeacherClient; "
            "print(type(SyncTeacherClient('grpc://h:1').client.transport).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["GrpcTransport"]


def test_sync_submit_and_async_agree(vit_engine, vit_port):
    """Concurrent submits on one channel each get their own batch's targets."""
    xs = [images(2, seed=s) for s in range(5)]
    spec = wire.target_spec(logits=True)
    with SyncTeacherClient(f"grpc://127.0.0.1:{vit_port}", **FAST) as c:
        futs = [c.submit({"pixel_values": x}, spec) for x in xs]
        outs = [f.result(timeout=10) for f in futs]
        assert c.stats.requests == 5
    for x, out in zip(xs, outs):
        assert_same(out, direct(vit_engine, {"pixel_values": x}, spec))


TOKEN = "client-test-token-7f3e"


@pytest.fixture(scope="module")
def auth_port(vit_engine) -> Iterator[int]:
    with run_server(vit_engine, auth_token=TOKEN, health_interval_s=0) as port:
        yield port


@pytest.mark.parametrize("source", ["argument", "file", "env"])
def test_token_sent_from_each_source(vit_engine, auth_port, source, tmp_path, monkeypatch):
    monkeypatch.delenv("KDSERVE_AUTH_TOKEN", raising=False)
    kwargs: dict = {}
    if source == "argument":
        kwargs["auth_token"] = TOKEN
    elif source == "file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        kwargs["auth_token_file"] = str(tmp_path / "token")
    else:
        monkeypatch.setenv("KDSERVE_AUTH_TOKEN", TOKEN)
    x = images(2, seed=9)
    with SyncTeacherClient(f"grpc://127.0.0.1:{auth_port}", **kwargs, **FAST) as c:
        out = c.get_targets({"pixel_values": x}, SPEC)
        assert TOKEN not in repr(c.client) and TOKEN not in repr(c.client.transport)
    assert_same(out, direct(vit_engine, {"pixel_values": x}, SPEC))


def test_missing_token_is_not_retried(auth_port, monkeypatch):
    monkeypatch.delenv("KDSERVE_AUTH_TOKEN", raising=False)
    with SyncTeacherClient(f"grpc://127.0.0.1:{auth_port}", timeout=5.0, retry_budget_s=60, backoff_s=1.0) as c:
        with pytest.raises(TeacherError) as err:
            c.get_targets({"pixel_values": images(1)}, SPEC)
        assert c.stats.retries == 0
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and not isinstance(err.value, TeacherUnavailable)
    assert "authorization: Bearer" in str(err.value)


def test_non_ascii_experiment_id_is_served(vit_engine, vit_port):
    x = images(2, seed=5)
    with SyncTeacherClient(f"grpc://127.0.0.1:{vit_port}", experiment_id="Versuch-ü-漢字-🚀", **FAST) as c:
        out = c.get_targets({"pixel_values": x}, SPEC)
    assert_same(out, direct(vit_engine, {"pixel_values": x}, SPEC))


@pytest.mark.unit
def test_grpcs_addresses():
    t = GrpcTransport.from_address("grpcs://teacher.svc:443/vit", auth_token="t")
    assert (t.target, t.application, t.tls, t.address) == ("teacher.svc:443", "vit", True, "grpcs://teacher.svc:443/vit")
    assert t.metadata == (("application", "vit"), ("authorization", "Bearer t")) and "Bearer" not in repr(t)
    assert isinstance(connect("grpcs://h:443").transport, GrpcTransport)
    with pytest.raises(ValueError, match="needs a host and a port"):
        connect("grpcs://h")


class _ReplyTransport:
    """A transport answering one fixed TargetsReply (what an old or broken teacher might send)."""

    address = "fake://teacher"

    def __init__(self, reply: pb.TargetsReply):
        self.reply = reply

    async def describe(self, timeout):
        return pb.TeacherInfo(fingerprint=self.reply.fingerprint)

    async def get_targets(self, request, timeout):
        return self.reply

    async def stream_targets(self, request, timeout):
        return [self.reply]

    async def close(self):
        pass


@pytest.mark.unit
@pytest.mark.parametrize("bad,dtype", [(float("nan"), "float32"), (float("inf"), "float16"), (float("nan"), "int8")])
def test_client_refuses_nonfinite_targets(bad, dtype):
    """Even from a teacher that checks nothing, NaN/Inf targets never reach the student."""
    from kdserve import codec
    from kdserve.targets import quantize_int8

    t = torch.randn(2, 5)
    t[1, 3] = bad
    reply = pb.TargetsReply(fingerprint="f", num_chunks=1)
    if dtype == "int8":
        codec.encode_into(reply.outputs["hidden.vision.1"], *quantize_int8(t))
    else:
        codec.encode_into(reply.outputs["hidden.vision.1"], t.to(getattr(torch, dtype)))
    good = pb.TargetsReply(fingerprint="f", num_chunks=1)
    codec.encode_into(good.outputs["hidden.vision.1"], torch.randn(2, 5))

    async def go(r):
        c = TeacherClient("grpc://127.0.0.1:1", transport=_ReplyTransport(r), **FAST)
        return await c.get_targets({"pixel_values": images(2)}, SPEC)

    with pytest.raises(TeacherError) as e:
        run(go(reply))
    assert e.value.code == grpc.StatusCode.DATA_LOSS and "'hidden.vision.1' holds NaN or Inf" in str(e.value)
    assert run(go(good))["hidden.vision.1"].shape == (2, 5)  # a finite reply passes the same path


@pytest.mark.unit
def test_a_dead_triton_stub_is_unavailable_so_the_client_retries_it():
    """Triton answers a model whose Python stub died with INTERNAL until the server restarts, and a
    model still loading after a restart with NOT_FOUND; the transport reports both as UNAVAILABLE
    (retried), every other INTERNAL or NOT_FOUND as it is."""
    pytest.importorskip("tritonclient")
    from student_workers.client.triton_transport import RESOURCE_EXHAUSTED_TAG, status_code

    internal, unavailable = grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE
    assert status_code(internal, "Stub process 'kdserve_teacher_0_0' is not healthy.") == unavailable
    assert status_code(internal, "Failed to process the request(s) for model 'm'") == internal
    assert status_code(grpc.StatusCode.UNKNOWN, "Stub process 'x' is not healthy.") == grpc.StatusCode.UNKNOWN
    assert status_code(internal, RESOURCE_EXHAUSTED_TAG + "cap") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(internal, None) == internal
    loading = "Request for unknown model: 'kdserve_teacher' has no available versions"
    assert status_code(grpc.StatusCode.NOT_FOUND, loading) == unavailable  # a restarted server, loading
    assert status_code(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'x' is not found") \
        == grpc.StatusCode.NOT_FOUND


@pytest.mark.unit
def test_triton_answer_with_another_requests_rows_is_data_loss():
    """Rows sent without keys get made-up ones (<request id>/<i>); an answer whose rows echo other
    keys is refused, and the made-up keys never reach the caller."""
    pytest.importorskip("tritonclient")
    from student_workers.client.triton_transport import TritonTransport

    t = TritonTransport.from_address("triton://127.0.0.1:9/m")
    req = wire.build_request({"pixel_values": torch.rand(2, 3, 8, 8)}, wire.target_spec(logits=True), "exp")
    sent: list[str] = []
    t._infer_request(req, "exp-1-7", stream=False, keys_out=sent)
    assert sent == ["exp-1-7/0", "exp-1-7/1"]
    ok = t._own(pb.TargetsReply(sample_keys=sent), req, sent)
    assert list(ok.sample_keys) == []  # the caller gave none
    with pytest.raises(TeacherError) as e:
        t._own(pb.TargetsReply(sample_keys=["exp-1-6/0", "exp-1-6/1"]), req, sent)
    assert e.value.code == grpc.StatusCode.DATA_LOSS and "another request" in str(e.value)
    keyed = wire.build_request({"pixel_values": torch.rand(1, 3, 8, 8)}, wire.target_spec(logits=True), "exp",
                               sample_keys=["img-42"])
    mine: list[str] = []
    t._infer_request(keyed, "exp-1-8", stream=False, keys_out=mine)
    assert mine == ["img-42"] and list(t._own(pb.TargetsReply(sample_keys=mine), keyed, mine).sample_keys) == mine
