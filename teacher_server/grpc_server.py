"""A plain gRPC TeacherService (no Ray): for a single machine, tests, and as the reference.

Each request gets its own forward (no cross-client batching: that is what the Ray Serve
frontend adds). ``run_server`` follows the grpc examples: a context manager yielding the port.
"""
from __future__ import annotations

import contextlib
import time
from concurrent import futures
from typing import Iterator, Sequence

import grpc

from kdserve import auth
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine import TeacherEngine
from teacher_server.health import HealthReporter
from teacher_server.metrics import get_metrics
from teacher_server.service import TeacherService, reply_bytes, reply_samples, status_of

MAX_MESSAGE = 2**31 - 1
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


class Servicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, engine: TeacherEngine):
        self.service = TeacherService(engine)
        self.metrics = get_metrics("prometheus")

    def Describe(self, request, context):
        return self.service.describe()

    def _compute(self, request, context, stream: bool):
        t0 = time.perf_counter()
        try:
            work = self.service.prepare(request, stream=stream)
            (outputs,), stats = self.service.engine.run([work])
        except Exception as e:  # every failure becomes a status, never a dead server
            code, msg = status_of(e)
            self.metrics.refused(request.experiment_id, code.name)
            context.abort(code, msg)
        self.metrics.batch(stats.requests, stats.samples, stats.compute_ms)
        queue_ms = (time.perf_counter() - t0) * 1e3 - stats.compute_ms
        return work, outputs, stats, max(0.0, queue_ms)

    def GetTargets(self, request, context):
        work, outputs, stats, queue_ms = self._compute(request, context, stream=False)
        reply = self.service.reply(request, work, outputs, stats, queue_ms)
        self.metrics.answered(request.experiment_id, stats.samples, reply_bytes(reply), queue_ms)
        return reply

    def StreamTargets(self, request, context):
        work, outputs, stats, queue_ms = self._compute(request, context, stream=True)
        for chunk in self.service.chunks(request, work, outputs, stats, queue_ms):
            self.metrics.answered(request.experiment_id, reply_samples(chunk), reply_bytes(chunk), queue_ms)
            yield chunk


@contextlib.contextmanager
def run_server(engine: TeacherEngine, port: int = 0, host: str = "127.0.0.1", workers: int = 4, *,
               auth_token: str | None = None, allow_unauthenticated_describe: bool = False,
               tls: grpc.ServerCredentials | None = None, interceptors: Sequence = (),
               health_interval_s: float = 30.0) -> Iterator[int]:
    """Serve ``engine`` on ``host:port`` (0 picks a free port); yields the bound port.

    ``auth_token``: calls need ``authorization: Bearer <token>`` (kdserve.auth); ``tls``: see
    kdserve.tls.server_credentials; grpc.health.v1 follows a probe forward (teacher_server.health).
    """
    chain = [*auth.interceptors(auth_token, allow_unauthenticated_describe), *interceptors]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS, interceptors=chain)
    pb_grpc.add_TeacherServiceServicer_to_server(Servicer(engine), server)
    reporter = HealthReporter(engine, health_interval_s)
    reporter.add_to_server(server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    reporter.start()
    server.start()
    try:
        yield bound
    finally:
        reporter.stop()
        server.stop(grace=2).wait()
