"""The shared-teacher figures of ``python -m bench``, from bench_fairness.py and bench_cache.py.

F_fairness_light_p50: the light experiment's p50 latency next to a flooding one under the fair
  scheduler (measured) vs under FIFO (baseline), same server code, same clients: below 1 is better;
  the flood's throughput kept under fair scheduling rides along.
C_cache_speedup: requests/s of a second experiment replaying the first one's batches with the
  target cache on (measured) vs the first, which missed (baseline); forwards each one triggered
  ride along (the second should trigger none).
"""
from __future__ import annotations

from bench.common import Figure


def fairness(quick: bool, log) -> Figure:
    from bench import bench_fairness

    doc = bench_fairness.main(["--seconds", "4" if quick else "8"])
    fair, fifo = doc["phases"]["flood+light fair"], doc["phases"]["flood+light fifo"]
    log(f"F light p50 {fair['light_p50_ms']:.1f} ms fair vs {fifo['light_p50_ms']:.1f} ms FIFO")
    rows = [{"phase": k, **v} for k, v in doc["phases"].items()]
    return Figure(
        "F_fairness_light_p50", baseline=fifo["light_p50_ms"], measured=fair["light_p50_ms"], unit="ms (lower is better)",
        what=("p50 latency of a light experiment (batch 2, 20 ms think time) beside 8 flooding clients (batch 32), "
              "fair scheduler vs FIFO, plain gRPC teacher (tiny ViT) in a child process"),
        rows=rows, extra={"summary": doc["summary"]},
    )


def cache(quick: bool, log) -> Figure:
    from bench import bench_cache

    doc = bench_cache.main(["--batches", "30" if quick else "60"])
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
