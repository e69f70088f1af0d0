"""A Ray Serve replica's own gRPC endpoint, and where clients learn the live ones.

Through Serve, every request and reply crosses the gRPC proxy actor: one shared hop that costs
more than the replica's own work for small teachers (``bench`` P4: 0.12 of a bare echo, against
0.56 for the plain server). So each replica also serves TeacherService on a port of its node, with
the same handlers over the same batcher, memory budget and token (``grpc_server.Servicer.sharing``),
and lists itself in Ray's GCS key-value store. Describe, answered through the proxy, names the
replicas alive now (``TeacherInfo.replica_endpoints``); a client sends its targets requests there,
spread across them, and falls back to the proxy address it was given.

Serve keeps the replicas' lifecycle: it starts, health-checks, scales and stops them; an endpoint
lives and dies with its replica. A replica that stops cleanly removes its entry; one that dies
with its node stops renewing it (every ``HEARTBEAT_S``) and drops out after ``TTL_S``. Clients
drop an endpoint that answers UNAVAILABLE and retry elsewhere, so a lost replica costs a retry.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, Iterable

from kdserve import auth

logger = logging.getLogger(__name__)

KV_NAMESPACE = "kdserve"
HEARTBEAT_S = 5.0
TTL_S = 15.0  # three missed heartbeats: the replica (or its node) is gone


def key_prefix(app: str) -> bytes:
    return f"endpoints/{app}/".encode()


def fresh(entries: Iterable[bytes | None], now: float, ttl_s: float = TTL_S) -> list[str]:
    """The endpoints of the registry entries (JSON {"endpoint", "t"}) renewed within ``ttl_s``,
    sorted; unreadable entries are skipped."""
    out = set()
    for raw in entries:
        try:
            e = json.loads(raw)
            if now - float(e["t"]) <= ttl_s:
                out.add(str(e["endpoint"]))
        except (TypeError, ValueError, KeyError):
            continue
    return sorted(out)


def live_endpoints(app: str) -> list[str]:
    """The endpoints of ``app``'s replicas that renewed their entry lately (GCS key-value store)."""
    from ray.experimental import internal_kv as kv

    keys = kv._internal_kv_list(key_prefix(app), namespace=KV_NAMESPACE)
    return fresh((kv._internal_kv_get(k, namespace=KV_NAMESPACE) for k in keys), time.time())


def advertised(host: str) -> str:
    """The address other nodes reach a server bound on ``host`` by: the node's IP for a wildcard."""
    if host in ("0.0.0.0", "::", ""):
        import ray

        return ray.util.get_node_ip_address()
    return host


def split_cap(cap: int, replicas: int) -> int:
    """One replica's share of a per-experiment cap over ``replicas`` (0 stays "no cap"): the floor,
    at least 1, so the replicas together never admit more than ``cap`` (once cap >= replicas)."""
    return 0 if cap == 0 else max(1, cap // max(1, replicas))


class DirectEndpoint:
    """One replica's endpoint: a grpc.aio server on the replica's loop, and its registry entry.

    ``on_replicas(n)`` is told how many replicas are alive after each heartbeat (the caller splits
    its per-experiment caps by it)."""

    def __init__(self, servicer, host: str, port: int, token: str | None, app: str, replica: str,
                 on_replicas: Callable[[int], None] | None = None):
        self.servicer, self.host, self.port, self.token = servicer, host, port, token
        self.app, self.on_replicas = app, on_replicas
        self.key = key_prefix(app) + replica.encode()
        self.endpoint = ""
        self._server = None
        self._heartbeat: asyncio.Task | None = None

    async def start(self) -> str:
        from teacher_server.grpc_server import build_server

        self._server, bound = build_server(self.servicer, f"{self.host}:{self.port}",
                                           interceptors=auth.interceptors(self.token, False))
        if not bound:
            raise OSError(f"serve.direct_port: cannot bind {self.host}:{self.port}")
        await self._server.start()
        self.endpoint = f"{advertised(self.host)}:{bound}"
        self._heartbeat = asyncio.ensure_future(self._renew())
        return self.endpoint

    async def _renew(self) -> None:
        from ray.experimental import internal_kv as kv

        while True:
            entry = json.dumps({"endpoint": self.endpoint, "t": time.time()})
            try:
                await asyncio.to_thread(lambda: kv._internal_kv_put(self.key, entry, namespace=KV_NAMESPACE))
                if self.on_replicas is not None:
                    self.on_replicas(len(await asyncio.to_thread(live_endpoints, self.app)))
            except Exception as e:  # the GCS restarting: the next heartbeat tries again
                logger.warning("direct endpoint %s: registry not renewed: %s", self.endpoint, e)
            await asyncio.sleep(HEARTBEAT_S)

    async def stop(self) -> None:
        from ray.experimental import internal_kv as kv

        if self._heartbeat is not None:
            self._heartbeat.cancel()
        try:
            kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)
        except Exception:
            pass  # the entry expires by itself
        if self._server is not None:
            await self._server.stop(grace=2)
