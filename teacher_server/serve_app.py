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

from kdserve import auth, methods, placement
from kdserve.config import ConfigError
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from kdserve.wire import reply_bytes, reply_samples
from teacher_server import malloc
from teacher_server.coalesce import Coalescer
from teacher_server.direct import DirectEndpoint, live_endpoints, split_cap
from teacher_server.engine import TeacherEngine
from teacher_server.grpc_server import Servicer
from teacher_server.health import probe
from teacher_server.metrics import get_metrics
from teacher_server.service import TeacherService, experiment_label, status_of
from teacher_server.spec import TooLarge

SERVICER = methods.SERVICER  # the generated table, with requests that do not parse kept for a status
APP_NAME = "teacher"
_METHOD = "/kdserve.v1.TeacherService/"  # Serve's context does not name the method; TokenCheck wants it


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER])


class Refused(Exception):
    """A request answered with an error status (already set on the gRPC context)."""


@serve.deployment(name="Teacher")
class TeacherDeployment:
    async def __init__(self, config: dict[str, Any]):
        """Async (Serve awaits it on the replica's loop) so the direct endpoint starts on that loop."""
        malloc.tune()  # the replica's process is the teacher's: reply-sized buffers stay in the heap
        malloc.start_trimmer()  # ... and go back to the OS once requests stop
        self.cfg = TeacherConfig(**config)
        token = auth.load_token(self.cfg.serve.auth_token_file)  # the file, else $KDSERVE_AUTH_TOKEN, else None
        self.auth = auth.TokenCheck(token) if token else None
        self.engine = TeacherEngine.from_config(self.cfg)
        # Serve moves a stream's chunks to the proxy as fast as they are made: it holds them all
        self.service = TeacherService(self.engine, self.cfg)
        self.metrics = get_metrics("ray")
        self.coalescer = Coalescer.from_config(
            self.engine, self.cfg, on_batch=self.metrics.batch_stats, metrics=self.metrics,
            cache_events=self.metrics.cache_event,
        )
        self.direct = None
        if self.cfg.serve.direct_port is not None:
            ctx = serve.get_replica_context()
            self.app = ctx.app_name
            self.direct = DirectEndpoint(Servicer.sharing(self.service, self.coalescer, self.metrics),
                                         self.cfg.serve.direct_host, self.cfg.serve.direct_port, token,
                                         self.app, ctx.replica_id.unique_id, on_replicas=self._split_caps)
            await self.direct.start()

    def _split_caps(self, replicas: int) -> None:
        """Each of ``replicas`` replicas admits its share of an experiment's caps (direct.split_cap)."""
        sh = self.cfg.sharing
        self.coalescer.max_requests = split_cap(sh.max_requests_per_experiment, replicas)
        self.coalescer.max_queued_bytes = split_cap(sh.max_queued_bytes_per_experiment, replicas)

    async def __del__(self):
        """Serve's graceful stop: the direct endpoint leaves the registry, then closes; the target
        store (if any) flushes."""
        if getattr(self, "direct", None) is not None:
            await self.direct.stop()
        if getattr(self, "coalescer", None) is not None:
            await asyncio.to_thread(self.coalescer.close)  # the target store writes and flushes what it holds

    def _refuse(self, grpc_context, experiment: str, code: grpc.StatusCode, msg: str) -> None:
        self.metrics.refused(experiment_label(experiment), code.name)
        grpc_context.set_code(code)
        grpc_context.set_details(msg)

    def _allowed(self, method: str, request, grpc_context) -> bool:
        """Token check before any work, then bytes that did not parse (kdserve.methods.Malformed):
        on refusal the status is already set."""
        if self.auth is not None:
            why = self.auth.check(_METHOD + method, grpc_context.invocation_metadata())
            if why is not None:
                self._refuse(grpc_context, getattr(request, "experiment_id", ""), grpc.StatusCode.UNAUTHENTICATED, why)
                return False
        if isinstance(request, methods.Malformed):
            self.metrics.malformed(request.kind)
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(request.message)
            return False
        return True

    async def Describe(self, request: pb.DescribeRequest, grpc_context) -> pb.TeacherInfo:
        if not self._allowed("Describe", request, grpc_context):
            return pb.TeacherInfo()
        if self.direct is None:
            return self.service.describe()
        info = pb.TeacherInfo()
        info.CopyFrom(self.service.describe())  # the service's answer is built once and shared
        info.replica_endpoints.extend(await asyncio.to_thread(live_endpoints, self.app))
        return info

    async def GetTargets(self, request: pb.TargetsRequest, grpc_context) -> pb.TargetsReply:
        answer = await self._answer("GetTargets", request, grpc_context, stream=False)
        if answer is None:
            return pb.TargetsReply()
        try:
            reply = self.service.reply(request, *answer)
        except Exception as e:
            self._refuse(grpc_context, request.experiment_id, *status_of(e))
            return pb.TargetsReply()
        finally:
            self.service.release(answer[0])
        self.metrics.answered(experiment_label(request.experiment_id), reply_samples(reply), reply_bytes(reply), answer[3])
        return reply

    async def StreamTargets(self, request: pb.TargetsRequest, grpc_context):
        answer = await self._answer("StreamTargets", request, grpc_context, stream=True)
        if answer is None:
            # A generator that just returns ends the stream with OK; raising makes Serve send the
            # status code set on grpc_context.
            raise Refused(grpc_context.details())
        work, queue_ms = answer[0], answer[3]
        chunks = self.service.chunks(request, *answer)  # lazy: one chunk encoded at a time
        del answer  # the generator alone holds the outputs
        try:
            samples = nbytes = 0
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
        finally:  # sent, failed or cancelled
            chunks.close()
            self.service.release(work)
        self.metrics.answered(experiment_label(request.experiment_id), samples, nbytes, queue_ms)  # once per request

    async def _answer(self, method: str, request, grpc_context, stream: bool):
        """(work, outputs, stats, queue_ms), or None after setting an error status."""
        if not self._allowed(method, request, grpc_context):
            return None
        work = None
        try:
            work = self.service.prepare(request, stream=stream)
            if stream:
                self._check_proxy_stream(request, work)
            work.experiment = request.experiment_id
            self.service.reserve(work)  # released by the caller once the reply is out
            # straight to the fair scheduler: it alone decides what shares each forward
            ((outputs, stats, queue_ms),) = await self.coalescer.submit([work])
            self.service.check_outputs(outputs)
        except Exception as e:  # a status for the client; the replica stays up
            self.service.release(work)
            self._refuse(grpc_context, request.experiment_id, *status_of(e))
            return None
        except BaseException:  # cancelled: the client went away
            self.service.release(work)
            raise
        return work, outputs, stats, queue_ms

    def _check_proxy_stream(self, request: pb.TargetsRequest, work) -> None:
        """A stream through the proxy is buffered whole in Ray's object store (no flow control): its
        size is bounded by ``serve.proxy_stream_max_bytes`` and it holds its whole reply, not one
        chunk, against the memory budget. The replicas' own endpoints stream with flow control."""
        size = self.service.estimate_reply_bytes(request.spec, work.inputs)
        cap = self.cfg.serve.proxy_stream_max_bytes
        if cap and size > cap:
            raise TooLarge(
                f"a stream of {size} bytes through Ray Serve's gRPC proxy is over serve.proxy_stream_max_bytes "
                f"({cap}; the proxy has no flow control): read it from a replica's own endpoint "
                "(Describe lists them; the kdserve client does this by default) or ask for fewer samples or layers")
        work.held_bytes += size - min(size, self.cfg.stream_chunk_bytes)  # prepare counted one chunk

    async def check_health(self) -> None:
        """Serve's health check: a one-sample forward must run and give finite values.

        In a thread, so the replica keeps serving; the engine's lock orders it with the batches.
        """
        await asyncio.to_thread(probe, self.engine)


