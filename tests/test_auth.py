"""Bearer-token auth on real loopback servers (sync and grpc.aio): refused calls cost no forward."""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kdserve import auth, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import __main__ as cli
from teacher_server.grpc_server import run_server

TOKEN = "s3cret-token-4d1f9a"
SPEC = wire.target_spec(hidden={"vision": [1]}, logits=True)
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def good_request(b: int = 2) -> pb.TargetsRequest:
    return wire.build_request({"pixel_values": torch.rand(b, 3, 32, 32)}, SPEC, experiment_id="auth-test")


@pytest.fixture
def counted(vit_engine, monkeypatch):
    """The engine, counting the forwards it runs (the servers below call ``engine.run``)."""
    calls: list[int] = []
    real = vit_engine.run

    def run(batch):
        calls.append(len(batch))
        return real(batch)

    monkeypatch.setattr(vit_engine, "run", run)
    return vit_engine, calls


def _calls(stub, metadata):
    """Every RPC kind once: (name, callable)."""
    return [
        ("Describe", lambda: stub.Describe(pb.DescribeRequest(), metadata=metadata, timeout=10)),
        ("GetTargets", lambda: stub.GetTargets(good_request(), metadata=metadata, timeout=10)),
        ("StreamTargets", lambda: list(stub.StreamTargets(good_request(), metadata=metadata, timeout=10))),
    ]


@pytest.mark.parametrize("metadata", [
    (),
    (("authorization", "Bearer wrong"),),
    (("authorization", TOKEN),),  # no scheme
    (("authorization", f"Bearer {TOKEN}x"),),
    (("authorization", f"bearer {TOKEN[:-1]}"),),
], ids=["none", "wrong", "no-scheme", "longer", "shorter"])
def test_without_valid_token_unauthenticated_and_no_forward(counted, metadata, caplog):
    engine, calls = counted
    caplog.set_level(logging.DEBUG)
    with run_server(engine, auth_token=TOKEN, health_interval_s=0) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        calls.clear()  # the startup health probe
        for name, call in _calls(stub, metadata):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == UNAUTH, name
            assert TOKEN not in e.value.details()
        assert calls == []  # refused before the servicer: no forward
        # and the same server answers a caller with the token
        md = auth.metadata(TOKEN)
        assert stub.Describe(pb.DescribeRequest(), metadata=md).fingerprint == engine.fingerprint
        assert stub.GetTargets(good_request(3), metadata=md).timings.batch_samples == 3
        assert len(list(stub.StreamTargets(good_request(), metadata=md))) >= 1
    assert calls == [1, 1]
    assert TOKEN not in caplog.text


def test_missing_token_message_says_what_to_send(vit_engine):
    with run_server(vit_engine, auth_token=TOKEN, health_interval_s=0) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest())
    assert e.value.details() == auth.MISSING


def test_describe_open_only_when_asked(counted):
    engine, calls = counted
    with run_server(engine, auth_token=TOKEN, allow_unauthenticated_describe=True, health_interval_s=0) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        calls.clear()
        assert stub.Describe(pb.DescribeRequest()).fingerprint == engine.fingerprint
        with pytest.raises(grpc.RpcError) as e:
            stub.GetTargets(good_request())
        assert e.value.code() == UNAUTH and calls == []
        # health probes carry no token and stay open
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_no_token_means_open(vit_engine):
    with run_server(vit_engine, health_interval_s=0) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest()).fingerprint == vit_engine.fingerprint


class TinyAioServicer(pb_grpc.TeacherServiceServicer):
    """An asyncio servicer counting the calls that reach it (unary and streaming)."""

    def __init__(self):
        self.reached = 0

    async def Describe(self, request, context):
        self.reached += 1
        return pb.TeacherInfo(model_name="aio")

    async def StreamTargets(self, request, context):
        self.reached += 1
        for i in range(2):
            yield pb.TargetsReply(sample_offset=i, num_chunks=2)


