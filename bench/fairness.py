"""A light experiment's latency next to a flooding one, FIFO vs fair scheduling, on the real server.

    python -m bench --only F                                   # figure F of the runner (--seconds 8; 4 with --quick)
    python -m bench --sweep fairness --seconds 10 --out bench/results/fairness.json   # this script's own options

Figure F (``F_fairness_light_p50``, ``figure`` below): the light experiment's p50 latency next to
the flood under the fair scheduler (measured) vs under FIFO (baseline), same server code, same
clients: below 1 is better; the flood's throughput kept under fair scheduling rides along.

Teacher: a small random-init timm ViT (64 px, patch 8 -> 65 tokens, D=96, 4 blocks) served by the
plain gRPC frontend (``run_server``: the shared Coalescer) in a CHILD PROCESS, one torch thread,
so its forwards do not compete with the clients for this process's GIL.
Clients (threads here, sync stubs): "flood" = --flood-clients clients each sending batches of
--flood-batch back to back; "light" = 1 client sending batches of --light-batch with --think-ms
between requests. Every request asks the last block's hidden state in float16.

Phases (--seconds each): light alone; flood alone; flood + light under FIFO; flood + light under
fair (a fresh server per scheduler). Reported: the light client's p50/p99 latency, flood samples/s,
and the median batch compute time the server reports (Timings.compute_ms) to compare with.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import threading
import time
from pathlib import Path

from bench.common import Figure

MODEL_KWARGS = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)


def _serve(scheduler: str, max_batch: int, ports: mp.Queue, stop: mp.Event) -> None:
    import torch

    torch.set_num_threads(1)
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.engine import TeacherEngine
    from teacher_server.grpc_server import run_server

    cfg = TeacherConfig(model="timm:vit_tiny_patch16_224", pretrained=False, model_kwargs=MODEL_KWARGS,
                        max_batch_size=max_batch, sharing={"scheduler": scheduler})
    with run_server(TeacherEngine.from_config(cfg)) as port:
        ports.put(port)
        stop.wait()


class Server:
    def __init__(self, scheduler: str, max_batch: int):
        ctx = mp.get_context("spawn")
        self.ports, self.stop = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(scheduler, max_batch, self.ports, self.stop), daemon=True)

    def __enter__(self) -> int:
        self.proc.start()
        return self.ports.get(timeout=120)

    def __exit__(self, *exc):
        self.stop.set()
        self.proc.join(timeout=20)
        if self.proc.is_alive():
            self.proc.kill()


def _client(port: int, experiment: str, batch: int, window: dict, think_s: float, out: list, compute: list) -> None:
    import grpc
    import torch

    from kdserve import wire
    from kdserve.v1 import teacher_pb2_grpc as pb_grpc

    x = torch.rand(batch, 3, 64, 64)
    req = wire.build_request({"pixel_values": x}, wire.target_spec(hidden={"vision": [4]}, dtype="float16"),
                             experiment_id=experiment)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        stub.GetTargets(req)  # warm: connection, first forward
        window["barrier"].wait()  # every client warm: the measured window starts now
        until = window["until"]
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            reply = stub.GetTargets(req)
            t1 = time.perf_counter()
            if t1 <= until:
                out.append((t1 - t0) * 1e3)
                compute.append(reply.timings.compute_ms)
            if think_s:
                time.sleep(think_s)


def phase(port: int, seconds: float, args, flood: bool, light: bool) -> dict:
    n = (args.flood_clients if flood else 0) + (1 if light else 0)
    window: dict = {}
    window["barrier"] = threading.Barrier(n, action=lambda: window.update(until=time.perf_counter() + seconds))
    flood_lat: list = []
    light_lat: list = []
    compute: list = []
    threads = []
    if flood:
        threads += [threading.Thread(target=_client, args=(port, "flood", args.flood_batch, window, 0.0, flood_lat, compute))
                    for _ in range(args.flood_clients)]
    if light:
        threads.append(threading.Thread(target=_client, args=(port, "light", args.light_batch, window,
                                                               args.think_ms / 1e3, light_lat, [])))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res: dict = {}
    if light_lat:
        q = statistics.quantiles(light_lat, n=100) if len(light_lat) > 1 else light_lat * 99
        res.update(light_requests=len(light_lat), light_p50_ms=statistics.median(light_lat), light_p99_ms=q[98])
    if flood_lat:
        res.update(flood_samples_per_s=len(flood_lat) * args.flood_batch / seconds,
                   batch_compute_p50_ms=statistics.median(compute))
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase")
    p.add_argument("--flood-clients", type=int, default=8)
    p.add_argument("--flood-batch", type=int, default=32)
    p.add_argument("--light-batch", type=int, default=2)
    p.add_argument("--think-ms", type=float, default=20.0, help="pause of the light client between requests")
    p.add_argument("--max-batch", type=int, default=64, help="TeacherConfig.max_batch_size (samples per forward)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)

    rows: dict = {}
    with Server("fair", args.max_batch) as port:
        rows["light alone"] = phase(port, args.seconds, args, flood=False, light=True)
        rows["flood alone"] = phase(port, args.seconds, args, flood=True, light=False)
        rows["flood+light fair"] = phase(port, args.seconds, args, flood=True, light=True)
    with Server("fifo", args.max_batch) as port:
        rows["flood+light fifo"] = phase(port, args.seconds, args, flood=True, light=True)

    print(f"{'phase':<18} {'light p50 ms':>12} {'light p99 ms':>12} {'light n':>7} {'flood smp/s':>11} {'batch p50 ms':>12}")
    for name, r in rows.items():
        def f(k, fmt="{:.1f}"):
            return fmt.format(r[k]) if k in r else "-"
        print(f"{name:<18} {f('light_p50_ms'):>12} {f('light_p99_ms'):>12} {f('light_requests', '{:d}'):>7} "
              f"{f('flood_samples_per_s'):>11} {f('batch_compute_p50_ms'):>12}")
    alone = rows["flood alone"]["flood_samples_per_s"]
    summary = {
        "flood_throughput_kept_fair": rows["flood+light fair"]["flood_samples_per_s"] / alone,
        "flood_throughput_kept_fifo": rows["flood+light fifo"]["flood_samples_per_s"] / alone,
        "light_p50_over_batch_p50_fair": rows["flood+light fair"]["light_p50_ms"] / rows["flood+light fair"]["batch_compute_p50_ms"],
        "light_p50_over_batch_p50_fifo": rows["flood+light fifo"]["light_p50_ms"] / rows["flood+light fifo"]["batch_compute_p50_ms"],
    }
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    doc = {"args": vars(args), "model_kwargs": MODEL_KWARGS, "phases": rows, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.out}")
    return doc


def figure(quick: bool, log) -> Figure:
    """Figure F of ``python -m bench``."""
    doc = main(["--seconds", "4" if quick else "8"])
    fair, fifo = doc["phases"]["flood+light fair"], doc["phases"]["flood+light fifo"]
    log(f"F light p50 {fair['light_p50_ms']:.1f} ms fair vs {fifo['light_p50_ms']:.1f} ms FIFO")
    rows = [{"phase": k, **v} for k, v in doc["phases"].items()]
    return Figure(
        "F_fairness_light_p50", baseline=fifo["light_p50_ms"], measured=fair["light_p50_ms"], unit="ms (lower is better)",
        what=("p50 latency of a light experiment (batch 2, 20 ms think time) beside 8 flooding clients (batch 32), "
              "fair scheduler vs FIFO, plain gRPC teacher (tiny ViT) in a child process"),
        rows=rows, extra={"summary": doc["summary"]},
    )


if __name__ == "__main__":
    main()
