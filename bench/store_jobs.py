"""S1, S2: a job's targets from the target store (issue #24). The quickstart's teacher (packaged MiniLM),
student (3 of its layers), spec (hidden layers 2, 4, 6 float32) and data (WordNet glosses, batch 32 x
32 tokens), rank 0 of 2's first batches; no Ray, no server.

S2 ``S2_precompute_ratio``: samples/s of ``kdjob.precompute.fill`` (keys, the teacher in process at
batch 64, its targets split into rows and written to a fresh local store, shards committed) over the
same engine's samples/s on the same forwards (nothing kept), alternating slices of the requests. Bounded
by what precompute adds on this process's CPU: sha256 keys, safetensors encoding, the shard's sha256
and write + fsync; they run on the main thread while the next forward runs on the engine's thread.

S1 ``S1_store_training_ratio``: student steps/s of the training step fed by a ``Prefetcher`` over a
``StoreSubmitter`` in mode ``read`` (no teacher anywhere; the store S2 filled, reopened) over the
same loop without KD (the same student, optimizer and batches, a ``NoTeacher`` prefetcher and a
loss on the student's own last block instead of the KD terms), alternating step by step: each batch
trained by both back to back, the figure the median of those pairs' ratios (a batch's padded length
and the machine's load at that moment hit both).
Bounded by the KD losses (MSE on 3 blocks + the embedding cosine, forward and backward: the step's
extra work over the no-KD loss) and the store's reads on the StoreSubmitter's threads, sharing the
cores with the step: per batch the 32 keys hashed, then 32 rows copied once from the memory-mapped
shard into the batch's tensors, each row's CRC-32C checked (``TargetStore.get_batch``).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Figure

BATCH = 64


def quickstart(store: str):
    from kdserve.config import load
    from student_workers.train.job_config import JobConfig

    root = Path(__file__).resolve().parents[1]
    return load(JobConfig, str(root / "configs/quickstart_store.yaml"), [f"teacher.store={store}"])


def rank0_batches(cfg, n: int) -> list[dict]:
    from student_workers.train.batches import batches

    it = batches(cfg, 0, cfg.train.num_workers)
    return [next(it) for _ in range(n)]


def forwards(inputs: list[dict]) -> list[dict]:
    """The forwards precompute runs on these requests: rows of one padded length together, BATCH each."""
    from kdjob.precompute import Pending

    pending, out = Pending(), []
    for x in inputs:
        for i in range(len(next(iter(x.values())))):
            sig = pending.add(str(len(out)), {k: v[i] for k, v in x.items()})
            if len(pending.groups[sig][0]) >= BATCH:
                out.append(pending.take(sig)[1])
    return out + [pending.take(sig)[1] for sig in list(pending.groups)]


def s2(cfg, inputs: list[dict], parts: int, log) -> tuple[Figure, object, object]:
    """Engine alone and precompute alternate over ``parts`` slices of the requests (the same forwards)."""
    from kdjob.precompute import fill, in_process_teacher
    from student_workers.train.check import check_student_side
    from student_workers.train.store import open_job_store

    info, for_spec = in_process_teacher(cfg)
    spec = check_student_side(cfg, info).target_spec(cfg.teacher.target_dtype)
    run = for_spec(spec)
    run(forwards(inputs[:1])[0]).result()  # warm-up
    store = open_job_store(cfg, info, spec, mode="write", shard_bytes=64 << 20)
    per, engine_s, fill_s, n, sizes = len(inputs) // parts, 0.0, 0.0, 0, []
    cpu = {"engine": 0.0, "precompute": 0.0}
    for p in range(parts):
        part = inputs[p * per:(p + 1) * per]
        stacked = forwards(part)
        sizes += [len(next(iter(x.values()))) for x in stacked]
        t0, c0 = time.perf_counter(), time.process_time()
        for x in stacked:
            run(x).result()
        engine_s += time.perf_counter() - t0
        cpu["engine"] += time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        counts = fill(store, run, spec, info.fingerprint, iter(part), BATCH)  # commits its shard at the end
        fill_s += time.perf_counter() - t0
        cpu["precompute"] += time.process_time() - c0
        n += counts["computed"]
    assert n == per * parts * 32, n
    log(f"S2 engine {n / engine_s:.0f} samples/s, precompute {n / fill_s:.0f} samples/s ({len(store._shards)} shards)")
    fig = Figure("S2_precompute_ratio", baseline=n / engine_s, measured=n / fill_s, unit="samples/s",
                 what=(f"precompute (keys, MiniLM in process at batch {BATCH}, rows written to a local store, a shard "
                       f"committed per slice) vs the same engine's same forwards ({len(sizes)} of up to {BATCH} rows of "
                       f"one padded length), {n} WordNet samples of <= 32 tokens, hidden 2,4,6 f32; {parts} "
                       f"alternating slices"),
                 rows=[{"mode": "engine only", "samples_per_s": n / engine_s, "samples_per_cpu_s": n / cpu["engine"],
                        "forward_rows": str(sorted(sizes))},
                       {"mode": "precompute", "samples_per_s": n / fill_s, "samples_per_cpu_s": n / cpu["precompute"],
                        "shards": len(store._shards)}],
                 notes=[f"samples per CPU-second: ratio {cpu['engine'] / cpu['precompute']:.3f}; 1-min load average "
                        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"],
                 extra={"cpu_ratio": cpu["engine"] / cpu["precompute"]})
    return fig, info, spec


def step_fn(cfg, info, kd: bool):
    """(distiller, one training step(batch, targets)) as the worker loop does it, or without KD."""
    from kdjob.evaluate import fresh_distiller
    from student_workers.losses.distiller import module_views
    from student_workers.train.batches import student_inputs

    d = fresh_distiller(cfg, info)
    opt = torch.optim.AdamW(d.parameters(), lr=cfg.train.lr)

    def step(batch, targets) -> None:
        inputs = student_inputs(batch)
        if kd:
            total, _ = d(inputs, targets)
        else:
            out = d.student(inputs, need_attention=False)
            total = next(iter(module_views(out).values())).hidden[-1].float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(d.parameters(), cfg.train.grad_clip)
        opt.step()

    return step


def s1(cfg, info, spec, batches: list[dict], log) -> Figure:
    """The two loops alternate step by step over the same batches (a loaded machine's drift hits both);
    each step's time includes its wait for targets."""
    from kdserve.store import TargetStore
    from student_workers.client.prefetch import Prefetcher
    from student_workers.train.batches import teacher_inputs
    from student_workers.train.store import StoreSubmitter
    from student_workers.train.teacher import NoTeacher

    kd, plain = step_fn(cfg, info, True), step_fn(cfg, info, False)
    store = TargetStore.open(cfg.teacher.store, "read")  # a fresh handle: nothing cached
    sub = StoreSubmitter(store, info.fingerprint, mode="read", threads=2)
    request = lambda b: (teacher_inputs(b, None), spec)  # noqa: E731
    wall: dict[str, list[float]] = {"no KD": [], "store read": []}
    cpu: dict[str, list[float]] = {"no KD": [], "store read": []}
    with Prefetcher(batches, request, sub, depth=2) as from_store, \
            Prefetcher(batches, request, NoTeacher(), depth=2) as plain_pre:
        for _ in range(len(batches)):
            for name, pre, step in (("no KD", plain_pre, plain), ("store read", from_store, kd)):
                t0, c0 = time.perf_counter(), time.process_time()  # CPU of every thread: the reads' too
                step(*next(pre))
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    sub.close()
    assert sub.misses == 0
    # the first step of each: warm-up. Each pair is one batch, back to back: the median of the pairs'
    # ratios is what KD from the store costs, whatever the batch's length or the machine's load then
    pair = statistics.median(p / s for p, s in zip(wall["no KD"][1:], wall["store read"][1:]))
    cpu_pair = statistics.median(p / s for p, s in zip(cpu["no KD"][1:], cpu["store read"][1:]))
    base = 1 / statistics.median(wall["no KD"][1:])
    rate = {"no KD": base, "store read": base * pair}
    cpu_base = 1 / statistics.median(cpu["no KD"][1:])
    cpu_rate = {"no KD": cpu_base, "store read": cpu_base * cpu_pair}
    load = os.getloadavg()[0]
    log(f"S1 steps/s no KD {rate['no KD']:.2f}, from the store {rate['store read']:.2f}; per CPU-second "
        f"{cpu_rate['no KD']:.2f} / {cpu_rate['store read']:.2f} ({len(batches) - 1} steps each, load {load:.1f})")
    return Figure("S1_store_training_ratio", baseline=rate["no KD"], measured=rate["store read"], unit="steps/s",
                  what=(f"student steps/s with targets from the store (mode read, no teacher) vs the same loop without "
                        f"KD; quickstart student, batch 32 x <= 32 tokens, prefetch depth 2, {len(batches) - 1} steps "
                        f"each alternating step by step; the median no-KD step, times the median of the per-batch ratios"),
                  rows=[{"mode": k, "steps_per_s": rate[k], "steps_per_cpu_s": cpu_rate[k],
                         "median_step_ms": 1e3 * statistics.median(wall[k][1:])} for k in wall],
                  notes=[f"steps per CPU-second (every thread of the process, the store's reads included): ratio "
                         f"{cpu_rate['store read'] / cpu_rate['no KD']:.3f}; 1-min load average {load:.1f} on "
                         f"{os.cpu_count()} CPUs"],
                  extra={"cpu_ratio": cpu_rate["store read"] / cpu_rate["no KD"], "load": load})


def figures(quick: bool, only: set[str], log) -> list[Figure]:
    steps, parts = (16, 4) if quick else (48, 6)
    root = Path(tempfile.mkdtemp(prefix="kdserve-store-jobs-"))
    try:
        cfg = quickstart(str(root / "store"))
        batches = rank0_batches(cfg, steps)
        from student_workers.train.batches import teacher_inputs

        f2, info, spec = s2(cfg, [teacher_inputs(b, None) for b in batches], parts, log)
        out = [f2] if "S2" in only else []
        if "S1" in only:
            out.append(s1(cfg, info, spec, batches, log))
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
