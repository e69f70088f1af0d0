"""Throughput and reply size of the kdserve teacher over Ray Serve gRPC, against a bare gRPC echo.

Run (from the repository root, ~1.5-2.5 min with the defaults on a 2-core machine):

    python bench/bench_teacher.py
    python bench/bench_teacher.py --seconds 5 --clients 1,2,4 --out        # + JSON in bench/results/
    python bench/bench_teacher.py --model timm:vit_tiny_patch16_224 --model-kwargs '{"depth": 2}'

One run starts a local Ray cluster (4 logical CPUs), Ray Serve with gRPC ingress and ONE teacher app
(random-init weights), plus a bare grpc.aio echo server in a child process, then prints three tables.

1. Echo baseline: a generic grpc.aio handler with identity (bytes) serializers and the
   CHANNEL_OPTIONS limits, on loopback. The request is 8 bytes (the reply size; pad it with
   --echo-request-bytes); the reply is exactly as many bytes as the teacher's GetTargets reply of
   table 2 (the protobuf message), so the two move the same bytes down the wire.
2. GetTargets through the Ray Serve gRPC proxy, spec "hidden states of all layers, float32".
3. Bytes per sample of other specs (one GetTargets each), relative to that spec.

Clients: all clients of a measurement run in ONE asyncio loop in this process, each with its own
grpc.aio channel and its own TCP connection (local subchannel pool). Separate processes would keep
the clients off each other's GIL, but on 2 cores they would compete with the servers anyway and
cost seconds to start; the echo server runs in its own process, as the Serve proxy does. Each
client sends its next request when the previous reply arrives, until --seconds have passed; the
window ends when the last reply is in. Echo is measured while Ray sits idle, so both see the same
background load.

Columns:
  clients     concurrent clients (closed loop, one request in flight each)
  req/s       completed requests per second
  samples/s   req/s x --batch (teacher only: the echo has no samples)
  MB/s        reply bytes (serialized protobuf message, or the echo's bytes) per second, MB = 1e6 B
  p50 ms      median request latency seen by the client
  queue ms    mean time a request waited in the replica for its batch to start (Timings.queue_ms)
  compute ms  mean server forward time of the batch each request joined (Timings.compute_ms)
  batch req   mean number of requests that shared that forward, averaged over requests
              (cross-client batching; 1.00 = never merged)
  x echo      teacher MB/s / echo MB/s at the same number of clients
  B/sample    tensor payload (data + int8 scales) per sample; "msg" counts the whole message
  x full f32  bytes per sample relative to "hidden, all layers, float32"
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "Echo"
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]  # a TCP connection per channel
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- echo server (child)


def _identity(b: bytes) -> bytes:
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
        {ECHO_METHOD: grpc.unary_unary_rpc_method_handler(echo, _identity, _identity)},
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


# --------------------------------------------------------------------------- measurement


@dataclass
class Call:
    """What one reply tells the benchmark."""

    nbytes: int
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_requests: int = 0


@dataclass
class Row:
    case: str
    clients: int
    seconds: float
    requests: int
    reply_bytes: int
    req_s: float
    mb_s: float
    samples_s: float | None
    p50_ms: float
    queue_ms: float | None = None
    compute_ms: float | None = None
    batch_requests: float | None = None
    x_echo: float | None = None


async def closed_loop(calls: list[Callable[[], Awaitable[Call]]], seconds: float) -> tuple[float, list[float], list[Call]]:
    """Each client repeats its call until ``seconds`` have passed. Returns (elapsed, latencies, calls)."""
    await asyncio.gather(*(c() for c in calls))  # warm-up: connections, batch queues
    start = time.perf_counter()
    deadline = start + seconds

    async def client(call):
        lat, out = [], []
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            out.append(await call())
            lat.append(time.perf_counter() - t)
        return lat, out

    per_client = await asyncio.gather(*(client(c) for c in calls))
    elapsed = time.perf_counter() - start
    lat = [x for l, _ in per_client for x in l]
    out = [x for _, o in per_client for x in o]
    return elapsed, lat, out


def summarize(case: str, clients: int, elapsed: float, lat: list[float], out: list[Call], batch: int | None) -> Row:
    total = sum(c.nbytes for c in out)
    row = Row(
        case=case,
        clients=clients,
        seconds=elapsed,
        requests=len(out),
        reply_bytes=out[0].nbytes,
        req_s=len(out) / elapsed,
        mb_s=total / elapsed / 1e6,
        samples_s=len(out) * batch / elapsed if batch else None,
        p50_ms=statistics.median(lat) * 1e3,
    )
    if batch:
        row.queue_ms = statistics.fmean(c.queue_ms for c in out)
        row.compute_ms = statistics.fmean(c.compute_ms for c in out)
        row.batch_requests = statistics.fmean(c.batch_requests for c in out)
    return row


async def measure_echo(port: int, reply_bytes: int, request_bytes: int, clients: int, seconds: float, options) -> Row:
    request = struct.pack("<Q", reply_bytes) + bytes(max(0, request_bytes - 8))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options + LOCAL_POOL) for _ in range(clients)]
    try:
        def make_call(ch):
            rpc = ch.unary_unary(f"/{ECHO_SERVICE}/{ECHO_METHOD}", request_serializer=_identity, response_deserializer=_identity)

            async def call() -> Call:
                return Call(len(await rpc(request)))

            return call

        elapsed, lat, out = await closed_loop([make_call(ch) for ch in channels], seconds)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return summarize("echo (grpc.aio bytes)", clients, elapsed, lat, out, batch=None)


async def measure_teacher(port: int, request, batch: int, clients: int, seconds: float, options) -> Row:
    from kdserve.v1 import teacher_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options + LOCAL_POOL) for _ in range(clients)]
    try:
        def make_call(ch):
            stub = pb_grpc.TeacherServiceStub(ch)

            async def call() -> Call:
                reply = await stub.GetTargets(request)
                t = reply.timings
                return Call(reply.ByteSize(), t.queue_ms, t.compute_ms, t.batch_requests)

            return call

        elapsed, lat, out = await closed_loop([make_call(ch) for ch in channels], seconds)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return summarize("teacher GetTargets (Serve)", clients, elapsed, lat, out, batch=batch)


# --------------------------------------------------------------------------- teacher side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_teacher(args) -> int:
    """ray.init + Serve with gRPC ingress + one teacher app. Returns the gRPC port."""
    import logging

    import ray

    from kdserve.teacher_config import TeacherConfig
    from teacher_server.serve_app import deploy

    cfg = TeacherConfig(
        model=args.model,
        pretrained=False,
        model_kwargs=json.loads(args.model_kwargs),
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        max_batch_size=max(args.batch, 8),
        batch_wait_timeout_s=args.batch_wait_timeout_s,
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return deploy(cfg, grpc_port=free_port(), http_port=free_port())


def stop_teacher() -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


def make_inputs(info, batch: int, seq_len: int) -> dict:
    """Random inputs matching the teacher's declared ones (images in [0, 1], or token ids)."""
    import torch

    inputs = {}
    for i in info.inputs:
        if not i.required and i.name != "attention_mask":
            continue
        shape = [batch] + [seq_len if d < 0 else int(d) for d in list(i.shape)[1:]]
        if i.dtype.startswith("float"):
            inputs[i.name] = torch.rand(shape)
        elif i.name == "attention_mask":
            inputs[i.name] = torch.ones(shape, dtype=torch.int64)
        else:
            inputs[i.name] = torch.randint(1000, 2000, shape, dtype=torch.int64)
    return inputs


