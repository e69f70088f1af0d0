"""A second experiment over the same data as the first, with the teacher's target cache on.

    python bench/bench_cache.py                 # ~1 min on 2 cores
    python bench/bench_cache.py --batches 200 --out bench/results/cache.json

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


def batches(n: int, size: int, max_length: int):
    from student_workers.data import build_dataset, collate_text
    from student_workers.tokenizer import load_tokenizer

    ds = build_dataset("wordnet", split="train")
    collate = collate_text(load_tokenizer("minilm"), max_length)
    return [collate([ds[i * size + j] for j in range(size)]) for i in range(n)]


def experiment(address: str, name: str, data, spec) -> dict:
    from student_workers.client import SyncTeacherClient

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
    engine = TeacherEngine.from_config(TeacherConfig(model="minilm", cache_bytes=args.cache_mb << 20))
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


if __name__ == "__main__":
    main()
