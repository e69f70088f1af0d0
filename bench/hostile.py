"""A careless (or hostile) client against a shared teacher: statuses and the teacher's memory.

    python -m bench.hostile                       # plain gRPC and Ray Serve, ~5 min on 2 cores
    python -m bench.hostile --frontend grpc --raw 1010

For each frontend, one teacher (a synthetic mpnet-shaped text teacher: 12 blocks x 768, up to
512 tokens, 20 ms per forward; its replies are as large as a real one's and cost no FLOPs) takes,
in order, with its resident memory (RSS of the teacher's process: the plain server's, or the Serve
replica's) read after each phase once the teacher is idle (RSS steady for 2 s):

1. fuzz: ``--raw`` hostile byte strings on a plain channel (tests/raw_requests.py: random,
   truncated, mutated, wrong wire types, invalid UTF-8, overruns, deep nesting), plus oversized
   requests (64-250 MB of input bytes) and large requests cancelled mid-flight;
2. 8 abandoned large streams (1152 MiB of float32 hidden states each, the first chunk read, then
   nothing until the client gives up); on Serve, through the proxy (which refuses streams over
   ``serve.proxy_stream_max_bytes``: it has no flow control) and then from the replica's own
   endpoint (teacher_server/direct.py), where the kdserve client reads them;
3. 100 requests with distinct 256 KiB experiment ids.

Plus, on a tiny random-init ViT (plain gRPC, in this process): a batch of finite inputs of 1e30.
Prints a table and writes bench/results/hostile-<date>.json. Every status must be one the
protocol promises (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED for cancelled calls);
UNKNOWN or INTERNAL is a failure (exit 1).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

from kdserve import wire
from kdserve.net import free_port
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from tests.raw_requests import call_raw, raw_cases

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LAYERS, DIM, MAX_LEN = 12, 768, 512
MODEL = f"synthetic:input=text,layers={LAYERS},dim={DIM},heads=12,classes=0,max_len={MAX_LEN},latency_ms=20"
ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}


def text_request(b: int, t: int, layers=(1, -1), dtype="float16", experiment="hostile", seed=0) -> pb.TargetsRequest:
    ids = torch.randint(1000, 2000, (b, t), generator=torch.Generator().manual_seed(seed))  # (B, T)
    spec = wire.target_spec(hidden={"text": list(layers)}, dtype=dtype)
    return wire.build_request({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, spec, experiment)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident MB of ``pid``: VmRSS, or one of its parts (RssAnon: the process's own heap and
    stacks; RssShmem: shared memory it touched, e.g. Ray's object store)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def settle(pid: int, quiet_s: float = 2.0, limit_s: float = 30.0) -> float:
    """RSS once the teacher is idle: forwards of cancelled requests have ended and the trimmer
    had its turn, i.e. RSS moved by under 2 MB for ``quiet_s`` (or ``limit_s`` passed)."""
    samples = [rss_mb(pid)]
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        time.sleep(0.25)
        samples.append(rss_mb(pid))
        recent = samples[-int(quiet_s / 0.25):]
        if len(samples) > quiet_s / 0.25 and max(recent) - min(recent) < 2:
            break
    return samples[-1]


# -- the phases ----------------------------------------------------------------------------------
def fuzz(ch: grpc.Channel, md, n: int, seed: int) -> collections.Counter:
    rng = random.Random(seed)
    valid = [text_request(rng.randint(1, 4), rng.randint(4, 32), seed=i).SerializeToString() for i in range(8)]
    counts: collections.Counter = collections.Counter()
    for method, _, data in raw_cases(seed, n, valid):
        counts[call_raw(ch, method, data, md)[0].name] += 1
    for mb in (64, 128, 250):  # oversized: a valid header around far too many input bytes
        req = text_request(2, 8)
        req.inputs["input_ids"].data = os.urandom(mb << 20)
        counts[call_raw(ch, "GetTargets", req.SerializeToString(), md)[0].name] += 1
        del req
    counts.update(cancelled_midflight(ch, md, 6))
    return counts


def cancelled_midflight(ch: grpc.Channel, md, n: int) -> collections.Counter:
    """Large valid requests whose client cancels 100 ms in: CANCELLED is what the client sees."""
    counts: collections.Counter = collections.Counter()
    req = text_request(32, MAX_LEN, layers=range(1, LAYERS + 1), dtype="float32")
    ser = pb.TargetsRequest.SerializeToString
    for i in range(n):
        if i % 2:
            call = ch.unary_stream("/kdserve.v1.TeacherService/StreamTargets", request_serializer=ser)(
                req, timeout=120, metadata=md)
        else:
            call = ch.unary_unary("/kdserve.v1.TeacherService/GetTargets", request_serializer=ser).future(
                req, timeout=120, metadata=md)
        threading.Timer(0.1, call.cancel).start()
        try:
            list(call) if i % 2 else call.result()
            counts["OK"] += 1
        except grpc.RpcError as e:
            counts["CANCELLED (by the client)" if e.code() == grpc.StatusCode.CANCELLED else e.code().name] += 1
        except grpc.FutureCancelledError:
            counts["CANCELLED (by the client)"] += 1
    return counts


def abandoned_streams(ch: grpc.Channel, md, pid: int, layers: int, n: int = 8) -> tuple[collections.Counter, float]:
    """``n`` streams of ``layers`` blocks in float32 for 64 x 512 tokens (96 MiB per block): the
    first chunk read, then nothing for a few seconds, then the client gives up. Returns statuses and
    the peak RSS seen meanwhile."""
    stub = pb_grpc.TeacherServiceStub(ch)
    req = text_request(64, MAX_LEN, layers=range(1, layers + 1), dtype="float32")
    counts: collections.Counter = collections.Counter()
    open_streams, peak = [], rss_mb(pid)
    for _ in range(n):
        s = stub.StreamTargets(req, timeout=300, metadata=md)
        try:
            next(s)
            open_streams.append(s)
            counts["OK (first chunk, then abandoned)"] += 1
        except grpc.RpcError as e:
            counts[e.code().name] += 1
        peak = max(peak, rss_mb(pid))
    for _ in range(10):
        time.sleep(0.3)
        peak = max(peak, rss_mb(pid))
    for s in open_streams:
        s.cancel()
    return counts, peak


def huge_ids(ch: grpc.Channel, md, n: int = 100) -> collections.Counter:
    stub = pb_grpc.TeacherServiceStub(ch)
    counts: collections.Counter = collections.Counter()
    for i in range(n):
        req = text_request(1, 8, experiment=f"{i:06d}" + "x" * (256 << 10))
        try:
            stub.GetTargets(req, timeout=60, metadata=md)
            counts["OK"] += 1
        except grpc.RpcError as e:
            counts[e.code().name] += 1
    return counts


def memory(pid: int) -> dict[str, float]:
    """RSS once idle, and its parts: the process's own (anon) and shared memory it touched (shmem:
    for a Serve replica, pages of Ray's object store, which Ray bounds and reuses)."""
    return {"rss": round(settle(pid)), "anon": round(rss_mb(pid, "RssAnon")), "shmem": round(rss_mb(pid, "RssShmem"))}


