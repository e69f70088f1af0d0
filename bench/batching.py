"""P2 batching: teacher samples/s with 4 concurrent clients sending batch 8 vs ONE in-process
engine call at batch 32 (the best a frontend can do: every forward full).

Synthetic teacher with a fixed per-forward latency, so a frontend that runs one forward per
request reaches 1/4 of the baseline and one that merges the clients' requests reaches ~1. The
spec asks for logits only (32 KB per reply): the figure is about batching, P4 about bytes.
Frontends: the plain gRPC server (child process) and, when it starts, Ray Serve.
"""
from __future__ import annotations

import asyncio
import time

import torch

from bench.common import ChildTeacher, Figure

LATENCY_MS = 40.0
# ViT-B's outputs (197 tokens, D 768) from 32x32 inputs: a 224x224 float32 request is 600 KB per
# sample, and moving 4 x 4.8 MB of requests per forward on a 2-core machine took longer than the
# forward itself (measured: cycles of ~114 ms for a 40 ms forward), i.e. it measured input bytes.
IMAGE = 32
MODEL = (f"synthetic:layers=12,tokens=197,dim=768,heads=12,classes=1000,image_size={IMAGE},"
         f"latency_ms={LATENCY_MS:g}")
CLIENTS, PER_CLIENT = 4, 8
# Requests each client keeps in flight, as a student's Prefetcher does (depth 2): with one, every
# forward waits for its clients' round trip (reply out, next request in), which the in-process
# baseline never pays; with two, the next batch is queued while a forward runs.
DEPTH = 2


def inputs(n: int) -> dict:
    return {"pixel_values": torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(n))}


def spec():
    from kdserve.wire import target_spec

    return target_spec(logits=True)


def in_process(seconds: float) -> dict:
    """samples/s of engine.run on one batch of 32 (decode of the request included: none needed)."""

    # one torch thread, like the child teacher (OMP_NUM_THREADS=1): two threads on a shared 2-core
    # machine made this baseline's forward ~2x slower than the server's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _in_process(seconds)
    finally:
        torch.set_num_threads(threads)


def _in_process(seconds: float) -> dict:
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.engine import TeacherEngine, Work
    from teacher_server.spec import TargetSpec

    engine = TeacherEngine.from_config(TeacherConfig(model=MODEL, device="cpu"))
    x = inputs(CLIENTS * PER_CLIENT)
    engine.run([Work(x, TargetSpec(logits=True))])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.run([Work(x, TargetSpec(logits=True))])
        n += 1
    el = time.perf_counter() - t0
    return {"samples_s": n * CLIENTS * PER_CLIENT / el, "forwards_s": n / el}


def over_frontend(address: str, seconds: float) -> dict:
    from bench.common import teacher_window
    from kdserve.wire import build_request

    req = build_request(inputs(PER_CLIENT), spec())
    w = asyncio.run(teacher_window(address, req, CLIENTS, seconds, depth=DEPTH))
    w["samples_s"] = w["req_s"] * PER_CLIENT
    return w


def run(quick: bool, log, serve_address: str | None = None, serve_note: str = "") -> Figure:
    seconds = 4.0 if quick else 10.0
    base = in_process(seconds)
    log(f"P2 in-process batch 32: {base['samples_s']:.1f} samples/s")
    rows = [{"frontend": "in-process engine, batch 32", "clients": 1, **base}]
    # forwards of at most the baseline's batch: 2 x 4 requests queued must not make one of 64
    t = ChildTeacher(MODEL, f"max_batch_size={CLIENTS * PER_CLIENT}").wait_ready()
    try:
        g = over_frontend(t.address, seconds)
    finally:
        t.stop()
    rows.append({"frontend": "plain gRPC", "clients": CLIENTS, **g, "ratio": g["samples_s"] / base["samples_s"]})
    log(f"P2 plain gRPC 4x8: {g['samples_s']:.1f} samples/s")
    notes = []
    if serve_address:
        s = over_frontend(serve_address, seconds)
        rows.append({"frontend": "Ray Serve", "clients": CLIENTS, **s, "ratio": s["samples_s"] / base["samples_s"]})
        log(f"P2 Ray Serve 4x8: {s['samples_s']:.1f} samples/s")
    else:
        notes.append(f"Ray Serve skipped: {serve_note}")
    best = max(rows[1:], key=lambda r: r["samples_s"])
    return Figure(
        "P2_batching_ratio", baseline=base["samples_s"], measured=best["samples_s"], unit="samples/s",
        what=(f"teacher samples/s, {CLIENTS} concurrent clients x batch {PER_CLIENT} through {best['frontend']} "
              f"(the best batching frontend; all in rows) vs one in-process engine.run at batch "
              f"{CLIENTS * PER_CLIENT}; {DEPTH} requests in flight per client (prefetch depth), max_batch_size "
              f"{CLIENTS * PER_CLIENT}; synthetic ViT-B outputs from {IMAGE}x{IMAGE} inputs, {LATENCY_MS:g} ms per "
              "forward, logits"),
        rows=rows, notes=notes, extra={"frontend": best["frontend"]},
    )
