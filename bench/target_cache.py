"""A second experiment over the same data as the first, with the teacher's target cache on.

    python -m bench --only C                                   # figure C of the runner (--batches 60; 30 with --quick)
    python -m bench --sweep target-cache --batches 200 --out bench/results/cache.json   # this script's own options

Figure C (``C_cache_speedup``, ``figure`` below): requests/s of the second experiment (measured)
vs the first, which missed (baseline); the forwards each one triggered ride along (the second
should trigger none).

One plain gRPC teacher (the packaged MiniLM, ``cache_bytes`` set) serves two experiments one
after the other; each sends the same --batches batches of WordNet glosses (the same tokens, the
same spec: hidden states of blocks 2, 4, 6 in float16, as the quickstart asks). Reported: the
teacher forwards each experiment triggered (counted on the adapter) and each one's requests/s.
Bounded by the forward (a miss) versus a hash of the request plus an LRU lookup (a hit).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import Figure


def batches(n: int, size: int, max_length: int):
    from student_workers.data.build import build_dataset
    from student_workers.data.text import collate_text
    from student_workers.data.tokenizer import load_tokenizer

    ds = build_dataset("wordnet", split="train")
    collate = collate_text(load_tokenizer("minilm"), max_length)
    return [collate([ds[i * size + j] for j in range(size)]) for i in range(n)]


def experiment(address: str, name: str, data, spec) -> dict:
    from student_workers.client.sync_client import SyncTeacherClient

    with SyncTeacherClient(address, experiment_id=name, timeout=60) as client:
        t0 = time.perf_counter()
        for b in data:
            client.get_targets({k: b[k] for k in ("input_ids", "attention_mask")}, spec)
        return {"requests": len(data), "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    import torch

    from kdserve import wire
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.engine import TeacherEngine
    from teacher_server.grpc_server import run_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-mb", type=int, default=512)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = TeacherEngine.from_config(TeacherConfig(model="minilm", sharing={"cache_bytes": args.cache_mb << 20}))
    forwards = [0]
    forward = engine.adapter.forward

    def counted(*a, **k):
        forwards[0] += 1
        return forward(*a, **k)

    engine.adapter.forward = counted
    data = batches(args.batches, args.batch_size, 32)
    spec = wire.target_spec(hidden={"text": [2, 4, 6]}, dtype="float16")
    rows = {}
    with run_server(engine) as port:
        for name in ("first", "second"):
            before = forwards[0]
            r = experiment(f"grpc://127.0.0.1:{port}", name, data, spec)
            rows[name] = {**r, "forwards": forwards[0] - before, "requests_s": r["requests"] / r["seconds"]}
    result = {
        "rows": rows,
        "forwards_ratio": rows["second"]["forwards"] / max(1, rows["first"]["forwards"]),
        "speedup": rows["second"]["requests_s"] / rows["first"]["requests_s"],
    }
    print(f"{'experiment':10s} {'requests':>8s} {'forwards':>8s} {'requests/s':>10s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['requests']:8d} {r['forwards']:8d} {r['requests_s']:10.1f}")
    print(f"second/first: forwards {result['forwards_ratio']:.3f}, requests/s {result['speedup']:.1f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def figure(quick: bool, log) -> Figure:
    """Figure C of ``python -m bench``."""
    doc = main(["--batches", "30" if quick else "60"])
    first, second = doc["rows"]["first"], doc["rows"]["second"]
    log(f"C cache: {second['requests_s']:.1f} vs {first['requests_s']:.1f} requests/s, "
        f"forwards {second['forwards']} vs {first['forwards']}")
    return Figure(
        "C_cache_speedup", baseline=first["requests_s"], measured=second["requests_s"], unit="requests/s",
        what=("a second experiment replaying the first one's WordNet batches (MiniLM, blocks 2/4/6 float16) with "
              "the target cache on vs the first; forwards: first "
              f"{first['forwards']}, second {second['forwards']}"),
        rows=[{"experiment": k, **v} for k, v in doc["rows"].items()],
    )


if __name__ == "__main__":
    main()


# -- across replicas: a repeated experiment's forwards with 1 and 3 Ray Serve replicas -------------
# A synthetic teacher (a few ms per forward, no CPU) with a target cache on each replica. The client
# lists the replicas' endpoints (Describe) and, since Describe says caches_targets, sends each
# request to the replica that owns its content (rendezvous hashing, GrpcTransport): a repeat finds
# every target where it was computed. Counted: requests a forward answered (Timings.compute_ms > 0;
# a cache hit reports 0), as tests/test_direct.py checks.
REPLICA_MODEL = "synthetic:layers=2,tokens=4,dim=8,heads=2,classes=0,image_size=8,latency_ms=5"
REPLICA_APPS = {"c1": 1, "c3": 3}


def replica_app_configs() -> dict[str, dict]:
    from kdserve.teacher_config import TeacherConfig

    return {name: TeacherConfig(model=REPLICA_MODEL, device="cpu", max_batch_size=32,
                                serve={"num_cpus": 0.1, "num_replicas": n},
                                sharing={"max_requests_per_experiment": 0, "cache_bytes": 64 << 20}).model_dump()
            for name, n in REPLICA_APPS.items()}


async def _replay(address: str, replicas: int, requests: int) -> dict:
    """One experiment's ``requests`` batches, then the same again as a second experiment, through
    the kdserve client; forwards counted per run and requests per endpoint. With more than one
    replica, a third run repeats them once more with the client's routing by content turned off
    (each to the least busy replica): what the routing saves."""
    import asyncio

    import torch

    from kdserve import wire
    from student_workers.client.async_client import TeacherClient

    g = torch.Generator().manual_seed(replicas)
    data = [{"pixel_values": torch.rand(4, 3, 8, 8, generator=g)} for _ in range(requests)]
    spec = wire.target_spec(hidden={"vision": [2]})
    out: dict = {"replicas": replicas, "requests": requests}
    deadline = time.monotonic() + 60
    for run in ("first", "repeat", "unrouted")[: 3 if replicas > 1 else 2]:
        client = TeacherClient(address, experiment_id=f"cache-{run}", timeout=30)
        transport = client.transport
        while True:  # Serve lists a replica once it has registered its endpoint
            await client.describe(refresh=True)
            if len(transport._replicas) >= replicas or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        listed = len(transport._replicas)
        if run == "unrouted":
            transport._by_content = False
        computed = [0]
        get = transport.get_targets

        async def counted(request, timeout):
            reply = await get(request, timeout)
            computed[0] += reply.timings.compute_ms > 0
            return reply

        transport.get_targets = counted
        t0 = time.perf_counter()
        for i in range(0, requests, 4):  # 4 in flight, like a prefetching student
            await asyncio.gather(*(client.get_targets(b, spec) for b in data[i:i + 4]))
        out[run] = {"forwards": computed[0], "seconds": time.perf_counter() - t0, "endpoints_listed": listed,
                    "by_content": transport._by_content,
                    "per_endpoint": sorted(n for t, n in transport.sent.items() if t != transport.target)}
        await client.close()
    return out


def replica_figures(quick: bool, log, addresses: dict[str, str]) -> list[Figure]:
    """``C_cache_repeat_forwards_<n>_replica(s)``: the repeat's forwards over the first run's."""
    import asyncio

    requests = 60 if quick else 200
    figs = []
    for name, n in REPLICA_APPS.items():
        if name not in addresses:
            continue
        r = asyncio.run(_replay(addresses[name], n, requests))
        first, rep = r["first"], r["repeat"]
        log(f"C cache, {n} replica(s): repeat {rep['forwards']} forwards vs first {first['forwards']} "
            f"({first['endpoints_listed']} endpoints listed, by content {first['by_content']}, requests per "
            f"endpoint {first['per_endpoint']} / {rep['per_endpoint']})")
        figs.append(Figure(
            f"C_cache_repeat_forwards_{n}_replica{'s' if n > 1 else ''}", baseline=first["forwards"],
            measured=rep["forwards"], unit="forwards",
            what=(f"lower is better: requests the teacher computed (a forward; a cache hit reports compute_ms 0) in a repeated experiment ({requests} requests of 4 synthetic "
                  f"images, 4 in flight) over its first run's, Ray Serve, {n} replica(s) with a target cache "
                  f"each; the kdserve client routes by content over the {first['endpoints_listed']} endpoints "
                  f"Describe lists (requests per endpoint, first run: {first['per_endpoint']})"
                  + (f"; a third run with routing by content off (least busy replica): {r['unrouted']['forwards']} "
                     "forwards" if "unrouted" in r else "")),
            rows=[{"run": k, "forwards": r[k]["forwards"], "seconds": r[k]["seconds"],
                   "per_endpoint": r[k]["per_endpoint"]} for k in ("first", "repeat", "unrouted") if k in r],
        ))
    return figs
