"""The same teacher on Ray Serve and on Triton Inference Server, measured in ONE run on loopback.

Run (from the repository root; ~2 min with the defaults on a 2-core machine):

    python -m bench --sweep triton-vs-serve
    python -m bench --sweep triton-vs-serve --clients 1,2,4 --seconds 5 --out   # + JSON in bench/results/
    python -m bench --sweep triton-vs-serve --model timm:vit_tiny_patch16_224 --model-kwargs '{"depth": 2}' --spec data2vec

One run starts a local Ray cluster with Ray Serve (gRPC ingress, ONE teacher app) and a
tritonserver (the nvidia-pytriton wheel's, ``teacher_server.triton.launch``) on a repository written
for the same teacher config (random-init weights, so both serve the same fingerprint, which is
checked). Both stay up for the whole run; each row's --seconds are split into --rounds short
windows taken alternately (Serve, Triton, Serve, Triton, ...), so both see the same background
load even when it changes during the run.

Both servers get the same compute: the Serve replica reserves --threads CPUs (Ray then sets
OMP_NUM_THREADS to it) and tritonserver runs with OMP_NUM_THREADS=--threads; one replica, one
Triton instance, and the same batching window (batch_wait_timeout_s = max_queue_delay).

Clients: all clients of a measurement run in ONE asyncio loop in this process, each with its own
transport (``GrpcTransport`` / ``TritonTransport``, the two transports behind ``TeacherClient``)
and so its own TCP connection. Each sends its next request when the previous reply arrives and
decodes it (``kdserve.codec.decode_map``, as ``TeacherClient`` does), until the window ends.

Columns:
  frontend    Ray Serve (gRPC proxy) or Triton (Python backend)
  clients     concurrent clients (closed loop, one request in flight each)
  req/s       completed requests per second
  samples/s   req/s x --batch
  MB/s        tensor payload received per second (data + int8 scales; MB = 1e6 B)
  p50 ms      median request latency seen by the client (decode included)
  compute ms  mean server time of the engine.run each request joined (Timings.compute_ms)
  batch req   mean number of requests that shared that engine.run (cross-client batching)
  x serve     Triton MB/s / Ray Serve MB/s at the same number of clients
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"

SPECS = {
    "hidden": dict(hidden={"vision": []}, doc="hidden states of all layers, float32"),
    "data2vec": dict(hidden={"vision": []}, hidden_reduction="data2vec", doc="Data2Vec target, float32"),
    "logits": dict(logits=True, doc="logits, float32"),
}


@dataclass
class Row:
    frontend: str
    clients: int
    seconds: float
    requests: int
    req_s: float
    samples_s: float
    mb_s: float
    p50_ms: float
    compute_ms: float
    batch_requests: float
    reply_bytes: int
    x_serve: float | None = None


def spec_for(name: str, info):
    from kdserve import wire

    kw = {k: v for k, v in SPECS[name].items() if k != "doc"}
    if "hidden" in kw:  # every layer, named explicitly (data2vec also accepts [])
        module = info.modules[0]
        kw["hidden"] = {module.name: list(range(1, module.num_layers + 1))}
    return wire.target_spec(**kw)


async def window(address: str, request, clients: int, seconds: float) -> tuple[float, list[float], list]:
    """Closed-loop clients for ``seconds``: (elapsed, latencies, [(payload bytes, Timings)])."""
    from kdserve import codec
    from student_workers.client.transport import make_transport

    transports = [make_transport(address) for _ in range(clients)]

    async def call(t):
        reply = await t.get_targets(request, 120.0)
        codec.decode_map(reply.outputs)  # what TeacherClient does with every reply
        return reply

    try:
        await asyncio.gather(*(call(t) for t in transports))  # warm-up: connections, batch queues
        start = time.perf_counter()
        deadline = start + seconds

        async def client(t):
            lat, out = [], []
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                reply = await call(t)
                lat.append(time.perf_counter() - t0)
                out.append((sum(codec.nbytes(x) for x in reply.outputs.values()), reply.timings))
            return lat, out

        per = await asyncio.gather(*(client(t) for t in transports))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(t.close() for t in transports))
    return elapsed, [x for l, _ in per for x in l], [x for _, o in per for x in o]


def summarize(frontend: str, clients: int, batch: int, windows: list[tuple[float, list[float], list]]) -> Row:
    elapsed = sum(w[0] for w in windows)
    lat = [x for w in windows for x in w[1]]
    out = [x for w in windows for x in w[2]]
    return Row(
        frontend=frontend, clients=clients, seconds=elapsed, requests=len(out),
        req_s=len(out) / elapsed, samples_s=len(out) * batch / elapsed,
        mb_s=sum(n for n, _ in out) / elapsed / 1e6, p50_ms=statistics.median(lat) * 1e3,
        compute_ms=statistics.fmean(t.compute_ms for _, t in out),
        batch_requests=statistics.fmean(t.batch_requests for _, t in out),
        reply_bytes=out[0][0],
    )


def table(rows: list[Row]) -> str:
    head = f"{'frontend':<10} {'clients':>7} {'req/s':>7} {'samples/s':>10} {'MB/s':>8} {'p50 ms':>8} " \
           f"{'compute ms':>10} {'batch req':>9} {'x serve':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        xs = f"{r.x_serve:.2f}" if r.x_serve is not None else ""
        lines.append(f"{r.frontend:<10} {r.clients:>7} {r.req_s:>7.2f} {r.samples_s:>10.1f} {r.mb_s:>8.1f} "
                     f"{r.p50_ms:>8.1f} {r.compute_ms:>10.1f} {r.batch_requests:>9.2f} {xs:>8}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm:vit_small_patch16_224")
    p.add_argument("--model-kwargs", default='{"depth": 4}', help="JSON constructor overrides")
    p.add_argument("--batch", type=int, default=8, help="samples per request")
    p.add_argument("--clients", default="1,4", help="comma-separated client counts")
    p.add_argument("--seconds", type=float, default=12.0, help="measurement time per row")
    p.add_argument("--rounds", type=int, default=4, help="alternating windows per row (Serve, Triton, Serve, ...)")
    p.add_argument("--spec", choices=sorted(SPECS), default="hidden")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads of each server")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batching window of both servers (s)")
    p.add_argument("--out", action="store_true", help="also write bench/results/triton-<timestamp>.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(2**31 - 1))
    import ray
    import torch
    from ray import serve

    from kdserve import wire
    from kdserve.net import free_port
    from student_workers.client.sync_client import SyncTeacherClient
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.serve_app import build_app, grpc_options
    from teacher_server.triton.launch import run_tritonserver
    from teacher_server.triton.repository import write_repository

    clients = [int(c) for c in args.clients.split(",")]
    cfg = TeacherConfig(
        model=args.model, pretrained=False, model_kwargs=json.loads(args.model_kwargs), device="cpu",
        max_batch_size=max(args.batch * max(clients), args.batch),
        batch_wait_timeout_s=args.batch_wait, num_cpus=args.threads, max_request_bytes=1 << 30,
        max_reply_bytes=(1 << 31) - (1 << 20),
    )
    t0 = time.perf_counter()
    # address="local": a cluster of our own, never one that another program started on this machine
    ray.init(address="local", num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options=grpc_options(port))
    serve.run(build_app(cfg.model_dump()), name="teacher", route_prefix="/")
    print(f"[{time.perf_counter() - t0:5.1f}s] Ray Serve up on grpc://127.0.0.1:{port}/teacher", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kdserve-bench-triton-") as repo:
        write_repository(cfg, repo, instance_kind="cpu", instances=1)
        with run_tritonserver(repo, env={"OMP_NUM_THREADS": str(args.threads)}) as server:
            addresses = {"Ray Serve": f"grpc://127.0.0.1:{port}/teacher", "Triton": server.address()}
            print(f"[{time.perf_counter() - t0:5.1f}s] Triton up on {addresses['Triton']}", flush=True)
            infos = {}
            for name, address in addresses.items():
                with SyncTeacherClient(address, timeout=120) as c:
                    infos[name] = c.describe()
            fps = {i.fingerprint for i in infos.values()}
            assert len(fps) == 1, f"the two servers serve different teachers: {fps}"
            info = infos["Triton"]
            spec = spec_for(args.spec, info)
            shape = next(i for i in info.inputs if i.name == "pixel_values").shape
            inputs = {"pixel_values": torch.rand(args.batch, *shape[1:], generator=torch.Generator().manual_seed(0))}
            request_ = {name: wire.build_request(inputs, spec, experiment_id=f"bench-{name}") for name in addresses}
            for n in clients:
                # --rounds short windows per frontend, alternating, so that both see the same
                # background load even when it changes during the run (shared machines)
                windows: dict[str, list] = {name: [] for name in addresses}
                for _ in range(args.rounds):
                    for name, address in addresses.items():
                        windows[name].append(asyncio.run(window(address, request_[name], n, args.seconds / args.rounds)))
                serve_row = summarize("Ray Serve", n, args.batch, windows["Ray Serve"])
                tri_row = summarize("Triton", n, args.batch, windows["Triton"])
                tri_row.x_serve = tri_row.mb_s / serve_row.mb_s if serve_row.mb_s else None
                rows += [serve_row, tri_row]
                print(f"[{time.perf_counter() - t0:5.1f}s] {n} client(s) done", flush=True)
    serve.shutdown()
    ray.shutdown()

    m = info.modules[0]
    print(f"\nteacher {info.model_name} {args.model_kwargs} random init, {m.num_layers} blocks, hidden {m.hidden_size}, "
          f"{m.num_tokens} tokens; batch {args.batch}; spec: {SPECS[args.spec]['doc']}; reply "
          f"{rows[0].reply_bytes / 1e6:.2f} MB; {args.threads} compute threads per server; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, device cpu\n")
    print(table(rows))
    if args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"triton-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        path.write_text(json.dumps({"args": vars(args), "fingerprint": info.fingerprint,
                                    "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