def run_frontend(name: str, port: int, pid: int, md, n_raw: int, stream_layers: int) -> dict:
    out: dict = {"frontend": name, "stream_mib": 96 * stream_layers}
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        for i in range(5):  # warm: the heap holds one ordinary request's buffers
            stub.GetTargets(text_request(8, 64, seed=i), timeout=60, metadata=md)
        out["start"] = memory(pid)
        t0 = time.perf_counter()
        out["fuzz"] = dict(fuzz(ch, md, n_raw, seed=1))
        out["fuzz_s"] = round(time.perf_counter() - t0, 1)
        out["after_fuzz"] = memory(pid)
        streams, peak = abandoned_streams(ch, md, pid, stream_layers)
        out["streams"], out["streams_peak_rss"] = dict(streams), round(peak)
        out["after_streams"] = memory(pid)
        endpoints = list(stub.Describe(pb.DescribeRequest(), timeout=60, metadata=md).replica_endpoints)
        if endpoints:  # Serve: the same streams from the replica's own endpoint, as the kdserve client reads them
            with grpc.insecure_channel(endpoints[0], options=wire.CHANNEL_OPTIONS) as direct:
                streams, peak = abandoned_streams(direct, (), pid, stream_layers)
            out["direct_streams"], out["direct_streams_peak_rss"] = dict(streams), round(peak)
            out["after_direct_streams"] = memory(pid)
        out["huge_ids"] = dict(huge_ids(ch, md))
        out["after_ids"] = memory(pid)
        stub.GetTargets(text_request(2, 16), timeout=60, metadata=md)  # still serving
        out["alive"] = True
    statuses = collections.Counter()
    for phase in ("fuzz", "streams", "direct_streams", "huge_ids"):
        statuses.update(out.get(phase, {}))
    out["unknown"] = statuses.get("UNKNOWN", 0)
    out["internal"] = statuses.get("INTERNAL", 0)
    return out


