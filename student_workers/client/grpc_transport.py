"""``GrpcTransport``: TeacherService over grpc.aio (``grpc://``, ``grpcs://``; Ray Serve applications)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import grpc

from kdserve import auth, registry, reply_wire, tls, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from student_workers.client.errors import TeacherError
from student_workers.client.transport import Transport, parse_address, split_address

T = TypeVar("T")


# grpc shares subchannels between channels of a process by default: a "new" channel would inherit
# the failed subchannel and its reconnect backoff (1 s, growing), so reconnecting after UNAVAILABLE
# would not dial again. A per-channel pool makes a fresh channel really connect afresh.
GRPC_OPTIONS = [*wire.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
_SERVICE = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
REFRESH_S = 10.0  # how often the replicas' endpoints are listed again while they are used


def content_key(request: pb.TargetsRequest) -> bytes:
    """A digest of what a teacher's target cache keys on: the inputs (name, dtype, shape, bytes) or
    texts, and the spec; not the experiment, so two experiments' identical requests share it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(request.spec.SerializeToString(deterministic=True))
    for t in request.texts:
        h.update(len(t).to_bytes(8, "little") + t)
    for name in sorted(request.inputs):
        t = request.inputs[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.data)
    return h.digest()


def owner(key: bytes, endpoints: list[str]) -> str:
    """Rendezvous hashing (Thaler & Ravishankar 1998): the endpoint with the highest hash of (key,
    endpoint). When an endpoint leaves, only its keys move; when one joins, it takes about 1/N."""
    return max(endpoints, key=lambda e: hashlib.blake2b(key + e.encode(), digest_size=8).digest())


class _Route:
    """One target's channel, its multi-callables and its calls in flight."""

    def __init__(self, target: str, channel: grpc.aio.Channel):
        self.target, self.channel = target, channel
        self.stub = pb_grpc.TeacherServiceStub(channel)
        self._rpcs: dict[str, Any] = {}
        self.in_flight = self.sent = 0

    # Replies arrive as bytes and are read by reply_wire.parse_reply: the tensors stay views of
    # the received bytes (protobuf's parser would copy each one, and each read of ``.data`` again).
    def raw(self, method: str, stream: bool):
        rpc = self._rpcs.get(method)
        if rpc is None:  # one multi-callable per channel and method, not one per call
            make = self.channel.unary_stream if stream else self.channel.unary_unary
            rpc = self._rpcs[method] = make(f"/{_SERVICE}/{method}", response_deserializer=None,
                                            request_serializer=pb.TargetsRequest.SerializeToString)
        return rpc


