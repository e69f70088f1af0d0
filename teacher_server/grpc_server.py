"""A plain gRPC TeacherService (no Ray): for a single machine, tests, and as the reference.

A grpc.aio server on one asyncio loop thread, which is also the home of the Coalescer: a request
goes from the transport to its coroutine and into the forward queue without crossing a thread,
so a small request costs no thread hand-off beyond the forward's own, and none when the forward
is short enough to run on the loop (``inline_forward_ms``; ``bench`` P4 measures it against a bare
grpc.aio echo). Requests of all clients share forwards, picked fairly across
experiments, with the target cache and per-request isolation. A client that cancels or whose
deadline passes has its handler cancelled, which drops its request from the queue.

StreamTargets is flow-controlled: chunks are encoded one at a time, each only once the previous one
was taken by the transport (``context.write`` waits for HTTP/2 flow control), so an unread stream
holds the computed outputs plus about one encoded chunk and the transport's window, never every
encoded chunk. A client that reads nothing for ``stream_stall_timeout_s`` is cancelled.
``run_server`` follows the grpc examples: a context manager yielding the port; metrics go to a
Prometheus endpoint when asked.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Iterator, Sequence

import grpc

from kdserve import auth, methods, reply_wire, wire
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.coalesce import Coalescer
from teacher_server.engine import TeacherEngine
from teacher_server import malloc
from teacher_server.health import HealthReporter
from teacher_server.metrics import get_metrics
from teacher_server.service import TeacherService, status_of

# The protocol's message limit both ways; and no SO_REUSEPORT: a second teacher started on a busy
# port must fail to bind, not silently share the port (and the students) with the first.
SERVER_OPTIONS = [*wire.CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
REQUEST_SLACK = 1 << 20  # over max_request_bytes: the teacher's own check (with its advice) answers first


def server_options(max_request_bytes: int) -> list[tuple[str, int]]:
    """SERVER_OPTIONS, receiving at most about ``max_request_bytes``: gRPC refuses a larger message
    (RESOURCE_EXHAUSTED) from its length prefix, before buffering it whole."""
    limit = min(wire.MAX_MESSAGE, max_request_bytes + REQUEST_SLACK)
    return [*((k, v) for k, v in SERVER_OPTIONS if k != "grpc.max_receive_message_length"),
            ("grpc.max_receive_message_length", limit)]


class _LoopThread:
    """An asyncio loop on a daemon thread: home of the aio server and the Coalescer."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kdserve-loop", daemon=True)
        self._thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class Servicer(pb_grpc.TeacherServiceServicer):
    """The TeacherService handlers, coroutines of a grpc.aio server (see ``add_servicer``)."""

    def __init__(self, engine: TeacherEngine):
        self.service = TeacherService(engine)
        self.metrics = get_metrics("prometheus")
        self.coalescer = Coalescer.from_config(
            engine, engine.cfg, on_batch=self.metrics.batch_stats, metrics=self.metrics,
            cache_events=self.metrics.cache_event,
        )

    @classmethod
    def sharing(cls, service: TeacherService, coalescer: Coalescer, metrics) -> "Servicer":
        """Handlers over another frontend's service, batcher and metrics (a Serve replica's direct
        endpoint): both ways in share one queue, one fair share, one memory budget."""
        self = cls.__new__(cls)
        self.service, self.coalescer, self.metrics = service, coalescer, metrics
        return self

    async def _refuse_malformed(self, request, context) -> None:
        """Bytes that did not parse (kdserve.methods): INVALID_ARGUMENT with one fixed line."""
        if isinstance(request, methods.Malformed):
            self.metrics.malformed(request.kind)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    async def Describe(self, request, context):
        await self._refuse_malformed(request, context)
        return self.service.describe()

    async def _compute(self, request, context, stream: bool):
        """(work, outputs, stats, queue_ms); the work's memory stays reserved (the caller releases)."""
        await self._refuse_malformed(request, context)
        work = None
        try:
            work = self.service.prepare(request, stream=stream)
            work.experiment = request.experiment_id
            self.service.reserve(work)
            ((outputs, stats, queue_ms),) = await self.coalescer.submit([work])
            self.service.check_outputs(outputs)
        except asyncio.CancelledError:  # client gone or deadline passed: the queue drops the work
            self.service.release(work)
            self.metrics.refused(request.experiment_id, grpc.StatusCode.CANCELLED.name)
            raise
        except Exception as e:  # every failure becomes a status, never a dead server
            self.service.release(work)
            code, msg = status_of(e)
            self.metrics.refused(request.experiment_id, code.name)
            await context.abort(code, msg)
        return work, outputs, stats, queue_ms

    async def GetTargets(self, request, context):
        """Answers a reply_wire.EncodedReply: the serialised TargetsReply (see ``add_servicer``)."""
        work, outputs, stats, queue_ms = await self._compute(request, context, stream=False)
        try:
            # On the loop: encoding only lists views of the tensors; their one copy (the join in the
            # response serializer) holds the GIL wherever it runs, so a thread would add a hand-off only.
            reply = self.service.reply(request, work, outputs, stats, queue_ms, encoded=True)
        finally:
            self.service.release(work)  # the reply's one copy is made by the serializer, right after
        self.metrics.answered(request.experiment_id, reply.samples, reply.payload_bytes, queue_ms)
        return reply

    async def StreamTargets(self, request, context):
        answer = await self._compute(request, context, stream=True)
        work, streaming = answer[0], self._stream(request, context, *answer)
        del answer  # _stream alone holds the outputs: they go as soon as it drops them
        try:
            await streaming
        finally:
            self.service.release(work)  # sent, stalled or cancelled: the outputs are gone with the handler

    async def _stream(self, request, context, work, outputs, stats, queue_ms) -> None:
        samples = nbytes = 0
        stall_s = self.service.cfg.grpc.stream_stall_timeout_s
        # lazy: one encoded at a time, off the loop (chunks are stream_chunk_bytes each)
        chunks = self.service.chunks(request, work, outputs, stats, queue_ms, encoded=True)
        del outputs  # the generator holds them; dropped with it when the stream ends or is cancelled
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            samples += chunk.samples
            nbytes += chunk.payload_bytes
            # write() returns once the transport took the chunk; a client that stops reading
            # never lets it return: after stall_s the outputs are freed and the call ends CANCELLED
            # (the status follows whatever the transport still holds for the client).
            write = asyncio.ensure_future(context.write(chunk))
            done, _ = await asyncio.wait({write}, timeout=stall_s)
            if not done:
                chunks.close()
                self.metrics.refused(request.experiment_id, grpc.StatusCode.CANCELLED.name)
                await context.abort(grpc.StatusCode.CANCELLED, f"the client read nothing for {stall_s:g} s")
            write.result()
            del chunk
        self.metrics.answered(request.experiment_id, samples, nbytes, queue_ms)  # one count per request


