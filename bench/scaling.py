"""P6 scaling efficiency: samples/s of 4 Ray Serve replicas over 4x one replica, the same synthetic
teacher, through the replicas' own endpoints (teacher_server/direct.py).

The teacher is latency-bound (each forward sleeps ``LATENCY_MS`` and costs no CPU), so on two cores
what is measured is how well the replicas are kept busy, not the machine's arithmetic: 1.0 means the
clients spread their requests so that every replica always has a full batch. The clients (16
transports x 2 requests in flight, batch 8) keep 4 full batches of ``MAX_BATCH`` queued, so one
replica is saturated and 4 can be. Both apps run in the same Ray cluster; their windows alternate
(ROUNDS each), and the figure takes the medians.
"""
from __future__ import annotations

import asyncio
import statistics

import torch

from bench.common import Figure, teacher_window

LATENCY_MS, MAX_BATCH, BATCH, CLIENTS, DEPTH, ROUNDS = 200, 32, 8, 16, 2, 3
MODEL = f"synthetic:layers=2,tokens=4,dim=8,heads=2,classes=0,image_size=8,latency_ms={LATENCY_MS}"
APPS = {"p6x1": 1, "p6x4": 4}


def app_configs() -> dict[str, dict]:
    from kdserve.teacher_config import TeacherConfig

    return {name: TeacherConfig(model=MODEL, device="cpu", max_batch_size=MAX_BATCH,
                                serve={"num_cpus": 0.1, "num_replicas": n, "max_ongoing_requests": 128},
                                sharing={"max_requests_per_experiment": 0}).model_dump()
            for name, n in APPS.items()}


def samples_per_s(address: str, seconds: float) -> float:
    from kdserve import wire

    req = wire.build_request({"pixel_values": torch.rand(BATCH, 3, 8, 8)}, wire.target_spec(hidden={"vision": [2]}))
    w = asyncio.run(teacher_window(address, req, CLIENTS, seconds, depth=DEPTH, direct=True))
    return w["req_s"] * BATCH


def run(quick: bool, log, addresses: dict[str, str]) -> Figure:
    seconds = 3.0 if quick else 6.0
    one, four = [], []
    for _ in range(ROUNDS):
        one.append(samples_per_s(addresses["p6x1"], seconds))
        four.append(samples_per_s(addresses["p6x4"], seconds))
    s1, s4 = statistics.median(one), statistics.median(four)
    log(f"P6 1 replica {s1:.0f} samples/s, 4 replicas {s4:.0f} ({s4 / (4 * s1):.2f} of 4x)")
    return Figure(
        "P6_scaling_efficiency", baseline=4 * s1, measured=s4, unit="samples/s",
        what=(f"samples/s of 4 Ray Serve replicas vs 4x one replica of the same synthetic teacher ({LATENCY_MS} ms "
              f"per forward, no CPU; max_batch_size {MAX_BATCH}), {CLIENTS} clients x {DEPTH} in flight x batch "
              f"{BATCH} through the replicas' own endpoints; medians of {ROUNDS} alternating {seconds:g} s windows"),
        rows=[{"replicas": 1, "samples_s": [round(x) for x in one]}, {"replicas": 4, "samples_s": [round(x) for x in four]}],
    )