@registry.register("transport", "grpcs")
@registry.register("transport", "grpc")
class GrpcTransport(Transport):
    """TeacherService over grpc.aio; ``grpc://host:port/<app>`` routes to a Ray Serve application.

    ``grpcs://`` (or ``use_tls=True``) speaks TLS, trusting ``tls_ca_file`` (PEM) or the system roots;
    ``auth_token`` is sent as ``authorization: Bearer <token>`` on every call. ``direct``: when the
    teacher's Describe lists its replicas' own endpoints (teacher_server/direct.py), targets requests
    go there, each to the endpoint with the fewest in flight; one that answers UNAVAILABLE leaves the
    list (the client's retry goes elsewhere) and the list is read again every ``REFRESH_S``.
    """

    def __init__(self, target: str, application: str = "", address: str | None = None,
                 options: Iterable[tuple[str, Any]] = GRPC_OPTIONS, *, use_tls: bool = False,
                 tls_ca_file: str | None = None, auth_token: str | None = None, direct: bool = True):
        self.target = target
        self.application = application
        if tls_ca_file and not use_tls:
            raise ValueError(f"tls_ca_file is set but the teacher address {address or target!r} is not grpcs://: "
                             "use grpcs://host:port for TLS")
        self.tls = bool(use_tls)
        scheme = "grpcs" if self.tls else "grpc"
        self.address = address or f"{scheme}://{target}" + (f"/{application}" if application else "")
        self.options = list(options)
        # read now: a bad CA file is a configuration error, not a retryable failure later
        self._credentials = tls.channel_credentials(tls_ca_file) if self.tls else None
        # Ray Serve's gRPC proxy picks the application from this metadata key.
        self.metadata: tuple[tuple[str, str], ...] = (
            *((("application", application),) if application else ()),
            *auth.metadata(auth_token),
        )
        # Replicas' own endpoints (a Ray Serve teacher's Describe lists them): plaintext, so never
        # in place of a TLS address.
        self.direct = bool(direct) and not self.tls
        self._replicas: list[str] = []
        self._by_content = False  # route by request content (the teacher caches targets)
        self._listed_at = 0.0
        self._refresh: asyncio.Future | None = None
        self._routes: dict[str, _Route] = {}  # target -> its channel, in self._loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._closing: set[asyncio.Task] = set()

    def __repr__(self) -> str:  # metadata holds the token
        return f"GrpcTransport({self.address!r})"

    @classmethod
    def from_address(cls, address: str, **kwargs: Any) -> "GrpcTransport":
        scheme = "grpcs" if split_address(address)[0] == "grpcs" else "grpc"
        parts, rest = parse_address(address, scheme, f"{scheme}://host:port[/app]")
        app = parts.path.strip("/")
        if "/" in app:
            raise ValueError(f"teacher address {address!r}: the path must be one Serve application name")
        if scheme == "grpcs":
            kwargs["use_tls"] = True
        return cls(parts.netloc, app, address=f"{scheme}://{rest}", **kwargs)

    def _route(self, target: str) -> _Route:
        """The route to ``target`` in this loop and process, made on first use (never shared across them)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._pid != os.getpid():
            # channels of another loop or of the parent process cannot be used (nor closed) here
            self._routes, self._loop, self._pid = {}, loop, os.getpid()
        route = self._routes.get(target)
        if route is None:
            if self._credentials is not None and target == self.target:
                channel = grpc.aio.secure_channel(target, self._credentials, options=self.options)
            else:
                channel = grpc.aio.insecure_channel(target, options=self.options)
            route = self._routes[target] = _Route(target, channel)
        return route

    def _pick(self, request: pb.TargetsRequest | None = None) -> _Route:
        """A replica's direct endpoint, else the address given. A teacher that caches targets gets each
        request at the replica its content hashes to (``owner``: identical requests meet their cached
        targets, whatever client sends them); otherwise the replica with the fewest calls in flight."""
        if self._replicas and time.monotonic() - self._listed_at > REFRESH_S and self._refresh is None:
            self._refresh = asyncio.ensure_future(self._relist())  # new replicas join, gone ones leave
        if not self._replicas:
            return self._route(self.target)
        if self._by_content and request is not None:
            return self._route(owner(content_key(request), self._replicas))
        routes = [self._route(e) for e in self._replicas]
        return min(routes, key=lambda r: (r.in_flight, r.sent))

    async def _relist(self) -> None:
        try:
            await self.describe(timeout=10.0)
        except TeacherError:
            pass  # keep the list; a failing endpoint still drops out on its own
        finally:
            self._refresh = None

    def _drop(self, route: _Route) -> None:
        """Forget a route that answered UNAVAILABLE: a replica endpoint leaves the list; the next call
        to the address given dials afresh. Closed with a grace period so other calls on it can finish."""
        if self._routes.get(route.target) is not route:
            return  # concurrent calls replaced it already
        del self._routes[route.target]
        if route.target in self._replicas:
            self._replicas = [e for e in self._replicas if e != route.target]
        task = asyncio.ensure_future(route.channel.close(grace=1.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _call(self, route: _Route, fn: Callable[[_Route], Awaitable[T]]) -> T:
        route.in_flight += 1
        route.sent += 1
        try:
            return await fn(route)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._drop(route)
            raise TeacherError(e.code(), e.details() or "", self.address) from None
        finally:
            route.in_flight -= 1

    async def describe(self, timeout: float) -> pb.TeacherInfo:
        info = await self._call(self._route(self.target), lambda r: r.stub.Describe(
            pb.DescribeRequest(), timeout=timeout, metadata=self.metadata))
        if self.direct:
            self._replicas, self._listed_at = list(info.replica_endpoints), time.monotonic()
            self._by_content = info.caches_targets
        return info

    def _parse(self, data: bytes) -> reply_wire.WireReply:
        try:
            return reply_wire.parse_reply(data)
        except reply_wire.WireError as e:
            raise TeacherError(grpc.StatusCode.DATA_LOSS, f"malformed reply: {e}", self.address) from None

    async def get_targets(self, request: pb.TargetsRequest, timeout: float) -> reply_wire.WireReply:
        data = await self._call(self._pick(request), lambda r: r.raw("GetTargets", stream=False)(
            request, timeout=timeout, metadata=self.metadata))
        return self._parse(data)

    async def stream_targets(self, request: pb.TargetsRequest, timeout: float) -> list[reply_wire.WireReply]:
        async def collect(r: _Route) -> list[bytes]:
            return [c async for c in r.raw("StreamTargets", stream=True)(request, timeout=timeout, metadata=self.metadata)]

        return [self._parse(c) for c in await self._call(self._pick(request), collect)]

    @property
    def sent(self) -> dict[str, int]:
        """Calls sent per target (the address given, each replica endpoint) in this loop."""
        return {t: r.sent for t, r in self._routes.items()}

    async def close(self) -> None:
        routes, self._routes = self._routes, {}
        if self._refresh is not None:
            self._refresh.cancel()
        if self._loop is asyncio.get_running_loop() and self._pid == os.getpid():
            await asyncio.gather(*(r.channel.close() for r in routes.values()), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
