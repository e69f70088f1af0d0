"""The baseline of P4 (``transport_overhead.py``): a bare grpc.aio bytes echo in a child process.

A generic grpc.aio handler with identity (bytes) serializers and the CHANNEL_OPTIONS limits, on
loopback. The first 8 bytes of a request name the reply size; the reply is that many random bytes
(made once per size), so a frontend's reply and the echo's move the same bytes down the wire.
Clients: ``bench.common.echo_window`` (one grpc.aio channel, so one TCP connection, per client).
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import struct
from typing import Any

import grpc

ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "Echo"
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]  # a TCP connection per channel


def identity(b: bytes) -> bytes:
    return b


def echo_server_process(conn, options: list[tuple[str, Any]]) -> None:
    """Child process: serve the echo on a free loopback port, send the port back over ``conn``.

    With the malloc settings of a teacher process (teacher_server/malloc.py): both sides of a ratio
    run with the same process settings (they speed up large replies of the echo too)."""
    from teacher_server import malloc

    malloc.tune()
    asyncio.run(_echo_serve(conn, options))


async def _echo_serve(conn, options) -> None:
    replies: dict[int, bytes] = {}

    async def echo(request: bytes, context) -> bytes:
        (n,) = struct.unpack_from("<Q", request)  # the first 8 bytes name the reply size
        if n not in replies:
            replies[n] = os.urandom(n)
        return replies[n]

    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {ECHO_METHOD: grpc.unary_unary_rpc_method_handler(echo, identity, identity)},
    )
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    await server.wait_for_termination()


def start_echo_server(options) -> tuple[mp.Process, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=echo_server_process, args=(child, options), daemon=True)
    proc.start()
    if not parent.poll(60):
        proc.terminate()
        raise RuntimeError("echo server did not start within 60 s")
    return proc, parent.recv()