def test_aio_interceptor():
    async def go():
        servicer = TinyAioServicer()
        server = grpc.aio.server(interceptors=[auth.AioAuthInterceptor(TOKEN)])
        pb_grpc.add_TeacherServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.TeacherServiceStub(ch)
                for md in [(), (("authorization", "Bearer nope"),)]:
                    for call in (lambda: stub.Describe(pb.DescribeRequest(), metadata=md),
                                 lambda: _collect(stub.StreamTargets(pb.TargetsRequest(), metadata=md))):
                        try:
                            await call()
                            codes.append(grpc.StatusCode.OK)
                        except grpc.aio.AioRpcError as e:
                            codes.append(e.code())
                refused = servicer.reached
                info = await stub.Describe(pb.DescribeRequest(), metadata=auth.metadata(TOKEN))
                chunks = await _collect(stub.StreamTargets(pb.TargetsRequest(), metadata=auth.metadata(TOKEN)))
        finally:
            await server.stop(None)
        return codes, refused, info, chunks, servicer.reached

    codes, refused, info, chunks, reached = asyncio.run(go())
    assert codes == [UNAUTH] * 4 and refused == 0
    assert info.model_name == "aio" and [c.sample_offset for c in chunks] == [0, 1] and reached == 2


async def _collect(call):
    return [c async for c in call]


@pytest.mark.unit
def test_token_check_unit():
    check = auth.TokenCheck(TOKEN, open_methods=[auth.DESCRIBE])
    assert TOKEN not in repr(check) and TOKEN not in repr(auth.AuthInterceptor(TOKEN))
    assert TOKEN not in repr(auth.AioAuthInterceptor(TOKEN))
    m = "/kdserve.v1.TeacherService/GetTargets"
    assert check.check(m, [("authorization", f"Bearer {TOKEN}")]) is None
    assert check.check(m, [("x-other", "1"), ("Authorization", f"Bearer {TOKEN}")]) is None
    assert check.check(m, []) == auth.MISSING
    assert check.check(m, [("authorization", "Bearer ü-not-ascii")]) == auth.WRONG
    assert check.check(auth.DESCRIBE, []) is None
    with pytest.raises(auth.AuthError):
        auth.TokenCheck("")
    assert auth.interceptors(None) == []


@pytest.mark.unit
def test_load_token(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    assert auth.load_token(None) is None
    monkeypatch.setenv(auth.ENV_VAR, "  from-env\n")
    assert auth.load_token(None) == "from-env"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert auth.load_token(str(f)) == "from-file"  # the file wins over the environment
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(auth.AuthError, match="is empty"):
        auth.load_token(str(tmp_path / "empty"))
    with pytest.raises(auth.AuthError, match="cannot read"):
        auth.load_token(str(tmp_path / "missing"))
    assert auth.metadata("t") == (("authorization", "Bearer t"),) and auth.metadata(None) == ()


# -- the CLI's safe defaults ------------------------------------------------------------------------
@pytest.mark.unit
def test_cli_defaults_to_loopback_and_refuses_to_serve_open(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    args = cli.parse_args(["--backend", "grpc"])
    assert args.host == "127.0.0.1"
    assert cli.security(args) == (None, False)
    assert "warning" not in capsys.readouterr().err

    # reachable from other machines without a token: refused, unless the operator says --insecure
    for argv, why in ((["--backend", "grpc", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable"),
                      ([], "Ray Serve's gRPC proxy binds every interface"),
                      (["--host", "127.0.0.1"], "Ray Serve's gRPC proxy binds every interface")):
        with pytest.raises(cli.ConfigError) as e:
            cli.security(cli.parse_args(argv))
        assert why in str(e.value) and "--auth-token-file" in str(e.value) and "--insecure" in str(e.value)
        assert "\n" not in str(e.value)
        assert cli.security(cli.parse_args([*argv, "--insecure"])) == (None, False)
        err = capsys.readouterr().err
        assert "warning: serving without authentication (--insecure)" in err and why in err

    f = tmp_path / "tok"
    f.write_text(TOKEN)
    token, _ = cli.security(cli.parse_args(["--backend", "grpc", "--host", "0.0.0.0", "--auth-token-file", str(f)]))
    assert token == TOKEN and capsys.readouterr().err == ""

    with pytest.raises(cli.ConfigError, match="need a token|needs a token"):
        cli.security(cli.parse_args(["--backend", "grpc", "--allow-unauthenticated-describe"]))
    with pytest.raises(cli.ConfigError, match="go together"):
        cli.security(cli.parse_args(["--backend", "grpc", "--tls-cert", "c.pem"]))
    with pytest.raises(cli.ConfigError, match="TLS-terminating proxy"):
        cli.security(cli.parse_args(["--tls-cert", "c.pem", "--tls-key", "k.pem"]))


@pytest.mark.unit
@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False)])
def test_is_loopback(host, loop):
    assert cli.is_loopback(host) is loop
