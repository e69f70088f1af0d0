"""The teacher as a Ray Serve application with gRPC ingress and cross-client dynamic batching.

    serve run teacher_server/serve_config.yaml            # Serve config (gRPC port, app args)
    serve run teacher_server.serve_app:build_app model=timm:vit_base_patch16_224

Requests from every client (several experiments) land in one ``@serve.batch`` queue per replica;
a batch is answered by ``TeacherEngine.run`` in as few forwards as the inputs allow.
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import gRPCOptions

from kdserve.v1 import teacher_pb2 as pb
from teacher_server.coalesce import Coalescer
from kdserve.teacher_config import TeacherConfig
from teacher_server.engine import TeacherEngine, Work
from teacher_server.metrics import get_metrics
from teacher_server.service import TeacherService, reply_bytes, reply_samples, status_of

SERVICER = "kdserve.v1.teacher_pb2_grpc.add_TeacherServiceServicer_to_server"
APP_NAME = "teacher"


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER])


class Refused(Exception):
    """A request answered with an error status (already set on the gRPC context)."""


@serve.deployment(name="Teacher")
class TeacherDeployment:
    def __init__(self, config: dict[str, Any]):
        self.cfg = TeacherConfig(**config)
        self.engine = TeacherEngine.from_config(self.cfg)
        self.service = TeacherService(self.engine, self.cfg)
        self.metrics = get_metrics("ray")
        self.coalescer = Coalescer.from_config(
            self.engine, self.cfg, on_batch=self.metrics.batch_stats, metrics=self.metrics,
            cache_events=self.metrics.cache_event,
        )
        self._batched.set_max_batch_size(self.cfg.max_batch_requests)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    async def Describe(self, request: pb.DescribeRequest) -> pb.TeacherInfo:
        return self.service.describe()

    async def GetTargets(self, request: pb.TargetsRequest, grpc_context) -> pb.TargetsReply:
        answer = await self._answer(request, grpc_context, stream=False)
        if answer is None:
            return pb.TargetsReply()
        reply = self.service.reply(request, *answer)
        self.metrics.answered(request.experiment_id, reply_samples(reply), reply_bytes(reply), answer[3])
        return reply

    async def StreamTargets(self, request: pb.TargetsRequest, grpc_context):
        answer = await self._answer(request, grpc_context, stream=True)
        if answer is None:
            # A generator that just returns ends the stream with OK; raising makes Serve send the
            # status code set on grpc_context.
            raise Refused(grpc_context.details())
        samples = nbytes = 0
        for chunk in self.service.chunks(request, *answer):
            samples += reply_samples(chunk)
            nbytes += reply_bytes(chunk)
            yield chunk
        self.metrics.answered(request.experiment_id, samples, nbytes, answer[3])  # one count per request

    async def _answer(self, request, grpc_context, stream: bool):
        """(work, outputs, stats, queue_ms), or None after setting an error status."""
        try:
            work = self.service.prepare(request, stream=stream)
            work.experiment = request.experiment_id
            outputs, stats, queue_ms = await self._batched(work)
        except Exception as e:  # a status for the client; the replica stays up
            code, msg = status_of(e)
            self.metrics.refused(request.experiment_id, code.name)
            grpc_context.set_code(code)
            grpc_context.set_details(msg)
            return None
        return work, outputs, stats, queue_ms

    # Several Serve batches may wait at once; the Coalescer merges them into each next forward.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=4)
    async def _batched(self, works: list[Work]) -> list[tuple]:
        return await self.coalescer.submit(works)

    def check_health(self) -> None:
        """Serve's health check: the engine must still be loaded."""
        if self.engine is None:
            raise RuntimeError("teacher engine is gone")


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