# -- the teachers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def plain_teacher():
    """``python -m teacher_server --backend grpc`` as an operator starts it (its heap policy included)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "teacher_server", "--backend", "grpc", "--model", MODEL, "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_port(port, proc)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def pids_of(title: str) -> list[int]:
    """Processes whose command line (Ray sets it to ``ray::<actor>``) contains ``title``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and title in (d / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(d.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def _wait_port(port: int, proc) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the teacher exited: {proc.stdout.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("the teacher did not open its port in 60 s")


@contextlib.contextmanager
def serve_teacher():
    import ray
    from ray import serve

    from kdserve.teacher_config import TeacherConfig
    from teacher_server.serve_app import build_app, grpc_options

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options=grpc_options(port))
        serve.run(build_app(TeacherConfig(model=MODEL, serve={"num_cpus": 1}).model_dump()), name="hostile", route_prefix="/")
        pids = pids_of("ServeReplica:hostile")
        if len(pids) != 1:
            raise RuntimeError(f"expected one Serve replica process, found {pids}")
        yield port, pids[0]
    finally:
        serve.shutdown()
        ray.shutdown()


def huge_inputs_refused() -> dict:
    """1e30 everywhere, on a tiny random-init ViT: the targets overflow to NaN; what comes back?"""
    from teacher_server.engine import TeacherEngine
    from teacher_server.grpc_server import run_server
    from kdserve.teacher_config import TeacherConfig

    cfg = TeacherConfig(model="timm:vit_tiny_patch16_224", pretrained=False,
                        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10))
    req = wire.build_request({"pixel_values": torch.full((2, 3, 32, 32), 1e30)},
                             wire.target_spec(hidden={"vision": [-1]}, logits=True), "huge-inputs")
    with run_server(TeacherEngine.from_config(cfg), health_interval_s=0) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        try:
            pb_grpc.TeacherServiceStub(ch).GetTargets(req, timeout=60)
            return {"status": "OK", "details": ""}
        except grpc.RpcError as e:
            return {"status": e.code().name, "details": e.details()}


def table(rows: list[dict]) -> str:
    """Statuses, then RSS (MB) at each point with its change from the start; anon / shmem below."""
    lines = ["| frontend | fuzz requests | fuzz statuses | abandoned streams | UNKNOWN | INTERNAL |",
             "|---|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['frontend']} | {sum(r['fuzz'].values())} | {json.dumps(r['fuzz'], sort_keys=True)} "
                     f"| {r['stream_mib']} MiB each: {json.dumps(r['streams'], sort_keys=True)} (peak RSS "
                     f"{r['streams_peak_rss']}) | {r['unknown']} | {r['internal']} |")
        if "direct_streams" in r:
            lines.append(f"| {r['frontend']}, the replica's own endpoint | | | {r['stream_mib']} MiB each: "
                         f"{json.dumps(r['direct_streams'], sort_keys=True)} (peak RSS {r['direct_streams_peak_rss']}) | | |")
    lines += ["", "| frontend | RSS start | after fuzz | after 8 abandoned streams | after 8 more, direct | "
              "after 100 huge ids |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["start"]
        cells = [f"{s['rss']} (anon {s['anon']}, shmem {s['shmem']})"]
        for k in ("after_fuzz", "after_streams", "after_direct_streams", "after_ids"):
            m = r.get(k)
            if m is None:
                cells.append("-")
                continue
            cells.append(f"{m['rss']} ({m['rss'] - s['rss']:+d}; anon {m['anon'] - s['anon']:+d}, "
                         f"shmem {m['shmem'] - s['shmem']:+d})")
        lines.append(f"| {r['frontend']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--frontend", default="grpc,serve", help="comma-separated: grpc, serve")
    p.add_argument("--raw", type=int, default=1010, help="hostile byte strings per frontend (plus 9 large ones)")
    args = p.parse_args(argv)
    frontends = [f.strip() for f in args.frontend.split(",") if f.strip()]
    if not set(frontends) <= {"grpc", "serve"}:
        print(f"error: --frontend: unknown {sorted(set(frontends) - {'grpc', 'serve'})}", file=sys.stderr)
        return 2
    rows = []
    for f in frontends:
        with (plain_teacher() if f == "grpc" else serve_teacher()) as (port, pid):
            rows.append(run_frontend("plain gRPC" if f == "grpc" else "Ray Serve", port, pid, (), args.raw, LAYERS))
        print(json.dumps(rows[-1]), flush=True)
    huge = huge_inputs_refused()
    print(table(rows))
    print(f"\n1e30 inputs (tiny ViT, plain gRPC): {huge['status']}: {huge['details']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"hostile-{dt.date.today()}.json"
    out.write_text(json.dumps({"model": MODEL, "rows": rows, "huge_inputs": huge}, indent=1))
    print(f"wrote {out}")
    bad = any(r["unknown"] or r["internal"] for r in rows) or huge["status"] != "INVALID_ARGUMENT"
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