def build_app(args: dict[str, Any]) -> serve.Application:
    """App builder for ``serve run``/``serve deploy``: ``args`` are TeacherConfig fields."""
    cfg = TeacherConfig(**args).check_frontend("serve")
    return _deployment(cfg).bind(cfg.model_dump())


def _deployment(cfg: TeacherConfig, runtime_env: dict[str, Any] | None = None):
    """The teacher deployment with its resources; ``runtime_env`` (when given) is the replicas'."""
    sv = cfg.serve
    actor_options: dict[str, Any] = {"num_cpus": sv.num_cpus, "num_gpus": sv.num_gpus}
    if sv.resources:
        actor_options["resources"] = dict(sv.resources)
    if sv.accelerator_type:
        actor_options["accelerator_type"] = sv.accelerator_type
    if runtime_env is not None:
        actor_options["runtime_env"] = runtime_env
    replicas: dict[str, Any] = {"num_replicas": sv.num_replicas}
    if sv.autoscaling is not None:
        replicas = {"num_replicas": "auto", "autoscaling_config": sv.autoscaling.model_dump()}
    return TeacherDeployment.options(
        **replicas,
        max_ongoing_requests=sv.max_ongoing_requests,
        ray_actor_options=actor_options,
        # one access-log line per target request would drown the students' progress lines
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )


