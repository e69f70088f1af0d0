"""A plain gRPC TeacherService (no Ray): for a single machine, tests, and as the reference.

The sync handlers hand their requests to the same Coalescer as the Ray Serve deployment, running
on one asyncio loop thread: requests of all clients share forwards, picked fairly across
experiments, with the target cache and per-request isolation. A client that cancels or whose
deadline passes has its request dropped from the queue.

StreamTargets is flow-controlled: chunks are encoded one at a time, each only once the previous one
was handed to the transport (the sync server pulls the generator after a send completes, and a
send waits for HTTP/2 flow control), so an unread stream holds the computed outputs plus about one
encoded chunk and the transport's window, never every encoded chunk. A client that reads nothing
for ``stream_stall_timeout_s`` is cancelled. ``run_server`` follows the grpc examples:
a context manager yielding the port; metrics go to a Prometheus endpoint when asked.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from concurrent import futures
from typing import Iterator, Sequence

import grpc

from kdserve import auth, reply_wire, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.coalesce import Coalescer
from teacher_server.engine import TeacherEngine
from teacher_server.health import HealthReporter
from teacher_server.metrics import get_metrics
from teacher_server.service import TeacherService, status_of

# The protocol's message limit both ways; and no SO_REUSEPORT: a second teacher started on a busy
# port must fail to bind, not silently share the port (and the students) with the first.
SERVER_OPTIONS = [*wire.CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]


class _LoopThread:
    """An asyncio loop on a daemon thread: the Coalescer's home, fed from the handler threads."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kdserve-coalescer", daemon=True)
        self._thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class Servicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, engine: TeacherEngine):
        self.service = TeacherService(engine)
        self.metrics = get_metrics("prometheus")
        self.coalescer = Coalescer.from_config(
            engine, engine.cfg, on_batch=self.metrics.batch_stats, metrics=self.metrics,
            cache_events=self.metrics.cache_event,
        )
        self._loop = _LoopThread()

    def close(self) -> None:
        self._loop.close()

    def Describe(self, request, context):
        return self.service.describe()

    def _compute(self, request, context, stream: bool):
        try:
            work = self.service.prepare(request, stream=stream)
            work.experiment = request.experiment_id
            pending = self._loop.submit(self.coalescer.submit([work]))
            # client gone or deadline passed: cancel, so the queue drops it before any forward
            context.add_callback(pending.cancel)
            ((outputs, stats, queue_ms),) = pending.result()
        except concurrent.futures.CancelledError:
            self.metrics.refused(request.experiment_id, grpc.StatusCode.CANCELLED.name)
            context.abort(grpc.StatusCode.CANCELLED, "request cancelled before its forward")
        except Exception as e:  # every failure becomes a status, never a dead server
            code, msg = status_of(e)
            self.metrics.refused(request.experiment_id, code.name)
            context.abort(code, msg)
        return work, outputs, stats, queue_ms

    def GetTargets(self, request, context):
        """Answers a reply_wire.EncodedReply: the serialised TargetsReply (see ``add_servicer``)."""
        work, outputs, stats, queue_ms = self._compute(request, context, stream=False)
        reply = self.service.reply(request, work, outputs, stats, queue_ms, encoded=True)
        self.metrics.answered(request.experiment_id, reply.samples, reply.payload_bytes, queue_ms)
        return reply

    def StreamTargets(self, request, context):
        work, outputs, stats, queue_ms = self._compute(request, context, stream=True)
        samples = nbytes = 0
        stall_s = self.service.cfg.stream_stall_timeout_s
        # lazy: one encoded at a time
        chunks = self.service.chunks(request, work, outputs, stats, queue_ms, encoded=True)
        del outputs  # the generator holds them; dropped with it when the stream ends or is cancelled
        for chunk in chunks:
            if not context.is_active():  # client gone or deadline passed: encode nothing more
                return
            samples += chunk.samples
            nbytes += chunk.payload_bytes
            # The generator resumes only once this chunk was sent; a client that stops reading
            # never lets it resume, so the timer cancels the call (the send then fails, the
            # generator is closed and the outputs freed).
            watchdog = threading.Timer(stall_s, context.cancel)
            watchdog.daemon = True
            watchdog.start()
            try:
                yield chunk
            finally:
                watchdog.cancel()
            del chunk
        self.metrics.answered(request.experiment_id, samples, nbytes, queue_ms)  # one count per request


def add_servicer(servicer: Servicer, server: grpc.Server) -> None:
    """Register ``servicer`` like ``add_TeacherServiceServicer_to_server``, except that GetTargets and
    StreamTargets answer pre-serialised replies (reply_wire.EncodedReply): their serializer only
    hands the bytes over, so protobuf never copies nor re-serialises the tensors."""
    handlers = {
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe, request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.TeacherInfo.SerializeToString,
        ),
        "GetTargets": grpc.unary_unary_rpc_method_handler(
            servicer.GetTargets, request_deserializer=pb.TargetsRequest.FromString,
            response_serializer=reply_wire.identity,
        ),
        "StreamTargets": grpc.unary_stream_rpc_method_handler(
            servicer.StreamTargets, request_deserializer=pb.TargetsRequest.FromString,
            response_serializer=reply_wire.identity,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


@contextlib.contextmanager
def run_server(
    engine: TeacherEngine, port: int = 0, host: str = "127.0.0.1", workers: int = 64, metrics_port: int | None = None,
    *, auth_token: str | None = None, allow_unauthenticated_describe: bool = False,
    tls: grpc.ServerCredentials | None = None, interceptors: Sequence = (), health_interval_s: float = 30.0,
) -> Iterator[int]:
    """Serve ``engine`` on ``host:port`` (0 picks a free port); yields the bound port.

    ``workers`` bounds the requests in flight (each waits on a handler thread while queued).
    ``metrics_port`` (default: the engine config's ``metrics_port``; 0 = none) serves Prometheus
    metrics over HTTP on ``host``. ``auth_token``: calls need ``authorization: Bearer <token>``
    (kdserve.auth); ``tls``: see kdserve.tls.server_credentials; grpc.health.v1 follows a probe
    forward (teacher_server.health).
    """
    chain = [*auth.interceptors(auth_token, allow_unauthenticated_describe), *interceptors]
    servicer = Servicer(engine)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS, interceptors=chain)
    add_servicer(servicer, server)
    reporter = HealthReporter(engine, health_interval_s)
    reporter.add_to_server(server)
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises on a port in use
        bound = 0
    if bound == 0:
        servicer.close()
        raise OSError(f"cannot bind {host}:{port}")
    metrics_port = engine.cfg.metrics_port if metrics_port is None else metrics_port
    http = None
    if metrics_port:
        import prometheus_client

        http, _ = prometheus_client.start_http_server(metrics_port, addr=host)
    reporter.start()
    server.start()
    try:
        yield bound
    finally:
        reporter.stop()
        server.stop(grace=2).wait()
        servicer.close()
        if http is not None:
            http.shutdown()
            http.server_close()