def add_servicer(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like ``add_TeacherServiceServicer_to_server``, with two differences:
    requests that do not parse reach the handlers as ``kdserve.methods.Malformed`` (answered
    INVALID_ARGUMENT, not grpcio's UNKNOWN), and GetTargets and StreamTargets answer
    pre-serialised replies (reply_wire.EncodedReply): their serializer only hands the bytes over,
    so protobuf never copies nor re-serialises the tensors."""
    methods.add_TeacherServiceServicer_to_server(
        servicer, server, {"GetTargets": reply_wire.identity, "StreamTargets": reply_wire.identity})


@contextlib.contextmanager
def run_server(
    engine: TeacherEngine, port: int = 0, host: str = "127.0.0.1", workers: int = 8, metrics_port: int | None = None,
    *, auth_token: str | None = None, allow_unauthenticated_describe: bool = False,
    tls: grpc.ServerCredentials | None = None, interceptors: Sequence = (), health_interval_s: float = 30.0,
) -> Iterator[int]:
    """Serve ``engine`` on ``host:port`` (0 picks a free port); yields the bound port.

    The server runs on its own loop thread; the caller's thread is free. ``workers``: threads for
    the synchronous grpc.health.v1 servicer. ``metrics_port`` (default: the engine config's
    ``grpc.metrics_port``; 0 = none) serves Prometheus metrics over HTTP on ``host``. ``auth_token``:
    calls need ``authorization: Bearer <token>`` (kdserve.auth); ``tls``: see
    kdserve.tls.server_credentials; ``interceptors``: more ``grpc.aio.ServerInterceptor``s after
    the auth check; grpc.health.v1 follows a probe forward (teacher_server.health).
    """
    with serving(engine, port, host, workers, metrics_port, auth_token=auth_token, tls=tls,
                 allow_unauthenticated_describe=allow_unauthenticated_describe, interceptors=interceptors,
                 health_interval_s=health_interval_s) as (bound, _):
        yield bound


@contextlib.contextmanager
def serving(
    engine: TeacherEngine, port: int = 0, host: str = "127.0.0.1", workers: int = 8, metrics_port: int | None = None,
    *, auth_token: str | None = None, allow_unauthenticated_describe: bool = False,
    tls: grpc.ServerCredentials | None = None, interceptors: Sequence = (), health_interval_s: float = 30.0,
    servicer_cls: type[Servicer] | None = None,
) -> Iterator[tuple[int, Servicer]]:
    """``run_server``, yielding (port, servicer): for tests that look into the queue, or a subclass
    (``servicer_cls``, default ``Servicer``)."""
    engine.cfg.check_frontend("grpc")  # an option only Serve or Triton reads would be ignored here
    chain = [*auth.interceptors(auth_token, allow_unauthenticated_describe), *interceptors]
    home = _LoopThread()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdserve-health")
    reporter = HealthReporter(engine, health_interval_s)
    http = None
    try:
        start = _start((servicer_cls or Servicer)(engine), f"{host}:{port}", tls, chain, pool, reporter)
        servicer, server, bound = home.submit(start).result()
        if bound == 0:
            raise OSError(f"cannot bind {host}:{port}")
        metrics_port = engine.cfg.grpc.metrics_port if metrics_port is None else metrics_port
        if metrics_port:
            import prometheus_client

            http, _ = prometheus_client.start_http_server(metrics_port, addr=host)
        reporter.start()
        malloc.start_trimmer()  # freed reply buffers go back to the OS once requests stop
        home.submit(server.start()).result()
        try:
            yield bound, servicer
        finally:
            reporter.stop()
            home.submit(server.stop(grace=2)).result()
            servicer.coalescer.close()  # the target store writes and flushes what it holds
    finally:
        home.close()
        pool.shutdown(wait=False, cancel_futures=True)
        if http is not None:
            http.shutdown()
            http.server_close()


def build_server(servicer: Servicer, address: str, tls=None, interceptors: Sequence = (),
                 pool: concurrent.futures.Executor | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server of ``servicer`` bound to ``address`` (port 0: a free one), not started;
    (server, bound port, 0 when it could not bind). Call it on the loop that will run the server."""
    options = server_options(servicer.service.cfg.max_request_bytes)
    server = grpc.aio.server(migration_thread_pool=pool, options=options, interceptors=list(interceptors))
    add_servicer(servicer, server)
    try:
        bound = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises on a port in use
        bound = 0
    return server, bound


async def _start(servicer, address, tls, chain, pool, reporter) -> tuple[Servicer, grpc.aio.Server, int]:
    """Built on the loop thread: a grpc.aio server belongs to the loop it was created on."""
    server, bound = build_server(servicer, address, tls, chain, pool)
    reporter.add_to_server(server)
    return servicer, server, bound