def specs(info) -> dict[str, Any]:
    """The specs of table 3; the first one is the reference (and the one of table 2)."""
    from kdserve.wire import target_spec

    m = info.modules[0]
    every = {m.name: list(range(1, m.num_layers + 1))}
    return {
        "hidden, all layers, float32": target_spec(hidden=every),
        "hidden, all layers, float16": target_spec(hidden=every, dtype="float16"),
        "hidden, all layers, int8": target_spec(hidden=every, dtype="int8"),
        "data2vec (one T x D), float32": target_spec(hidden={m.name: []}, hidden_reduction="data2vec"),
        "attention head_mean, all layers, f32": target_spec(attention=every, attention_reduction="head_mean"),
        "attention per head, all layers, f32": target_spec(attention=every),
    }


def describe(port: int, options):
    from kdserve.v1 import teacher_pb2 as pb
    from kdserve.v1 import teacher_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        return pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest())


def bytes_per_sample(port: int, info, inputs: dict, batch: int, options) -> list[dict]:
    """One GetTargets per spec of ``specs``: tensor bytes and message bytes per sample."""
    from kdserve import codec
    from kdserve.v1 import teacher_pb2_grpc as pb_grpc
    from kdserve.wire import build_request

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        rows = []
        for name, spec in specs(info).items():
            reply = stub.GetTargets(build_request(inputs, spec))
            payload = sum(codec.nbytes(t) for t in reply.outputs.values())
            shapes = sorted({tuple(t.shape[1:]) for t in reply.outputs.values()})
            rows.append(
                dict(
                    spec=name,
                    tensors=len(reply.outputs),
                    sample_shape="x".join(map(str, shapes[0])) if len(shapes) == 1 else str(shapes),
                    payload_per_sample=payload / batch,
                    message_per_sample=reply.ByteSize() / batch,
                )
            )
    ref = rows[0]["payload_per_sample"]
    for r in rows:
        r["x_full_f32"] = r["payload_per_sample"] / ref
    return rows


# --------------------------------------------------------------------------- report


