"""The teacher as a Ray Serve application with gRPC ingress and cross-client dynamic batching.

    serve run teacher_server/serve_config.yaml            # Serve config (gRPC port, app args)
    serve run teacher_server.serve_app:build_app model=timm:vit_base_patch16_224

Every request goes straight to the replica's Coalescer (no ``@serve.batch``): its fair scheduler
forms each forward from everything queued across experiments, with the per-experiment caps on
requests and queued bytes. Every method first checks the shared bearer token (TeacherConfig
``auth_token_file``, else ``$KDSERVE_AUTH_TOKEN`` in the replica; the Serve gRPC proxy forwards
the ``authorization`` metadata): UNAUTHENTICATED before any decode or forward. Failures map
through ``service.status_of`` like on the plain server: a status with one bounded line, never
INTERNAL for what a client sent. Serve's health check runs a one-sample forward (health.probe).
"""
from __future__ import annotations

import asyncio
from typing import Any

import grpc
from ray import serve
from ray.serve.config import gRPCOptions

from kdserve import auth
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from kdserve.wire import reply_bytes, reply_samples
from teacher_server import malloc
from teacher_server.coalesce import Coalescer
from teacher_server.engine import TeacherEngine
from teacher_server.health import probe
from teacher_server.metrics import get_metrics
from teacher_server.service import TeacherService, experiment_label, status_of

SERVICER = "kdserve.v1.teacher_pb2_grpc.add_TeacherServiceServicer_to_server"
APP_NAME = "teacher"
_METHOD = "/kdserve.v1.TeacherService/"  # Serve's context does not name the method; TokenCheck wants it


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER])


class Refused(Exception):
    """A request answered with an error status (already set on the gRPC context)."""


@serve.deployment(name="Teacher")
class TeacherDeployment:
    def __init__(self, config: dict[str, Any]):
        malloc.tune()  # the replica's process is the teacher's: reply-sized buffers stay in the heap
        self.cfg = TeacherConfig(**config)
        token = auth.load_token(self.cfg.auth_token_file)  # the file, else $KDSERVE_AUTH_TOKEN, else None
        self.auth = auth.TokenCheck(token) if token else None
        self.engine = TeacherEngine.from_config(self.cfg)
        self.service = TeacherService(self.engine, self.cfg)
        self.metrics = get_metrics("ray")
        self.coalescer = Coalescer.from_config(
            self.engine, self.cfg, on_batch=self.metrics.batch_stats, metrics=self.metrics,
            cache_events=self.metrics.cache_event,
        )

    def _refuse(self, grpc_context, experiment: str, code: grpc.StatusCode, msg: str) -> None:
        self.metrics.refused(experiment_label(experiment), code.name)
        grpc_context.set_code(code)
        grpc_context.set_details(msg)

    def _allowed(self, method: str, request, grpc_context) -> bool:
        """Token check before any work; on refusal the status is already set."""
        if self.auth is None:
            return True
        why = self.auth.check(_METHOD + method, grpc_context.invocation_metadata())
        if why is None:
            return True
        self._refuse(grpc_context, getattr(request, "experiment_id", ""), grpc.StatusCode.UNAUTHENTICATED, why)
        return False

    async def Describe(self, request: pb.DescribeRequest, grpc_context) -> pb.TeacherInfo:
        if not self._allowed("Describe", request, grpc_context):
            return pb.TeacherInfo()
        return self.service.describe()

    async def GetTargets(self, request: pb.TargetsRequest, grpc_context) -> pb.TargetsReply:
        answer = await self._answer("GetTargets", request, grpc_context, stream=False)
        if answer is None:
            return pb.TargetsReply()
        try:
            reply = self.service.reply(request, *answer)
        except Exception as e:
            self._refuse(grpc_context, request.experiment_id, *status_of(e))
            return pb.TargetsReply()
        self.metrics.answered(experiment_label(request.experiment_id), reply_samples(reply), reply_bytes(reply), answer[3])
        return reply

    async def StreamTargets(self, request: pb.TargetsRequest, grpc_context):
        answer = await self._answer("StreamTargets", request, grpc_context, stream=True)
        if answer is None:
            # A generator that just returns ends the stream with OK; raising makes Serve send the
            # status code set on grpc_context.
            raise Refused(grpc_context.details())
        samples = nbytes = 0
        chunks = self.service.chunks(request, *answer)  # lazy: one chunk encoded at a time
        while True:
            try:
                chunk = next(chunks, None)
            except Exception as e:
                self._refuse(grpc_context, request.experiment_id, *status_of(e))
                raise Refused(grpc_context.details()) from None
            if chunk is None:
                break
            samples += reply_samples(chunk)
            nbytes += reply_bytes(chunk)
            yield chunk
        self.metrics.answered(experiment_label(request.experiment_id), samples, nbytes, answer[3])  # once per request

    async def _answer(self, method: str, request, grpc_context, stream: bool):
        """(work, outputs, stats, queue_ms), or None after setting an error status."""
        if not self._allowed(method, request, grpc_context):
            return None
        try:
            work = self.service.prepare(request, stream=stream)
            work.experiment = request.experiment_id
            # straight to the fair scheduler: it alone decides what shares each forward
            ((outputs, stats, queue_ms),) = await self.coalescer.submit([work])
        except Exception as e:  # a status for the client; the replica stays up
            self._refuse(grpc_context, request.experiment_id, *status_of(e))
            return None
        return work, outputs, stats, queue_ms

    async def check_health(self) -> None:
        """Serve's health check: a one-sample forward must run and give finite values.

        In a thread, so the replica keeps serving; the engine's lock orders it with the batches.
        """
        await asyncio.to_thread(probe, self.engine)


def build_app(args: dict[str, Any]) -> serve.Application:
    """App builder for ``serve run``/``serve deploy``: ``args`` are TeacherConfig fields."""
    cfg = TeacherConfig(**args)
    deployment = TeacherDeployment.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        # one access-log line per target request would drown the students' progress lines
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    return deployment.bind(cfg.model_dump())


def deploy(cfg: TeacherConfig, grpc_port: int, http_port: int = 8000, host: str = "127.0.0.1") -> int:
    """Start Serve (gRPC on ``grpc_port``) in the connected Ray cluster and deploy the teacher.

    Returns the gRPC port. Blocks until the replicas are healthy.
    """
    serve.start(
        http_options={"host": host, "port": http_port},
        grpc_options=grpc_options(grpc_port),
        logging_config={"log_level": "WARNING"},  # the controller's and proxies' INFO lines
    )
    serve.run(build_app(cfg.model_dump()), name=APP_NAME, route_prefix="/")
    return grpc_port


__all__ = ["TeacherDeployment", "build_app", "deploy", "grpc_options", "APP_NAME"]
