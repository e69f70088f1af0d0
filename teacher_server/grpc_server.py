"""A plain gRPC TeacherService (no Ray): for a single machine, tests, and as the reference.

Each request gets its own forward (no cross-client batching: that is what the Ray Serve
frontend adds). ``run_server`` follows the grpc examples: a context manager yielding the port.
"""
from __future__ import annotations

import contextlib
import time
from concurrent import futures
from typing import Iterator

import grpc

from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine import TeacherEngine
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
def run_server(engine: TeacherEngine, port: int = 0, host: str = "127.0.0.1", workers: int = 4) -> Iterator[int]:
    """Serve ``engine`` on ``host:port`` (0 picks a free port); yields the bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    pb_grpc.add_TeacherServiceServicer_to_server(Servicer(engine), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    try:
        yield bound
    finally:
        server.stop(grace=2).wait()