def print_throughput(rows: list[Row]) -> None:
    head = f"{'case':<28}{'clients':>8}{'req/s':>9}{'samples/s':>11}{'MB/s':>9}{'p50 ms':>9}{'queue ms':>10}{'compute ms':>12}{'batch req':>10}{'x echo':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        opt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(
            f"{r.case:<28}{r.clients:>8}{r.req_s:>9.1f}{opt(r.samples_s, '11.1f'):>11}{r.mb_s:>9.1f}"
            f"{r.p50_ms:>9.1f}{opt(r.queue_ms, '10.1f'):>10}{opt(r.compute_ms, '12.1f'):>12}{opt(r.batch_requests, '10.2f'):>10}{opt(r.x_echo, '8.3f'):>8}"
        )


def print_sizes(rows: list[dict]) -> None:
    head = f"{'spec':<40}{'tensors':>8}  {'per-sample shape':<18}{'B/sample':>12}{'msg B/sample':>14}{'x full f32':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['spec']:<40}{r['tensors']:>8}  {r['sample_shape']:<18}{r['payload_per_sample']:>12,.0f}"
            f"{r['message_per_sample']:>14,.0f}{r['x_full_f32']:>11.3f}"
        )


def write_json(path: str, args, info, setup: dict, throughput: list[Row], sizes: list[dict]) -> Path:
    out = Path(path) if path != "auto" else RESULTS / f"{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(
        args=vars(args),
        model=info.model_name,
        modules=[dict(name=m.name, layers=m.num_layers, hidden=m.hidden_size, heads=m.num_heads, tokens=m.num_tokens) for m in info.modules],
        host=dict(cpus=os.cpu_count(), python=sys.version.split()[0], grpc=grpc.__version__),
        setup_s=setup,
        throughput=[asdict(r) for r in throughput],
        bytes_per_sample=sizes,
    )
    out.write_text(json.dumps(doc, indent=2))
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm:vit_small_patch16_224", help="TeacherConfig.model (random init)")
    p.add_argument("--model-kwargs", default='{"depth": 4, "num_classes": 1000}', help="JSON model_kwargs")
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput measurement")
    p.add_argument("--batch", type=int, default=8, help="samples per request")
    p.add_argument("--clients", default="1,4", help="comma-separated numbers of concurrent clients")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample for text teachers")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the teacher replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs of the teacher replica (0: CPU)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    p.add_argument("--echo-request-bytes", type=int, default=8, help="echo request size (>= 8)")
    p.add_argument("--out", nargs="?", const="auto", default=None, help="write JSON (default path bench/results/<timestamp>.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    t0 = time.perf_counter()
    from kdserve.wire import CHANNEL_OPTIONS, build_request

    options = list(CHANNEL_OPTIONS)
    echo_proc, echo_port = start_echo_server(options)
    setup = {"echo_server": time.perf_counter() - t0}
    try:
        t = time.perf_counter()
        port = start_teacher(args)
        setup["ray_and_serve"] = time.perf_counter() - t

        info = describe(port, options)
        inputs = make_inputs(info, args.batch, args.seq_len)
        t = time.perf_counter()
        sizes = bytes_per_sample(port, info, inputs, args.batch, options)
        setup["bytes_per_sample"] = time.perf_counter() - t

        full = specs(info)["hidden, all layers, float32"]
        request = build_request(inputs, full)
        reply_bytes = int(sizes[0]["message_per_sample"] * args.batch)

        throughput: list[Row] = []
        echo: dict[int, Row] = {}
        for n in clients:
            echo[n] = asyncio.run(measure_echo(echo_port, reply_bytes, args.echo_request_bytes, n, args.seconds, options))
            throughput.append(echo[n])
        for n in clients:
            row = asyncio.run(measure_teacher(port, request, args.batch, n, args.seconds, options))
            row.x_echo = row.mb_s / echo[n].mb_s
            throughput.append(row)
    finally:
        t = time.perf_counter()
        stop_teacher()
        echo_proc.terminate()
        echo_proc.join(10)
        setup["shutdown"] = time.perf_counter() - t
    setup["total"] = time.perf_counter() - t0

    m = info.modules[0]
    print()
    print(
        f"teacher {info.model_name}: {m.num_layers} layers, D={m.hidden_size}, {m.num_heads} heads, T={m.num_tokens}; "
        f"batch {args.batch}, request {request.ByteSize() / 1e6:.2f} MB, full-hidden f32 reply {reply_bytes / 1e6:.2f} MB; "
        f"replica num_cpus={args.num_cpus}; {os.cpu_count()} host CPUs"
    )
    print(f"\n1+2. Throughput, hidden states of all layers float32 (echo replies {reply_bytes:,} B, {args.seconds:g} s each)\n")
    print_throughput(throughput)
    print(f"\n3. Bytes per sample (batch {args.batch}), relative to hidden all layers float32\n")
    print_sizes(sizes)
    print("\nsetup/teardown s: " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()))
    if args.out:
        print(f"wrote {write_json(args.out, args, info, setup, throughput, sizes)}")


if __name__ == "__main__":
    main()
