"""P1 prefetch: student steps/s with a remote teacher and ``Prefetcher`` vs targets in memory.

The student's step is a fixed sleep of ``step_ms`` (it releases the GIL, like a GPU step the host
waits on), so the figure measures the pipeline, not CPU contention between a student and a
teacher on one small machine. The teacher is the synthetic one behind the plain gRPC server in a
child process, with a forward latency X below the step time Y (headline), then a curve of X
growing past Y. Baseline: the same loop over the same batches with the targets already in memory.
Ideal: 1 / max(X, Y) with prefetch, 1 / (X + Y) without.
"""
from __future__ import annotations

import time

import torch

from bench.common import ChildTeacher, Figure

MODEL = "synthetic:layers=12,tokens=197,dim=768,heads=12,classes=1000,latency_ms={x}"


def _batches(n: int, batch: int, size: int = 224):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(batch, 3, size, size, generator=g)  # one tensor, varied cheaply per batch
    return [{"pixel_values": (base + i / n).clamp_(0, 1)} for i in range(n)]


def steps_per_s(address: str | None, batches, spec, depth: int, step_s: float, warmup: int) -> tuple[float, float]:
    """Steps/s over the batches after ``warmup``, and mean wait per timed step (s).

    ``address`` None: the targets are fetched before the loop (in memory)."""
    from student_workers.client import SyncTeacherClient
    from student_workers.prefetch import Prefetcher

    if address is None:
        loop = [(b, {}) for b in batches]
        t0 = None
        for i, (b, _t) in enumerate(loop):
            if i == warmup:
                t0 = time.perf_counter()
            time.sleep(step_s)
        return (len(batches) - warmup) / (time.perf_counter() - t0), 0.0
    with SyncTeacherClient(address, timeout=60, max_retries=0) as client:
        client.describe()
        pf = Prefetcher(iter(batches), lambda b: (b, spec), client, depth=depth, timeout=60)
        t0, wait0 = None, 0.0
        for i, (_b, _targets) in enumerate(pf):
            if i == warmup:
                t0, wait0 = time.perf_counter(), pf.total_wait_s - pf.wait_s
            time.sleep(step_s)  # the student's training step
        elapsed = time.perf_counter() - t0
        timed = len(batches) - warmup
        return timed / elapsed, (pf.total_wait_s - wait0) / timed


def run(quick: bool, log) -> Figure:
    from kdserve.wire import target_spec

    step_ms = 60.0
    head_x = 30.0  # below the step time
    curve = [15.0, 60.0, 120.0] if quick else [10.0, 20.0, 40.0, 50.0, 60.0, 75.0, 90.0, 120.0, 180.0]
    steps, warmup, batch = (25, 4, 8) if quick else (60, 5, 8)
    # The last block's hidden states, float16 (2.4 MB per reply). Not Data2Vec: its reduction over
    # 12 layers of a ViT-B batch takes ~1.6 s on one CPU thread, which would measure the CPU.
    spec = target_spec(hidden={"vision": [-1]}, dtype="float16")
    lat = sorted({head_x, *curve})
    teachers = {x: ChildTeacher(MODEL.format(x=x)) for x in lat}  # started together: one startup wait
    rows = []
    try:
        for t in teachers.values():
            t.wait_ready()
        batches = _batches(steps, batch)
        mem, _ = steps_per_s(None, batches, spec, 0, step_ms / 1e3, warmup)
        for x in lat:
            pre, wait = steps_per_s(teachers[x].address, batches, spec, 2, step_ms / 1e3, warmup)
            sync, wait0 = steps_per_s(teachers[x].address, batches, spec, 0, step_ms / 1e3, warmup)
            rows.append({"latency_ms": x, "step_ms": step_ms, "in_memory": mem, "prefetch_depth2": pre,
                         "sync_depth0": sync, "wait_ms_prefetch": wait * 1e3, "wait_ms_sync": wait0 * 1e3,
                         "ideal_prefetch": 1e3 / max(x, step_ms), "ideal_sync": 1e3 / (x + step_ms),
                         "ratio": pre / mem})
            log(f"P1 X={x:g} ms: prefetch {pre:.2f} steps/s, sync {sync:.2f}, in memory {mem:.2f}")
    finally:
        for t in teachers.values():
            t.stop()
    head = next(r for r in rows if r["latency_ms"] == head_x)
    fig = Figure(
        "P1_prefetch_ratio", baseline=mem, measured=head["prefetch_depth2"], unit="steps/s",
        what=(f"student steps/s, step = {step_ms:g} ms sleep, batch {batch} images, remote synthetic ViT-B "
              f"teacher (plain gRPC, child process) with X = {head_x:g} ms forward, last-layer hidden float16, "
              f"Prefetcher depth 2; baseline: same loop with targets in memory"),
        rows=rows,
    )
    fig.extra["sync_ratio"] = head["sync_depth0"] / mem
    return fig


def plot(fig: Figure, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = fig.rows
    x = [row["latency_ms"] for row in r]
    p, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [row["prefetch_depth2"] for row in r], "o-", label="prefetch (depth 2)")
    ax.plot(x, [row["sync_depth0"] for row in r], "s-", label="synchronous (depth 0)")
    ax.plot(x, [row["in_memory"] for row in r], "k--", label="targets in memory")
    ax.plot(x, [row["ideal_prefetch"] for row in r], ":", label="1 / max(X, Y)")
    ax.plot(x, [row["ideal_sync"] for row in r], ":", label="1 / (X + Y)")
    ax.axvline(r[0]["step_ms"], color="grey", lw=0.5)
    ax.set_xlabel("teacher latency X (ms); step time Y = %g ms" % r[0]["step_ms"])
    ax.set_ylabel("student steps/s")
    ax.set_title("P1: prefetch hides the teacher while X < Y")
    ax.legend(fontsize=8)
    p.tight_layout()
    p.savefig(path, dpi=120)
    plt.close(p)
