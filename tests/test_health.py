"""grpc.health.v1 on the plain server follows a real probe forward of the engine."""
from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_server.engine import TeacherEngine
from teacher_server.grpc_server import run_server
from teacher_server.health import SERVICE, HealthReporter, probe, probe_inputs
from tests.conftest import tiny_vit_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.unit
def test_probe_inputs_follow_declared_inputs(vit_engine, minilm_engine):
    vit = probe_inputs(vit_engine.inputs)
    assert {k: (tuple(v.shape), v.dtype) for k, v in vit.items()} == {"pixel_values": ((1, 3, 32, 32), torch.float32)}
    text = probe_inputs(minilm_engine.inputs)  # attention_mask / token_type_ids are optional: left out
    assert {k: (tuple(v.shape), v.dtype) for k, v in text.items()} == {"input_ids": ((1, 8), torch.int64)}
    assert probe(vit_engine) > 0 and probe(minilm_engine) > 0


def _check(channel, service: str):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_service_on_plain_server(vit_engine):
    with run_server(vit_engine, health_interval_s=0) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert _check(ch, "") == SERVING
        assert _check(ch, SERVICE) == SERVING
        with pytest.raises(grpc.RpcError) as e:
            _check(ch, "no.such.Service")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _lost(*_):
    raise RuntimeError("CUDA error: device lost")


def test_failing_forward_published_as_not_serving():
    """A model whose forward fails (a hook raising like a lost device) is NOT_SERVING until it recovers."""
    engine = TeacherEngine.from_config(tiny_vit_config())
    reporter = HealthReporter(engine, interval_s=0)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    reporter.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reporter.start()
            assert _check(ch, SERVICE) == SERVING
            handle = engine.adapter.model.register_forward_pre_hook(_lost)
            assert reporter.check_now() is False and "device lost" in reporter.last_error
            assert _check(ch, SERVICE) == NOT_SERVING and _check(ch, "") == NOT_SERVING
            handle.remove()
            assert reporter.check_now() is True and reporter.last_error is None
            assert _check(ch, SERVICE) == SERVING
            reporter.stop()  # graceful shutdown: NOT_SERVING before the port closes
            assert _check(ch, "") == NOT_SERVING
    finally:
        server.stop(None)