def check_placement(cfg: TeacherConfig, field_prefix: str = "") -> None:
    """ConfigError (one line) when no node of the connected cluster could hold a replica."""
    import ray

    f = field_prefix + "serve."
    fields = {"CPU": f + "num_cpus", "GPU": f + "num_gpus", "resources": f + "resources",
              "accelerator_type": f + "accelerator_type"}
    why = placement.unsatisfiable(cfg.serve.replica_resources(), ray.nodes(), fields)
    if why:
        raise ConfigError(why)


def _replica_env(auth_token: str) -> dict[str, Any]:
    """The calling job's runtime_env plus ``$KDSERVE_AUTH_TOKEN``, for the replicas only.

    Serve hands the job's runtime_env to a deployment only when the deployment names none, and
    then the replica would not get the token when the job's runtime_env lacks it (a driver that
    joined a cluster started elsewhere, or tests sharing one): so the replicas get theirs, built
    on the job's (working_dir, env_vars) so nothing else changes for them.
    """
    import ray

    env = dict(ray.get_runtime_context().runtime_env or {})
    env["env_vars"] = {**(env.get("env_vars") or {}), auth.ENV_VAR: auth_token}
    return env


def deploy(cfg: TeacherConfig, grpc_port: int, http_port: int = 8000, host: str = "127.0.0.1",
           auth_token: str | None = None, name: str = APP_NAME, route_prefix: str = "/",
           field_prefix: str = "", start: bool = True) -> int:
    """Start Serve (gRPC on ``grpc_port``) in the connected Ray cluster and deploy the teacher.

    ``auth_token``: the bearer token the replicas require, handed to them as ``$KDSERVE_AUTH_TOKEN``
    in their own runtime_env (``cfg.serve.auth_token_file``, when set, still wins in the replica). Serve's
    gRPC proxy listens on every interface whatever ``host`` says, so a teacher without a token is
    open to anyone who reaches the port. ``name``/``route_prefix``: the application's (calls name it
    in ``application`` metadata once Serve holds two). ``field_prefix`` names the config in errors
    (``teacher.local.``). ``start=False``: Serve already runs (a further application of one instance:
    no second wait for its proxies). Returns the gRPC port. Blocks until the replicas are healthy.
    """
    cfg.check_frontend("serve", field_prefix)  # before Serve starts: an option Serve ignores is the user's mistake
    check_placement(cfg, field_prefix)
    if start:
        serve.start(
            http_options={"host": host, "port": http_port},
            grpc_options=grpc_options(grpc_port),
            logging_config={"log_level": "WARNING"},  # the controller's and proxies' INFO lines
        )
    runtime_env = _replica_env(auth_token) if auth_token else None
    serve.run(_deployment(cfg, runtime_env).bind(cfg.model_dump()), name=name, route_prefix=route_prefix)
    return grpc_port


__all__ = ["TeacherDeployment", "build_app", "deploy", "grpc_options", "APP_NAME"]
